"""Report the largest error against torch seen in the run (float64, relative to max(1, |ref|))."""

import reference


def pytest_terminal_summary(terminalreporter):
    worst = reference.WORST
    if worst["where"]:
        terminalreporter.write_line(
            f"largest float64 error against torch.func: {worst['error']:.2e} ({worst['where']})"
        )

"""Report the largest error against torch seen in the run (float64, relative to max(1, |ref|))."""

import os

import reference
import torch

if "XA_TEST_DEVICE" in os.environ:
    torch.set_default_device(reference.DEVICE)


def pytest_terminal_summary(terminalreporter):
    worst = reference.WORST
    if worst["where"]:
        terminalreporter.write_line(
            f"largest float64 error against torch.func: {worst['error']:.2e} ({worst['where']})"
        )

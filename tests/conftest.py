"""Report the largest error against torch seen in the run (float64, relative to max(1, |ref|))."""

import os
import sys

import pytest
import reference
import torch

import xa

if "XA_TEST_DEVICE" in os.environ:
    torch.set_default_device(reference.DEVICE)


def pytest_terminal_summary(terminalreporter):
    worst = reference.WORST
    if worst["where"]:
        terminalreporter.write_line(
            f"largest float64 error against torch.func: {worst['error']:.2e} ({worst['where']})"
        )
    summary = getattr(sys.modules.get("test_opinfo"), "SUMMARY", None)
    if summary:
        counts: dict = {}
        for status, _ in summary.values():
            counts[status] = counts.get(status, 0) + 1
        counted = sum(counts.get(s, 0) for s in ("handled", "refused", "wrong", "crash"))
        terminalreporter.write_line(
            f"OpInfo sweep (orders 1-3, both directions): handled {counts.get('handled', 0)} of {counted} ops "
            f"({100 * counts.get('handled', 0) / max(counted, 1):.0f}%); outcomes {dict(sorted(counts.items()))}"
        )


@pytest.fixture(autouse=True)
def _free_partials():
    """A recorded ``.xgrad`` and its leaf keep each other alive: free every test's before the next."""
    yield
    xa.clear_partials()

"""Report the largest error against torch seen in the run (float64, relative to max(1, |ref|)), and fail
the run when its peak resident memory went over ``PEAK_RSS_LIMIT`` (the suite must fit a laptop)."""

import os
import sys

try:
    import resource
except ImportError:  # Windows: no peak to read, no check
    resource = None

import pytest
import reference
import torch

import xa

if "XA_TEST_DEVICE" in os.environ:
    torch.set_default_device(reference.DEVICE)


# bytes (XA_TEST_PEAK_RSS_GIB overrides): an order-3 sample's reference alone is out * in^3 entries, and xa's
# backward blocks are as large, so a sample a few entries larger can take gigabytes: keep samples small
PEAK_RSS_LIMIT = float(os.environ.get("XA_TEST_PEAK_RSS_GIB", "4")) * 2**30
_PEAK_OVER = pytest.StashKey[int]()


def peak_rss():
    """This process's peak resident set in bytes so far (``ru_maxrss``), or None where it cannot be read."""
    if resource is None or not sys.platform.startswith(("linux", "darwin")):
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts kilobytes, macOS bytes


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    peak = peak_rss()
    if peak is not None and peak > PEAK_RSS_LIMIT and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        # the run's exit status is what this hook leaves in session.exitstatus: a peak over the limit fails it
        session.config.stash[_PEAK_OVER] = peak
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    peak = peak_rss()
    if peak is not None:
        over = terminalreporter.config.stash.get(_PEAK_OVER, None)
        terminalreporter.write_line(
            f"peak resident memory of the run: {peak / 2**30:.2f} GiB (limit {PEAK_RSS_LIMIT / 2**30:g} GiB)"
            + (": OVER THE LIMIT, the run fails; shrink the sample that grew it (tests/samples_*.py)" if over else ""),
            red=bool(over))
    worst = reference.WORST
    if worst["where"]:
        terminalreporter.write_line(
            f"largest float64 error against torch.func: {worst['error']:.2e} ({worst['where']})"
        )
    for mode, summary in (getattr(sys.modules.get("test_opinfo"), "SUMMARY", None) or {}).items():
        counts: dict = {}
        for status, _ in summary.values():
            counts[status] = counts.get(status, 0) + 1
        counted = sum(counts.get(s, 0) for s in ("handled", "refused", "wrong", "crash"))
        terminalreporter.write_line(
            f"OpInfo sweep (orders 1-3, both directions, {'every' if mode == 'all' else 'only the first'} float64 "
            f"tensor argument requiring grad): handled "
            f"{counts.get('handled', 0)} of {counted} ops ({100 * counts.get('handled', 0) / max(counted, 1):.0f}%); "
            f"outcomes {dict(sorted(counts.items()))}"
        )


@pytest.fixture(autouse=True)
def _free_partials():
    """A recorded ``.xgrad`` and its leaf keep each other alive: free every test's before the next."""
    yield
    xa.clear_partials()

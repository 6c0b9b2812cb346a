"""The plan's peak-memory estimate against what execution really takes from the system (Linux)."""

import subprocess
import sys

import pytest

WORKLOAD = r"""
import torch, xa
torch.manual_seed(0)
x = torch.randn(6, dtype=torch.float64, requires_grad=True)
W = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
V = torch.randn(4, 16, dtype=torch.float64)
y = torch.softmax(V @ torch.tanh(W @ x), 0)

def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

for direction in ("backward", "forward"):
    sup = xa.backward(y, 3, direction=direction, create_graph=False)  # plans, warms up
    del x.xgrad, W.xgrad
    xa.release_buffers()  # the call makes its plan's arena again (warm calls reuse it: tests/test_buffers.py)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident set
    xa.backward(y, 3, direction=direction, create_graph=False)
    print(direction, status("VmHWM") - base, sup.plan.peak_elements * 8)
    del x.xgrad, W.xgrad
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_estimate_within_2x_of_real_allocation():
    # Large blocks straight to mmap, so that freed memory leaves the process between calls.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], env=env, capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == ["backward", "forward"]
    for direction, actual, estimate in rows:
        actual, estimate = int(actual), int(estimate)
        assert estimate > 10 * 2**20, "the workload must be large enough to see above the noise"
        assert estimate / 2 <= actual <= estimate * 2, (direction, actual, estimate)

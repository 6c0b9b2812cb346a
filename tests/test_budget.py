"""max_memory is a promise: the real peak of a run stays under it, rules' own allocations included.

Plain data (``create_graph=False``) and recorded for autograd (the default under grad mode: the
budget then counts what autograd keeps, and the call's peak is measured through the backward of a
loss of its results too, where chunks run again one at a time). Each workload runs in a fresh
process (large blocks straight to mmap, so the resident set follows what is alive) with a budget
under the plan's own estimate, so xa must chunk the source rows or pick the other direction, and
the growth of the peak resident set during the call is compared with the
budget. The graphs hold the fused rules whose dense derivatives are built at
execution: softmax, layer_norm, attention.
"""

import json
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch

import xa

WORKLOAD = r"""
import sys, torch, xa
import torch.nn.functional as F
from xa.capture import Graph
torch.manual_seed(0)
case, fraction, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
record = mode == "recorded"
D = torch.float64
x = torch.randn(4, 40, dtype=D, requires_grad=True)
if case == "softmax":
    y = torch.softmax(torch.tanh(x) * x, dim=1)
elif case == "layer_norm":
    y = F.layer_norm(torch.tanh(x) * x, (40,))
else:
    q = x.reshape(1, 1, 4, 40)  # 4-d: the fused kernel on every supported torch (2.11 takes 3-d to the math path)
    y = F.scaled_dot_product_attention(torch.tanh(q), q, q)

def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

whole = xa.explain(y, 2, file=open("/dev/null", "w"))
need = whole.tape_bytes if record else whole.peak_bytes
budget = fraction * need


def run():
    sup = xa.backward(y, 2, max_memory=budget, create_graph=record)
    if record:  # the gradient of a loss of every result: the chunks run again, one at a time
        sum((t * t).sum() for t in x.xgrad).backward(retain_graph=True)
    return sup


run()  # plans every chunk size it tries, warms up
del x.xgrad
x.grad = None
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
sup = run()
rows = sup.plan.block_shapes[(0,)][0] if (0,) in sup.plan.block_shapes else y.numel()
print(status("VmHWM") - base, int(budget), need, rows, whole.direction, sup.plan.direction)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("mode", ["plain", "recorded"])
@pytest.mark.parametrize("case,fraction", [("softmax", 0.7), ("layer_norm", 0.7), ("attention", 0.9)])
def test_real_peak_stays_under_max_memory(case, fraction, mode):
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, case, str(fraction), mode], env=env, capture_output=True,
                         text=True, check=True)
    real, budget, whole, rows, first_choice, ran = out.stdout.split()
    real, budget, whole, rows = int(real), int(budget), int(whole), int(rows)
    assert whole > 20 * 2**20, "the workload must be large enough to see above the noise"
    assert real <= budget, f"{case}: the call grew the resident set by {real} bytes, over max_memory={budget}"
    # a budget under the cheapest plan's estimate: xa chunks the source rows or takes the other direction
    assert rows < 4 * 40 or ran != first_choice, (case, rows, first_choice, ran)


# ---------------------------------------------------------------------- chunks of samples: everything counted

SAMPLES_WORKLOAD = r"""
import json, sys, torch, xa
from unittest.mock import patch
from xa import execute

B, budget, mode, device = int(sys.argv[1]), float(sys.argv[2]) * 2**20, sys.argv[3], sys.argv[4]
record = mode == "recorded"
D = torch.float64
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                          torch.nn.Linear(256, 1)).to(device=device, dtype=D)
params = list(net.parameters())


def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def start():  # the call's own allocations: the resident set's peak on a CPU, the allocator's on a GPU
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status("VmRSS")


def grown(base):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return status("VmHWM") - base


def call(u, X, max_memory, refused=None):
    # the Laplacian of every point, and under autograd the gradient of a loss of it (every chunk again)
    for p in params + [X]:
        p.grad = None
    try:
        L = xa.laplacian(u, X, batch_dim=0, max_memory=max_memory, create_graph=record)
    except xa.MemoryBudgetError as err:
        if refused is None:
            raise
        refused.append(str(err))
        return None, None
    if record:
        (L * L).sum().backward(retain_graph=True)
        return L.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params + [X]]
    return L, None


# torch's own first use of each kernel at these sizes (its code, its GEMM buffers) is not the call's: warm
# them on other points (another shape, so that no plan of the measured call is cached: it plans too)
Xw = torch.randn(B - 7, 16, dtype=D, device=device, requires_grad=True)
call(net(Xw), Xw, budget, [])
del Xw
X = torch.randn(B, 16, dtype=D, device=device, requires_grad=True)
u = net(X)  # the user's forward pass, before the call
refused, runs = [], []
real = execute.run
with patch.object(execute, "run", lambda *a, **k: runs.append(a[0].batch.size) or real(*a, **k)):
    base = start()
    got, got_grads = call(u, X, budget, refused)
    peak = grown(base)
out = {"peak": peak, "budget": budget, "runs": len(runs), "largest": max(runs, default=0), "refused": refused}
if not refused:
    want, want_grads = call(u, X, None)  # unbudgeted: whole
    scale = max(1.0, want.abs().max().item())
    out["error"] = (got - want).abs().max().item() / scale
    if record:
        out["grad_error"] = max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item()
                                for a, b in zip(got_grads, want_grads))
print(json.dumps(out))
"""

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SLACK = 4 * 2**20  # what the model does not count: the allocator's small pieces, Python's objects


def _samples(B, budget_mib, mode, device):
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", SAMPLES_WORKLOAD, str(B), str(budget_mib), mode, device], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,budget_mib,mode", [(8192, 32, "plain"), (8192, 64, "plain"), (8192, 128, "plain"),
                                               (2048, 32, "recorded"), (2048, 64, "recorded"),
                                               (4096, 128, "recorded")])
def test_laplacian_in_chunks_of_samples_stays_under_max_memory(B, budget_mib, mode, device):
    """The user's case: the Laplacian of a tanh MLP 16-256-256-1 over many points, under a budget well under
    what the whole needs (the factors of all samples alone, 32 MiB at 8192 points, used to be built for
    every chunk). Each chunk builds its factors from its slices of what torch saved, so the call's peak,
    planning included (the plans are not cached) and under autograd the backward of a loss of the results
    too, stays under max_memory; the numbers and gradients are the unbudgeted call's."""
    got = _samples(B, budget_mib, mode, device)
    assert not got["refused"], got["refused"]
    assert got["runs"] > 1 and got["largest"] < B, got  # it did run in chunks of samples
    assert got["peak"] <= got["budget"] + SLACK, (
        f"grew by {got['peak'] / 2**20:.1f} MiB under max_memory={budget_mib} MiB (+{SLACK / 2**20:.0f} MiB slack)")
    assert got["error"] <= 1e-10, got
    if mode == "recorded":
        assert got["grad_error"] <= 1e-10, got


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("device", DEVICES)
def test_laplacian_refused_before_anything_large_is_allocated(device):
    """Under autograd at 8192 points, the gradients of what torch saved alone are over 32 MiB: refused,
    naming the function called, with one sample's need, before anything large is allocated."""
    got = _samples(8192, 32, "recorded", device)
    assert len(got["refused"]) == 1 and got["runs"] == 0, got
    message = got["refused"][0]
    assert message.startswith("xa.laplacian ") and "even one sample at a time" in message, message
    assert "max_memory=32 MiB" in message, message
    assert got["peak"] <= 4 * 2**20, f"grew by {got['peak'] / 2**20:.1f} MiB before refusing"


def _mlp_point_cloud(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(1, 16, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(B, 16, generator=g, dtype=torch.float64)  # per-sample data that is no value of the graph
    return x, W1, W2, c


def test_a_chunk_builds_its_factors_from_its_slices():
    """A sliced chunk's plan asks each rule on the chunk's slices of what torch saved: its factors are the
    chunk's; a node that saved a tensor found nowhere in the graph (here a constant, which might carry the
    samples or not) takes all samples' factors, narrowed, counted whole. The numbers are the whole run's."""
    from xa import execute, request
    from xa import plan as planner

    x, W1, W2, c = _mlp_point_cloud()
    u = torch.tanh(torch.tanh(x @ W1.T) * c) @ W2.T  # (B, 1)
    ask = request.derivatives(u, 2, target=x, direction="backward", batch_dim=0)
    whole = planner.build(ask)
    sliced = planner.build(ask.sliced_chunk(8))
    narrowed = planner.build(ask.replace(samples=8))
    by_name = {}
    for s, n, w in zip(sliced.steps, narrowed.steps, whole.steps):
        if s.terms:
            by_name.setdefault(s.name, []).append((s, n, w))
    for s, n, w in by_name["TanhBackward0"]:
        assert s.cut is not None and s.sliced == frozenset(s.structure)
        assert s.factor_elements * 8 == n.factor_elements == w.factor_elements  # a chunk's, not all 64 samples'
    (s, n, w), = by_name["MulBackward0"]
    assert s.cut is None and not s.sliced and s.factor_elements == n.factor_elements
    assert sliced.peak_bytes < narrowed.peak_bytes
    want = xa.laplacian(u, x, batch_dim=0, direction="backward", create_graph=False)
    runs = []
    real = execute.run
    with patch.object(execute, "run", lambda *a, **k: runs.append(a[0]) or real(*a, **k)):
        got = xa.laplacian(u, x, batch_dim=0, direction="backward", create_graph=False,
                           max_memory=0.3 * whole.peak_bytes)
    assert len(runs) > 1 and all(p.batch.sliced for p in runs)  # in sliced chunks of samples
    assert (got - want).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())


def test_a_refusal_names_the_function_called():
    x, W1, W2, c = _mlp_point_cloud(B=6)
    u = torch.tanh(x @ W1.T) @ W2.T

    def calls():
        yield "xa.backward", lambda m: xa.backward(u, 2, batch_dim=0, max_memory=m)
        yield "xa.backward", lambda m: xa.backward(u, 2, max_memory=m)
        yield "xa.laplacian", lambda m: xa.laplacian(u, x, batch_dim=0, max_memory=m)
        yield "xa.laplacian", lambda m: xa.laplacian(u, x, max_memory=m)
        yield "xa.biharmonic", lambda m: xa.biharmonic(u, x, batch_dim=0, max_memory=m)
        yield "xa.partials", lambda m: xa.partials(u, x, [(0, 1)], batch_dim=0, max_memory=m)
        yield "xa.differential_operator", lambda m: xa.differential_operator(u, x, {2: torch.eye(3)}, batch_dim=0,
                                                                             max_memory=m)
        yield "xa.directional", lambda m: xa.directional(u, x, torch.ones(3), 2, batch_dim=0, max_memory=m)
        yield "xa.mixed", lambda m: xa.mixed(u, (x, W1), batch_dim=0, max_memory=m)

    for name, call in calls():
        for record in (False, True):
            with torch.set_grad_enabled(record), pytest.raises(xa.MemoryBudgetError) as err:
                call(64)
            assert str(err.value).startswith(name + " "), (name, str(err.value))

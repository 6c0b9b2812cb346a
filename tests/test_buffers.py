"""A cached plan's arena: warm calls allocate no large block, and nothing handed out or recorded is reused.

A run without autograd writes its large blocks and temporaries into its plan's
arena (:mod:`xa.arena`), laid out once from the plan's lifetimes. Measured here
with torch's profiler (every CPU allocation a call makes), in a fresh process
for the resident set, and against runs without the arena (``xa.arena.ENABLED``).
"""

import gc
import io
import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

import xa
import xa.arena
from xa import plan as planner

D = torch.float64
MB = 2**20


def _folx(B=8, d=200, width=128, layers=3, seed=0):
    """A dense SiLU MLP on 200 inputs per sample: the Laplacian's jets are 201 rows, 1.6 MB each; factors 8 kB."""
    torch.manual_seed(seed)
    mods = [nn.Linear(d, width, dtype=D), nn.SiLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width, dtype=D), nn.SiLU()]
    net = nn.Sequential(*mods, nn.Linear(width, 1, dtype=D))
    X = torch.randn(B, d, dtype=D, requires_grad=True)
    return net, X, net(X).squeeze(-1)


def _pinn(B=4096, act=nn.Tanh, seed=0):
    """A PINN 3-64-64-1 on B points: each layer's derivative factors are B x 64 numbers, 2 MB at B = 4096."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 64, dtype=D), act(), nn.Linear(64, 64, dtype=D), act(), nn.Linear(64, 1, dtype=D))
    X = torch.randn(B, 3, dtype=D, requires_grad=True)
    return net, X, net(X).squeeze(-1)


def _lap(u, X, **kw):
    return xa.laplacian(u, X, batch_dim=0, create_graph=False, **kw)


def _hessian_graph(seed=0):
    """A plain Hessian by backprop: blocks over the hidden layer's 1280 values (13 MB), a result of 2.9 MB."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 30, dtype=D, generator=g, requires_grad=True)
    W = torch.randn(30, 64, dtype=D, generator=g) / 6
    h = torch.tanh(x @ W)
    return x, h, (h * h).sum()


def _allocations(call, over=MB) -> list:
    """The sizes of the CPU allocations over ``over`` bytes torch's profiler sees during ``call()``."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()

    def walk(nodes):
        for e in nodes:
            yield e
            yield from walk(e.children)
    return [e.extra_fields.alloc_size for e in walk(prof.profiler.kineto_results.experimental_event_tree())
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
            and e.extra_fields.alloc_size > over]


@pytest.fixture(autouse=True)
def _fresh():
    xa.arena.ENABLED = True
    xa.release_buffers()
    yield
    xa.arena.ENABLED = True
    xa.release_buffers()


def test_a_warm_call_allocates_no_block_over_1mb():
    net, X, u = _folx()
    _lap(u, X)  # plans, makes the arena
    assert _allocations(lambda: _lap(u, X)) == []
    # the same call without the arena: every jet anew (the measurement sees them)
    xa.arena.ENABLED = False
    assert len(_allocations(lambda: _lap(u, X))) >= 4


def test_a_warm_backward_allocates_only_its_results():
    x, h, s = _hessian_graph()
    xa.backward(s, 2, create_graph=False)
    got = _allocations(lambda: xa.backward(s, 2, create_graph=False))
    # the Hessian handed out as .xgrad (600 x 600) is new memory; the 13 MB blocks over h are not
    assert sorted(got) == [600 * 600 * 8], got


def test_values_bit_for_bit_first_warm_and_without_arena():
    net, X, u = _folx()
    first = _lap(u, X)
    warm = [_lap(u, X) for _ in range(2)]
    xa.arena.ENABLED = False
    plain = _lap(u, X)
    assert all(torch.equal(first, w) for w in warm) and torch.equal(first, plain)
    x, h, s = _hessian_graph()
    xa.arena.ENABLED = True
    runs = []
    for enabled in (True, True, False):
        xa.arena.ENABLED = enabled
        xa.backward(s, 2, create_graph=False)
        runs.append([t.clone() for t in x.xgrad])
    one, two, three = runs
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(one, two, three))
    xa.clear_partials()


def test_results_of_a_call_survive_the_next():
    """Results are never in an arena: the next call of the plan, on other values, leaves them as they were."""
    net, X, u = _folx(seed=0)
    lap1 = _lap(u, X)
    kept = lap1.clone()
    net2, X2, u2 = _folx(seed=1)  # the same shapes: the same plan, its arena
    lap2 = _lap(u2, X2)
    assert torch.equal(lap1, kept) and not torch.equal(lap1, lap2)

    x, h, s = _hessian_graph(0)
    sup = xa.Superset.construct(s).retain_partials(h).backward(2, create_graph=False)  # an intermediate's too
    got = [t.clone() for t in x.xgrad]
    d1, d2 = sup.operator_partials(h)
    retained = (d1.clone(), d2.clone())
    first = x.xgrad
    x2, h2, s2 = _hessian_graph(1)
    xa.Superset.construct(s2).retain_partials(h2).backward(2, create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(first, got))
    assert torch.equal(d1, retained[0]) and torch.equal(d2, retained[1])
    assert not torch.equal(x2.xgrad[1], first[1])
    xa.clear_partials()


def test_recorded_runs_keep_their_saved_tensors():
    """Under autograd nothing is in an arena: a recorded Laplacian's gradient is the same when plain calls of
    the same plan run (and write its arena) between the call and its backward, and the same without any arena."""
    net, X, u = _folx()
    params = list(net.parameters())

    def gradient(between):
        L = xa.laplacian(u, X, batch_dim=0)  # recorded: X requires grad
        assert L.requires_grad
        for _ in range(between):
            _lap(u, X)
        g = torch.autograd.grad((L * L).sum(), params + [X], retain_graph=True, materialize_grads=True)
        return L.detach(), g

    _lap(u, X)  # the plan's arena is made
    held = xa.arena.held_bytes()
    L1, g1 = gradient(2)
    assert xa.arena.held_bytes() == held  # a recorded run takes nothing from it
    xa.arena.ENABLED = False
    xa.release_buffers()
    L0, g0 = gradient(0)
    assert torch.equal(L1, L0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g0))


def test_the_layout_never_shares_bytes_between_live_buffers():
    net, X, u = _folx()
    x, h, s = _hessian_graph()
    plans = [xa.explain(u, query=xa.queries.Laplacian(X), batch_dim=0, file=io.StringIO()),
             xa.explain(s, 2, file=io.StringIO())]
    for plan in plans:
        lay = plan.layout
        assert lay.slots and lay.total >= max(n for _, n in lay.slots.values())
        items = sorted(lay.slots)
        for i, a in enumerate(items):
            (oa, na), (sa, ea) = lay.slots[a], lay.spans[a]
            assert oa % xa.arena.ALIGN == 0 and oa + na <= lay.total
            for b in items[i + 1:]:
                (ob, nb), (sb, eb) = lay.slots[b], lay.spans[b]
                if sa < eb and sb < ea:
                    assert oa + na <= ob or ob + nb <= oa, (a, b)
        # the peak counts the arena whole
        assert plan.peak_bytes >= lay.total


def test_release_buffers_frees_and_arenas_die_with_their_plans():
    net, X, u = _folx()
    _lap(u, X)
    plan = xa.explain(u, query=xa.queries.Laplacian(X), batch_dim=0, file=io.StringIO())
    assert plan.arena.nbytes == plan.layout.total > 2 * MB
    assert xa.arena.held_bytes() >= plan.layout.total
    assert xa.release_buffers() >= plan.layout.total
    assert xa.arena.held_bytes() == 0 and plan.arena.nbytes == 0
    lap = _lap(u, X)  # made again
    assert plan.arena.nbytes == plan.layout.total
    ref = weakref.ref(plan.arena)
    del plan
    planner._PLANS.clear()
    gc.collect()
    assert ref() is None and xa.arena.held_bytes() == 0
    assert torch.equal(lap, _lap(u, X))


def test_at_most_a_few_plans_hold_an_arena():
    x, h, s = _hessian_graph()
    for n in range(xa.arena.HELD + 2):  # other shapes: other plans
        y = torch.randn(12 + n, 40, dtype=D, requires_grad=True)
        xa.backward((torch.tanh(y @ torch.ones(40, 40, dtype=D)) ** 2).sum(), 2, create_graph=False, target=None)
    held = [r() for r in xa.arena._HELD.values()]
    assert sum(1 for a in held if a is not None and a.nbytes) <= xa.arena.HELD
    xa.clear_partials()


CHUNKED = r"""
import json, sys, torch, xa, xa.arena
from torch import nn
D = torch.float64
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(200, 128, dtype=D), nn.SiLU(), nn.Linear(128, 128, dtype=D), nn.SiLU(),
                    nn.Linear(128, 1, dtype=D))
X = torch.randn(30, 200, dtype=D, requires_grad=True)
u = net(X).squeeze(-1)
whole = xa.explain(u, query=xa.queries.Laplacian(X), batch_dim=0, file=open("/dev/null", "w"))
budget = float(sys.argv[1]) * whole.peak_bytes


def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


runs = []
real = xa.execute.run
xa.execute.run = lambda *a, **k: runs.append(a[0].batch.size) or real(*a, **k)
first = xa.laplacian(u, X, batch_dim=0, create_graph=False, max_memory=budget)  # plans, makes the arena
held = [a.nbytes for a in (r() for r in xa.arena._HELD.values()) if a is not None and a.nbytes]
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
runs.clear()
warm = xa.laplacian(u, X, batch_dim=0, create_graph=False, max_memory=budget)
peak = status("VmHWM") - base
released = xa.release_buffers()
after = status("VmRSS")
print(json.dumps({"peak": peak, "runs": runs, "held": held, "same": torch.equal(first, warm), "freed": base - after,
                  "released": released, "whole": whole.peak_bytes, "budget": budget}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_chunked_call_reuses_one_arena_and_stays_under_max_memory():
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", CHUNKED, "0.4"], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["whole"] > 4 * MB and len(got["runs"]) > 2, got  # it ran in chunks of samples
    assert len(set(got["runs"])) == 2, got  # a last, smaller chunk: another plan
    assert len(got["held"]) == 1, got  # every chunk, the last smaller one too, in one arena
    assert got["same"], got
    assert got["peak"] <= got["budget"], f"a warm chunked call grew the resident set by {got['peak'] / MB:.1f} MiB"
    # the arena was resident between calls, and release_buffers gave it back to the system (most of it: a
    # slot laid out for a product that a call skips, a coefficient of one, is never touched)
    assert got["released"] == got["held"][0] and got["freed"] >= 0.5 * got["released"], got


@pytest.mark.parametrize("act", [nn.Tanh, nn.SiLU])
def test_the_rules_factors_are_written_into_the_arena(act):
    """tanh's and SiLU's derivative factors (2 MB each here) go into the plan's own memory (``ctx.out``): a warm
    call allocates nothing over 1 MB, and its values are those of a run without the arena, bit for bit, in
    cache tiles of samples (the factors kept across them) and whole."""
    net, X, u = _pinn(act=act)
    plain_runs = []
    for enabled in (False, True):
        xa.arena.ENABLED = enabled
        plain_runs.append(_lap(u, X))
    assert _factor_bytes() >= 4 * 4096 * 64 * 8  # two layers' first and second derivatives (in a tile's arena)
    assert _allocations(lambda: _lap(u, X)) == []
    warm = _lap(u, X)
    assert torch.equal(plain_runs[0], plain_runs[1]) and torch.equal(plain_runs[0], warm)
    # the reference: torch.func's Laplacian of the same network
    from torch.func import hessian, vmap
    ref = vmap(lambda p: hessian(lambda q: net(q[None])[0, 0])(p).trace())(X.detach())
    torch.testing.assert_close(warm, ref, rtol=1e-10, atol=1e-10)
    # the factors of a call are not handed out: the next call, on other points, leaves the results as they were
    kept = warm.clone()
    net2, X2, u2 = _pinn(act=act, seed=1)
    other = _lap(u2, X2)
    assert torch.equal(warm, kept) and not torch.equal(warm, other)
    assert xa.release_buffers() >= 4 * 4096 * 64 * 8 and _factor_bytes() == 0


def test_factors_stay_in_the_arena_only_where_the_budget_has_room():
    """Under a max_memory with no room beside the run's own need, the factors come from the allocator as before
    (a call run whole: 512 points, factors of 256 kB)."""
    net, X, u = _pinn(B=512)
    plan = xa.explain(u, query=xa.queries.Laplacian(X), batch_dim=0, file=io.StringIO())
    with torch.no_grad():
        need = plan.need_bytes()
    tight = _lap(u, X, max_memory=need + 64 * 2**10)
    assert _factor_bytes() == 0
    roomy = _lap(u, X)
    assert _factor_bytes() > 0 and torch.equal(tight, roomy)


def _factor_bytes() -> int:
    """Bytes of the rules' factors the arenas of all plans hold (a tiled call's are its tiles' plan's)."""
    return sum(a.factor_bytes for a in (r() for r in list(xa.arena._HELD.values())) if a is not None)

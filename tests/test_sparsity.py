"""Block sparsity of forward jets: a leaf's items kept apart until a node mixes them.

Every number is compared with the dense plan (``xa.sparsity.ENABLED = False``)
and with torch.func, in float64; the tests also check that the sparse plan is
the one that ran (terms into jets kept per item) and that it costs fewer FLOPs.
"""

from __future__ import annotations

import io
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import hessian, jacfwd, jacrev, vmap

import xa
from xa import execute, sparsity
from xa import plan as planner
from xa import request as requests

D = torch.float64
TOL = 1e-10


def close(a, b, what, tol=TOL):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert err <= tol * scale, f"{what}: {err:.3g}"


@pytest.fixture
def dense():
    """Run the body's calls on the dense plan."""
    def run(fn):
        was = sparsity.ENABLED
        sparsity.ENABLED = False
        try:
            return fn()
        finally:
            sparsity.ENABLED = was
    return run


def per_item_net(F_=2, H=6, layers=3, mix=None, seed=0, requires_grad=False):
    """``f(X)``: layers of (Linear + SiLU) on each item of ``X (B, N, F)``; at layer ``mix`` the mean over items
    is concatenated to each item's features; then Linear(1) and a sum over items: ``(B,)``."""
    g = torch.Generator().manual_seed(seed)

    def p(*shape):
        return (torch.randn(*shape, generator=g, dtype=D) / shape[-1] ** 0.5).requires_grad_(requires_grad)

    Ws = [p(H, F_)] + [p(H, 2 * H if i == mix else H) for i in range(1, layers)]
    bs = [p(H) for _ in range(layers)]
    Wo = p(1, H)

    def f(X):
        h = X
        for i, (W, b) in enumerate(zip(Ws, bs)):
            if i == mix:
                h = torch.cat([h, h.mean(-2, keepdim=True).expand_as(h)], -1)
            h = F.silu(F.linear(h, W, b))
        return F.linear(h, Wo).sum((-2, -1))

    return f, Ws + bs + [Wo]


def sparse_terms(plan) -> int:
    return sum(1 for s in plan.steps for t in s.terms if t.target[0] == "tied")


def laplacian_ref(f, X):
    n = X[0].numel()
    return vmap(lambda x: hessian(lambda z: f(z[None])[0])(x).reshape(n, n).trace())(X.detach())


@pytest.mark.parametrize("mix", [None, 1])
def test_laplacian_per_sample_equals_the_dense_plan_and_torch(mix, dense):
    f, _ = per_item_net(mix=mix)
    X = torch.randn(3, 5, 2, dtype=D, requires_grad=True)
    u = f(X)
    request = requests.query(u, xa.queries.Laplacian(X), batch_dim=0, direction="forward")
    plan = planner.build(request)
    flat = planner.build(request.replace(sparse=False))
    assert sparse_terms(plan) > 0 and sparse_terms(flat) == 0
    assert plan.flops < flat.flops
    got = xa.laplacian(u, X, batch_dim=0, direction="forward")
    want = dense(lambda: xa.laplacian(u, X, batch_dim=0, direction="forward"))
    close(got, want, "sparse vs dense")
    close(got, laplacian_ref(f, X), "sparse vs torch.func")


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("mix", [None, 1])
def test_every_query_equals_the_dense_plan(batch_dim, mix, dense):
    f, _ = per_item_net(mix=mix, seed=1)
    X = torch.randn(2, 4, 2, dtype=D, requires_grad=True)
    u = f(X)
    if batch_dim is None:
        u = u.sum()
    n = 8 if batch_dim is not None else 16
    C = torch.randn(n, n, dtype=D)
    calls = {
        "laplacian": lambda: xa.laplacian(u, X, batch_dim=batch_dim, direction="forward"),
        "biharmonic": lambda: xa.biharmonic(u, X, batch_dim=batch_dim, direction="forward"),
        # within one item (0, 1), (2, 3) and across items (0, 2), (1, 6)
        "partials": lambda: xa.partials(u, X, [(0, 1), (2, 3), (0, 2), (1, 6), (5, 5, 5)], batch_dim=batch_dim,
                                        direction="forward"),
        "operator": lambda: xa.differential_operator(u, X, {1: torch.ones(n, dtype=D), 2: C}, batch_dim=batch_dim,
                                                     direction="forward"),
        "directional": lambda: xa.directional(u, X, torch.randn(2, n, dtype=D, generator=torch.Generator()
                                                                .manual_seed(3)), 3, batch_dim=batch_dim,
                                              direction="forward"),
    }
    for name, call in calls.items():
        got, want = call(), dense(call)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            close(a, b, name)


def test_the_laplacian_without_batch_dim_matches_torch():
    f, _ = per_item_net(seed=2)
    X = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    u = f(X).sum()
    request = requests.query(u, xa.queries.Laplacian(X), direction="forward")
    assert sparse_terms(planner.build(request)) > 0  # samples and items both kept apart: 6 items of 2
    want = torch.func.hessian(lambda z: f(z).sum())(X.detach()).reshape(12, 12).trace()
    close(xa.laplacian(u, X, direction="forward"), want, "laplacian")


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_whole_derivative_tensors_equal_the_dense_plan(order, batch_dim, dense):
    f, _ = per_item_net(seed=3, H=4, layers=2, mix=1)
    X = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    u = f(X)
    request = requests.derivatives(u, order, direction="forward", batch_dim=batch_dim)
    assert sparse_terms(planner.build(request)) > 0
    xa.backward(u, order, batch_dim=batch_dim, direction="forward")
    got = [t.clone() for t in X.xgrad]
    xa.clear_partials()
    dense(lambda: xa.backward(u, order, batch_dim=batch_dim, direction="forward"))
    want = [t.clone() for t in X.xgrad]
    xa.clear_partials()
    for k, (a, b) in enumerate(zip(got, want), start=1):
        close(a, b, f"order {k}")
    if batch_dim is None:  # and against torch.func
        ref = jacrev(f)(X.detach())
        close(got[0], ref.reshape(2, 12), "order 1 vs torch")


def test_a_source_that_keeps_the_items_and_fan_out():
    """No node mixes the items: the source's own jets are written into the leaf's rows. A value read twice
    (x * tanh(x)) and per-item weights of a different value each item."""
    X = torch.randn(3, 4, 2, dtype=D, requires_grad=True)
    W = torch.randn(5, 2, dtype=D)
    c = torch.randn(4, 1, dtype=D)

    def f(X):
        h = X @ W.T
        return (h * torch.tanh(h) * c).sin()  # (3, 4, 5), per item

    u = f(X)
    request = requests.derivatives(u, 2, direction="forward", batch_dim=0)
    assert sparse_terms(planner.build(request)) > 0
    xa.backward(u, 2, batch_dim=0, direction="forward")
    got = [t.clone() for t in X.xgrad]
    xa.clear_partials()
    ref1 = vmap(jacrev(lambda x: f(x[None])[0]))(X.detach()).reshape(3, 20, 8)
    ref2 = vmap(jacfwd(jacrev(lambda x: f(x[None])[0])))(X.detach()).reshape(3, 20, 8, 8)
    close(got[0], ref1, "order 1")
    close(got[1], ref2, "order 2")


def test_a_weight_leaf_has_items_too():
    """Without batch_dim, ``W1``'s rows are items until the next layer sums them."""
    g = torch.Generator().manual_seed(4)
    W1 = torch.randn(6, 3, dtype=D, generator=g, requires_grad=True)
    W2 = torch.randn(1, 6, dtype=D, generator=g)
    x = torch.randn(5, 3, dtype=D, generator=g)
    f = lambda W: (torch.tanh(x @ W.T) @ W2.T).sum()  # noqa: E731
    u = f(W1)
    request = requests.derivatives(u, 2, direction="forward")
    assert sparse_terms(planner.build(request)) > 0
    xa.backward(u, 2, direction="forward")
    got = [t.clone() for t in W1.xgrad]
    xa.clear_partials()
    close(got[1], hessian(f)(W1.detach()).reshape(1, 18, 18), "Hessian w.r.t. W1")


@pytest.mark.parametrize("mix", [None, 1])
def test_training_through_the_sparse_plan(mix, dense):
    """A PINN-like loss, the Laplacian's residual beside an ordinary data term: its gradient w.r.t. the weights
    equals the dense plan's and torch's, and the Laplacian's term changes it."""
    f, params = per_item_net(mix=mix, seed=5, requires_grad=True)
    X = torch.randn(3, 4, 2, dtype=D, requires_grad=True)
    target, data = torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def loss_of(lap, u):
        return ((lap - target) ** 2).mean() + ((u - data) ** 2).mean()

    u = f(X)
    g = torch.autograd.grad(loss_of(xa.laplacian(u, X, batch_dim=0, direction="forward"), u), params)
    u = f(X)
    g_dense = dense(lambda: torch.autograd.grad(loss_of(xa.laplacian(u, X, batch_dim=0, direction="forward"), u),
                                                params))
    # torch: the same loss by nested autograd
    Xd = X.detach().requires_grad_(True)
    out = f(Xd)
    (grad,) = torch.autograd.grad(out.sum(), Xd, create_graph=True)
    lap = torch.zeros(3, dtype=D)
    flat = grad.reshape(3, -1)
    for i in range(flat.shape[1]):
        lap = lap + torch.autograd.grad(flat[:, i].sum(), Xd, create_graph=True)[0].reshape(3, -1)[:, i]
    g_ref = torch.autograd.grad(loss_of(lap, out), params, retain_graph=True)
    g_data = torch.autograd.grad(((out - data) ** 2).mean(), params, allow_unused=True)
    # the Laplacian's term contributes: without it the gradient is another
    assert max((r - (torch.zeros_like(r) if d is None else d)).abs().max().item() for r, d in zip(g_ref, g_data)) > 1e-6
    for a, b, c in zip(g, g_dense, g_ref):
        close(a, b, "vs dense")
        close(a, c, "vs torch")


def test_batch_dim_last_and_chunks_stay_right(dense):
    """Samples last (items before them: kept dense) and a budget that runs in chunks of samples."""
    f, _ = per_item_net(seed=6)
    X = torch.randn(4, 2, 3, dtype=D, requires_grad=True)  # (N, F, B)
    g = lambda Z: f(Z.permute(2, 0, 1))  # noqa: E731
    u = g(X)
    got = xa.laplacian(u, X, batch_dim=-1, direction="forward")
    close(got, laplacian_ref(f, X.detach().permute(2, 0, 1)), "samples last")
    Y = torch.randn(16, 4, 2, dtype=D, requires_grad=True)
    u = f(Y)
    whole = xa.laplacian(u, Y, batch_dim=0, direction="forward", create_graph=False)
    plan = xa.explain(u, query=xa.queries.Laplacian(Y), batch_dim=0, direction="forward", file=io.StringIO())
    runs = []
    real = execute.run
    with patch.object(execute, "run", lambda *a, **k: runs.append(a[0]) or real(*a, **k)):
        chunked = xa.laplacian(u, Y, batch_dim=0, direction="forward", create_graph=False,
                               max_memory=plan.peak_bytes / 3)
    assert len(runs) > 1 and all(sparse_terms(p) > 0 and p.batch.size < 16 for p in runs)
    close(chunked, whole, "chunks")


def test_chunks_of_samples_train_through_the_sparse_plan(dense):
    f, params = per_item_net(seed=8, requires_grad=True, mix=1)
    Y = torch.randn(12, 4, 2, dtype=D, requires_grad=True)
    u = f(Y)
    plan = xa.explain(u, query=xa.queries.Laplacian(Y), batch_dim=0, direction="forward", file=io.StringIO())
    runs = []
    real = execute.run
    with patch.object(execute, "run", lambda *a, **k: runs.append(a[0]) or real(*a, **k)):
        lap = xa.laplacian(u, Y, batch_dim=0, direction="forward", max_memory=plan.tape_bytes / 3)
        g = torch.autograd.grad((lap ** 2).sum(), params)
    assert len(runs) > 1 and all(sparse_terms(p) > 0 for p in runs)
    u = f(Y)
    g_dense = dense(lambda: torch.autograd.grad((xa.laplacian(u, Y, batch_dim=0, direction="forward") ** 2).sum(),
                                                params))
    assert any(t.abs().max() > 1e-6 for t in g_dense)
    for a, b in zip(g, g_dense):
        close(a, b, "chunked gradient")


def test_explain_shows_the_items_and_the_flops_saved():
    f, _ = per_item_net(seed=7)
    X = torch.randn(2, 5, 2, dtype=D, requires_grad=True)
    out = io.StringIO()
    plan = xa.explain(f(X), query=xa.queries.Laplacian(X), batch_dim=0, direction="forward", file=out)
    text = out.getvalue()
    assert "block sparsity: leaf" in text and "5 items of 2 entries each per sample" in text
    assert "order 1: 2 per item" in text
    assert "the dense plan (every row through every node)" in text
    assert "(items of leaf" in text and "jet per item(" in text
    assert plan.tied


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_per_item_programs(data):
    """Random programs on (B, N, F): per-item maps (elementwise, a Linear over features, a product with a
    per-item constant), then, somewhere, a node that mixes items (sum, mean concatenated, a softmax over
    items), more per-item maps; Laplacian per sample and whole jets, sparse against dense and torch."""
    B, N, F_ = 2, data.draw(st.integers(2, 4), label="N"), data.draw(st.integers(1, 3), label="F")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    H = 3
    ops = data.draw(st.lists(st.sampled_from(["tanh", "sin", "linear", "scale", "square", "mix_mean", "mix_softmax"]),
                             min_size=1, max_size=5), label="ops")
    Ws = [torch.randn(H, H, generator=g, dtype=D) / 2 for _ in ops]
    Win = torch.randn(H, F_, generator=g, dtype=D)
    c = torch.randn(N, H, generator=g, dtype=D)

    def f(X):
        h = X @ Win.T
        for op, W in zip(ops, Ws):
            if op == "tanh":
                h = torch.tanh(h)
            elif op == "sin":
                h = torch.sin(h) * h
            elif op == "linear":
                h = F.linear(h, W)
            elif op == "scale":
                h = h * c
            elif op == "square":
                h = h ** 2 / 4
            elif op == "mix_mean":
                h = h + h.mean(-2, keepdim=True)
            else:
                h = h * torch.softmax(h, dim=-2)
        return h.sum((-2, -1))

    X = torch.randn(B, N, F_, generator=g, dtype=D, requires_grad=True)
    u = f(X)
    lap = xa.laplacian(u, X, batch_dim=0, direction="forward")
    close(lap, laplacian_ref(f, X), f"laplacian {ops}")
    xa.backward(u, 2, batch_dim=0, direction="forward")
    got = X.xgrad[1].clone()
    xa.clear_partials()
    n = N * F_
    want = vmap(lambda x: hessian(lambda z: f(z[None])[0])(x))(X.detach()).reshape(B, 1, n, n)
    close(got.reshape(B, 1, n, n), want, f"hessian {ops}")

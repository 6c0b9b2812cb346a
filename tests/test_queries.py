"""``xa.laplacian``: collapsed second-order jets against the trace of torch.func's Hessian (float64).

Random programs (the operators, fan-out and shapes of ``test_random_graphs``),
networks, per-sample Laplacians with the sample dim anywhere, and the
errors a user can trigger.
"""

import io
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import DEVICE
from test_random_graphs import SETTINGS, build
from torch.func import hessian, vmap

import xa
from xa import execute

TOL = 1e-9


def trace_of_hessians(f, x):
    """``sum_i d^2 f(x)[a] / dx_i^2`` for every entry ``a`` of ``f(x)``, shaped like ``f(x)``."""
    x = x.detach()
    out = f(x)
    H = hessian(lambda z: f(z).reshape(-1))(x).reshape(out.numel(), x.numel(), x.numel())
    return H.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(out.shape)


def close(got, want, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0
    assert err <= TOL, f"{what}: error {err:.2e}"


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_random_program_laplacian(data):
    f, leaves, _ = build(data, order=2, n_initial=data.draw(st.integers(1, 2)), max_leaves=2,
                         n_ops=data.draw(st.integers(1, 5), label="n_ops"))
    leaves = [x.to(DEVICE) for x in leaves]
    xs = [x.detach().clone().requires_grad_(True) for x in leaves]
    y = f(*xs)
    for i, x in enumerate(xs):
        def fi(z, i=i):
            args = list(leaves)
            args[i] = z
            return f(*args)

        close(xa.laplacian(y, x), trace_of_hessians(fi, leaves[i]), f"leaf {i}")


def pinn(widths, act=nn.Tanh):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).double().to(DEVICE)


@pytest.mark.parametrize("batch_dim", [0, -2])
def test_pinn_laplacian_per_point(batch_dim):
    torch.manual_seed(0)
    net = pinn([3, 16, 16, 1])
    X = torch.rand(9, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    u = net(X) * torch.sin(X).sum(1, keepdim=True)  # X read twice: fan-out
    L = xa.laplacian(u, X, batch_dim=batch_dim)
    per_point = vmap(lambda x: hessian(lambda z: (net(z) * torch.sin(z).sum(0, keepdim=True))[0])(x).trace())
    close(L, per_point(X.detach())[:, None], "pinn")
    u.sum().backward()  # torch's graph is as it was
    assert X.grad is not None


def test_laplacian_with_the_sample_dim_last_and_a_non_scalar_output():
    torch.manual_seed(1)
    W = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    X = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)  # (d, B)
    u = torch.tanh(W @ X) ** 2  # (2, B): two outputs per sample
    L = xa.laplacian(u, X, batch_dim=1)
    per = vmap(lambda x: vmap(lambda w: hessian(lambda z: torch.tanh(w @ z) ** 2)(x).trace())(W), in_dims=1)
    close(L, per(X.detach()).T, "sample dim last")


def test_laplacian_of_the_whole_tensor_without_batch_dim():
    torch.manual_seed(2)
    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    f = lambda z: torch.softmax(z.exp() * z, dim=1) + z.sum()  # every entry depends on every entry of its row
    close(xa.laplacian(f(x), x), trace_of_hessians(f, x), "whole")


def test_laplacian_of_an_affine_source_is_zero_and_chunks_agree():
    x = torch.randn(6, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.equal(xa.laplacian(3 * x + 1, x, batch_dim=0), torch.zeros(6, 2, dtype=torch.float64,
                                                                             device=DEVICE))
    net = pinn([2, 8, 1])
    u = net(x)
    whole = xa.laplacian(u, x, batch_dim=0)
    peak = xa.explain(u, query=xa.queries.Laplacian(x), batch_dim=0, direction="forward", file=io.StringIO()).peak_bytes
    calls = []
    real = execute.run
    with patch.object(execute, "run", lambda *a, **k: calls.append(a[0].batch.size) or real(*a, **k)):
        chunked = xa.laplacian(u, x, batch_dim=0, max_memory=0.8 * peak, direction="forward")
    assert len(calls) > 1 and max(calls) < 6  # it did run in chunks of samples
    close(chunked, whole, "chunks")


def test_laplacian_errors():
    x = torch.randn(3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    h = torch.tanh(x)
    u = (h * h).sum(1)
    with pytest.raises(xa.TargetError, match="leaf"):
        xa.laplacian(u, h)
    with pytest.raises(xa.TargetError, match="leaf"):
        xa.laplacian(u, torch.randn(3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True))
    with pytest.raises(TypeError, match="wrt"):
        xa.laplacian(u, [x])
    with pytest.raises(xa.BatchMixingError):
        xa.laplacian(u - u.mean(), x, batch_dim=0)
    assert not hasattr(x, "xgrad")


@pytest.mark.parametrize("make", [
    lambda x: xa.queries.Laplacian(x),
    lambda x: xa.queries.Partials(x, [(0,), (1, 1), (0, 1, 1)]),
    lambda x: xa.queries.Biharmonic(x),
    lambda x: xa.queries.Directional(x, torch.ones(2, 2, dtype=torch.float64, device=DEVICE), 3),
    lambda x: xa.queries.Operator(x, {1: torch.ones(2, dtype=torch.float64, device=DEVICE),
                                      2: xa.queries.Diagonal(2.0)}),
])
def test_explain_shows_the_plan_that_runs(make, capsys):
    x = torch.randn(6, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    u = pinn([2, 8, 1])(x)
    query = make(x)
    shown = xa.explain(u, query=query, batch_dim=0)
    out = capsys.readouterr().out
    assert "query:" in out and "fewer than the whole tensor" in out
    assert ("rows kept" in out) == (shown.direction == "forward")
    ran = []
    real = execute.run
    with patch.object(execute, "run", lambda *a, **k: ran.append(a[0]) or real(*a, **k)):
        xa.api._answer(u, query, 0, None, None, "auto", None)
    assert len(ran) == 1 and ran[0].direction == shown.direction and ran[0].flops == shown.flops
    assert [len(s.terms) for s in ran[0].steps] == [len(s.terms) for s in shown.steps]


def test_explain_mixed(capsys):
    A = torch.randn(3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    B = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    S = torch.tanh(torch.ones(3, dtype=torch.float64, device=DEVICE) @ A * B).sum()
    plan = xa.explain(S, query=xa.queries.Mixed((A, B)))
    assert "mixed partials" in capsys.readouterr().out
    assert plan.direction == "backward" and any(isinstance(k, tuple) and k[0] == "mixed" for k in plan.results)
    with pytest.raises(TypeError, match="query"):
        xa.explain(S, query="laplacian")


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_the_laplacian_sums_its_rows_with_no_weights_and_other_diagonals_read_theirs(batch_dim):
    """Every weight of a Laplacian is one by structure: its plan sums the second-order rows and reads no weights
    operand. ``Diagonal(2.0)`` and ``Diagonal(tensor(1.0))`` are values: planned apart, with their weights."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    net = pinn([3, 8, 8, 1], act=nn.SiLU).to(DEVICE)
    u = net(x)
    if batch_dim is None:
        want = trace_of_hessians(net, x)
    else:
        want = vmap(lambda z: torch.func.hessian(lambda p: net(p[None])[0, 0])(z).trace())(x.detach())[:, None]
    lap = xa.queries.Laplacian(x)
    text = io.StringIO()
    xa.explain(u, query=lap, batch_dim=batch_dim, direction="forward", file=text)
    assert "the query's weights" not in text.getvalue()
    close(xa.laplacian(u, x, batch_dim=batch_dim, direction="forward"), want, "laplacian")
    for c, scale in ((2.0, 2.0), (torch.tensor(1.0, dtype=torch.float64), 1.0), (-0.5, -0.5)):
        op = xa.queries.Operator(x, {2: xa.queries.Diagonal(c)})
        text = io.StringIO()
        xa.explain(u, query=op, batch_dim=batch_dim, direction="forward", file=text)
        assert "the query's weights" in text.getvalue(), c
        got = xa.differential_operator(u, x, {2: xa.queries.Diagonal(c)}, batch_dim=batch_dim, direction="forward")
        close(got, scale * want, f"Diagonal({c})")
    # trained on: the Laplacian's gradient w.r.t. the weights, against nested autograd
    loss = (xa.laplacian(u, x, batch_dim=batch_dim, direction="forward") ** 2).sum()
    params = list(net.parameters())[:-1]  # (the Laplacian does not depend on the last bias)
    mine = torch.autograd.grad(loss, params)
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    ref_lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(3))
    theirs = torch.autograd.grad((ref_lap[:, None] ** 2).sum(), params)
    for a, b in zip(mine, theirs):
        close(a, b, "gradient")
    assert all(a.abs().max() > 0 for a in mine)

"""``xa.diagonal``: ``d^k u / dx_i^k`` for every entry, compared by value with torch.func in float64.

Inputs (orders 1-4, per sample with the sample dim first or last, whole), parameters (each
sample's Hessian diagonal and the summed one), both directions, whole and in chunks, fan-out,
several leaves in one call, the gradient of a loss built from a diagonal, BackPACK's
``BatchDiagHessian``/``DiagHessian``, and the typed errors.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacfwd, jacrev, vmap

import xa
from xa import budget

TOL = 1e-10
DT = torch.float64


def _same(got, want, tol=TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol, err


def _diag_ref(f, x, k):
    """``d^k f(x) / dx_i^k`` for every entry ``i``, shaped ``(*f(x).shape, *x.shape)``: nested jacrev/jacfwd."""
    g = jacrev(f)
    for _ in range(k - 1):
        g = jacfwd(g)
    full = g(x)
    n = x.numel()
    lead = full.shape[:full.dim() - k * x.dim()]
    flat = full.reshape(lead + (n ** k,))
    step = sum(n ** p for p in range(k))  # (i, .., i) in row-major order
    return flat[..., torch.arange(n) * step].reshape(lead + x.shape)


def _net(d_in=3, d_out=2, width=6, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, d_out)).to(DT)


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("direction", ["forward", "backward", "auto"])
def test_input_per_sample_first(k, direction):
    net = _net()
    X = torch.randn(5, 3, dtype=DT, requires_grad=True)
    u = net(X)  # (5, 2)
    got = xa.diagonal(u, X, order=k, batch_dim=0, direction=direction)
    want = vmap(lambda x: _diag_ref(net, x, k))(X.detach())  # (5, 2, 3)
    _same(got, want)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_input_per_sample_last(direction):
    net = _net(width=5)
    XT = torch.randn(3, 4, dtype=DT, requires_grad=True)  # samples along dim 1
    u = net(XT.T).T  # (2, 4): the sample dim last
    got = xa.diagonal(u, XT, order=3, batch_dim=1, direction=direction)
    assert got.shape == (2, 4, 3)
    want = vmap(lambda x: _diag_ref(net, x, 3))(XT.detach().T)  # (4, 2, 3)
    _same(got, want.permute(1, 0, 2))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_input_whole_non_scalar(k, direction):
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)

    def f(z):
        return torch.stack([torch.sin(z).prod(), (torch.tanh(z @ z.T) ** 2).sum(), torch.exp(z[0] * z[1]).sum()])

    got = xa.diagonal(f(x), x, order=k, direction=direction)
    _same(got, _diag_ref(f, x.detach(), k))  # (3, 2, 3)


def test_one_sample():
    net = _net()
    X = torch.randn(1, 3, dtype=DT, requires_grad=True)
    got = xa.diagonal(net(X), X, order=2, batch_dim=0)
    _same(got, vmap(lambda x: _diag_ref(net, x, 2))(X.detach()))  # (1, 2, 3)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_fan_out(direction, batch_dim):
    """A leaf read by two operators (and twice by one): every term that reaches its diagonal is there."""
    torch.manual_seed(1)
    W = torch.randn(4, 4, dtype=DT, requires_grad=True)
    x = torch.randn(3, 4, dtype=DT)

    def f(W):
        h = torch.tanh(x @ W.T)
        return (torch.sin(h @ W) * W[0]).sum(1) + (W * W).sum() * h[:, 0]

    for k in (2, 3):
        got = xa.diagonal(f(W), W, order=k, direction=direction, batch_dim=batch_dim)
        _same(got, _diag_ref(f, W.detach(), k))  # a shared leaf: sample b's row is u_b's


# ------------------------------------------------------------------ parameters


def _per_sample_param_ref(model, loss_of, X, y):
    """Each sample's Hessian diagonal w.r.t. every parameter: vmap over samples of nested jacrev/jacfwd."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = {}
    for name in params:
        def f(p, x, t, name=name):
            return loss_of(functional_call(model, {**params, name: p}, (x[None],)), t[None])[0]
        out[name] = vmap(lambda x, t, name=name: _diag_ref(lambda p: f(p, x, t), params[name], 2))(X, y)
    return out


@pytest.mark.parametrize("direction", ["backward", "forward", "auto"])
def test_parameters_per_sample(direction):
    model = _net(d_in=4, d_out=3, width=5)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))

    def loss_of(out, t):
        return F.cross_entropy(out, t, reduction="none")

    losses = loss_of(model(X), y)
    params = list(model.parameters())
    got = xa.diagonal(losses, params, order=2, batch_dim=0, direction=direction)
    want = _per_sample_param_ref(model, loss_of, X, y)
    for g, (name, p) in zip(got, model.named_parameters()):
        assert g.shape == (6,) + p.shape
        _same(g, want[name])
    # one leaf alone gives the same as its entry among all; a leaf named twice is answered twice
    _same(xa.diagonal(losses, params[0], order=2, batch_dim=0, direction=direction), got[0])
    twice = xa.diagonal(losses, (params[2], params[0], params[2]), order=2, batch_dim=0, direction=direction)
    assert len(twice) == 3
    for g, w in zip(twice, (got[2], got[0], got[2])):
        _same(g, w)


def test_parameters_summed():
    model = _net(d_in=4, d_out=3, width=5)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss = F.cross_entropy(model(X), y, reduction="sum")
    params = {n: p.detach() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        got = xa.diagonal(loss, p, order=2)
        want = _diag_ref(lambda q, name=name: F.cross_entropy(functional_call(model, {**params, name: q}, (X,)), y,
                                                              reduction="sum"), params[name], 2)
        _same(got, want)


def test_parameter_order_3_backward():
    torch.manual_seed(2)
    W = torch.randn(3, 4, dtype=DT, requires_grad=True)
    X = torch.randn(5, 4, dtype=DT)
    losses = torch.sigmoid(X @ W.T).pow(3).sum(1)
    got = xa.diagonal(losses, W, order=3, batch_dim=0, direction="backward")
    want = vmap(lambda x: _diag_ref(lambda w: torch.sigmoid(x @ w.T).pow(3).sum(), W.detach(), 3))(X)
    _same(got, want)


# ------------------------------------------------------------------ chunks, the budget


def _spy(monkeypatch, name):
    calls = []
    real = getattr(budget, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(budget, name, spy)
    return calls


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("record", [False, True])
def test_chunks_of_samples(monkeypatch, direction, record):
    net = _net(width=8)
    X = torch.randn(40, 3, dtype=DT, requires_grad=True)
    u = net(X)
    W = net[2].weight
    whole = xa.diagonal(u, [X, W], order=2, batch_dim=0, direction=direction, create_graph=record)
    calls = _spy(monkeypatch, "_run_in_samples")
    budget_bytes = 300_000 if record else 120_000  # the recorded run keeps its results twice
    chunked = xa.diagonal(u, [X, W], order=2, batch_dim=0, direction=direction, max_memory=budget_bytes,
                          create_graph=record)
    assert calls, "a small budget runs in chunks of samples"
    for a, b in zip(chunked, whole):
        _same(a, b)
    _same(whole[0], vmap(lambda x: _diag_ref(net, x, 2))(X.detach()))
    params = {n: p.detach() for n, p in net.named_parameters()}
    want = vmap(lambda x: _diag_ref(lambda w: functional_call(net, {**params, "2.weight": w}, (x,)), W.detach(),
                                    2))(X.detach())
    _same(whole[1], want)
    if record:  # the chunks' results carry the gradient of the whole
        g1 = torch.autograd.grad(chunked[1].sum() + chunked[0].pow(2).sum(), W, retain_graph=True)[0]
        g2 = torch.autograd.grad(whole[1].sum() + whole[0].pow(2).sum(), W)[0]
        _same(g1, g2)


def test_chunks_of_source_rows(monkeypatch):
    model = _net(d_in=4, d_out=3, width=5)
    X = torch.randn(12, 4, dtype=DT)
    u = model(X)  # (12, 3): 36 source rows
    W = model[0].weight
    whole = xa.diagonal(u, W, order=2, direction="backward", create_graph=False)
    calls = _spy(monkeypatch, "_run_in_chunks")
    chunked = xa.diagonal(u, W, order=2, direction="backward", max_memory=400_000, create_graph=False)
    assert calls, "a small budget runs backprop in chunks of source rows"
    _same(chunked, whole)
    params = {n: p.detach() for n, p in model.named_parameters()}
    _same(whole, _diag_ref(lambda w: functional_call(model, {**params, "0.weight": w}, (X,)), W.detach(), 2))


# ------------------------------------------------------------------ training on a diagonal


def test_gradient_of_a_loss_on_the_diagonal():
    """A PINN-like loss: sum_i c_i d^2u/dx_i^2 against a target, plus the first diagonal squared.

    Its gradient w.r.t. every weight and the coefficients c equals torch.func's, and each term of
    the loss contributes (the gradient without it differs)."""
    net = _net(d_out=1, width=6)
    X = torch.randn(7, 3, dtype=DT, requires_grad=True)
    c = torch.tensor([1.0, -0.5, 2.0], dtype=DT, requires_grad=True)
    target = torch.randn(7, dtype=DT)
    names = [n for n, _ in net.named_parameters()]

    def terms_xa():
        u = net(X)
        d2 = xa.diagonal(u, X, order=2, batch_dim=0)[:, 0]  # (7, 3)
        d1 = xa.diagonal(u, X, order=1, batch_dim=0)[:, 0]
        return ((d2 @ c - target) ** 2).mean(), (d1 ** 2).mean()

    def terms_ref(params, c):
        f = lambda x: functional_call(net, params, (x,))[0]  # noqa: E731
        d2 = vmap(lambda x: _diag_ref(f, x, 2))(X.detach())
        d1 = vmap(lambda x: _diag_ref(f, x, 1))(X.detach())
        return ((d2 @ c - target) ** 2).mean(), (d1 ** 2).mean()

    params = {n: p.detach() for n, p in net.named_parameters()}
    wanted = torch.func.grad(lambda p, c: sum(terms_ref(p, c)), argnums=(0, 1))(params, c.detach())
    t1, t2 = terms_xa()
    _same(t1 + t2, sum(terms_ref(params, c.detach())))
    got = torch.autograd.grad(t1 + t2, list(net.parameters()) + [c], allow_unused=True, materialize_grads=True)
    for g, n in zip(got, names):
        _same(g, wanted[0][n])
    _same(got[-1], wanted[1])
    # each term contributes: the gradient of one term alone is not the whole
    alone = [torch.autograd.grad(t, list(net.parameters()), retain_graph=True, allow_unused=True,
                                 materialize_grads=True) for t in terms_xa()]
    for part in alone:
        assert max((a - b).abs().max().item() for a, b in zip(part, got)) > 1e-6


def test_gradient_of_a_parameter_diagonal():
    """Each sample's Hessian diagonal w.r.t. a weight is differentiable (backward direction) w.r.t. the weights."""
    model = _net(d_in=3, d_out=2, width=4)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    W = model[2].weight
    names = [n for n, _ in model.named_parameters()]

    def penalty_xa():
        losses = F.cross_entropy(model(X), y, reduction="none")
        return xa.diagonal(losses, W, order=2, batch_dim=0, direction="backward").sum(0).pow(2).sum()

    def penalty_ref(params):
        def f(w, x, t):
            return F.cross_entropy(functional_call(model, {**params, "2.weight": w}, (x[None],)), t[None])
        d = vmap(lambda x, t: _diag_ref(lambda w: f(w, x, t), params["2.weight"], 2))(X, y)
        return d.sum(0).pow(2).sum()

    params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = torch.func.grad(penalty_ref)(params)
    got = torch.autograd.grad(penalty_xa(), list(model.parameters()), allow_unused=True, materialize_grads=True)
    for g, n in zip(got, names):
        _same(g, wanted[n])


# ------------------------------------------------------------------ BackPACK


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_backpack(act, loss):
    """Each sample's Hessian diagonal and the summed one, as BackPACK's BatchDiagHessian and DiagHessian give them."""
    backpack = pytest.importorskip("backpack", reason="BackPACK (backpack-for-pytorch, the [peers] extra, which "
                                                      "dev.py installs where it fits this torch) is not importable")
    from backpack.extensions import BatchDiagHessian, DiagHessian

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(8, 5, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (8,))
        per, summed = nn.CrossEntropyLoss(reduction="none"), nn.CrossEntropyLoss(reduction="sum")
    else:
        y = torch.randn(8, 3, dtype=DT)
        per, summed = nn.MSELoss(reduction="none"), nn.MSELoss(reduction="sum")
    theirs = backpack.extend(copy.deepcopy(model))
    with backpack.backpack(BatchDiagHessian(), DiagHessian()):
        backpack.extend(summed)(theirs(X), y).backward()  # reduction sum: each sample's loss, unscaled

    losses = per(model(X), y)
    losses = losses if losses.dim() == 1 else losses.sum(1)  # MSE: one loss per sample
    params = list(model.parameters())
    batch = xa.diagonal(losses, params, order=2, batch_dim=0, create_graph=False)
    total = xa.diagonal(losses.sum(), params, order=2, create_graph=False)
    for q, b, t in zip(theirs.parameters(), batch, total):
        _same(b, q.diag_h_batch)
        _same(t, q.diag_h)


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    u = torch.tanh(x).sum(1)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(xa.QueryError, match="order"):
            xa.diagonal(u, x, order=bad)
    other = torch.randn(3, dtype=DT, requires_grad=True)
    with pytest.raises(xa.TargetError, match="wrt"):
        xa.diagonal(u, other, order=2)
    h = torch.tanh(x)
    with pytest.raises(xa.TargetError, match="wrt .*intermediate"):
        xa.diagonal(h.sum(), h, order=2)
    with pytest.raises(TypeError, match="wrt"):
        xa.diagonal(u, [x, "x"], order=2)
    with pytest.raises(TypeError, match="wrt"):
        xa.diagonal(u, [], order=2)
    with pytest.raises(IndexError, match="batch_dim"):
        xa.diagonal(u, x, order=2, batch_dim=3)
    with pytest.raises(ValueError, match="direction"):
        xa.diagonal(u, x, order=2, direction="sideways")
    with pytest.raises(xa.MemoryBudgetError, match="xa.diagonal"):
        xa.diagonal(u, x, order=2, direction="forward", max_memory=10)
    assert u.grad_fn is not None and x.grad is None  # nothing touched
    u.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_ports_split_differently(monkeypatch, batch_dim):
    """A node reading the leaf twice through ports that split its entries differently ((4, 3) and (12,)):
    the factor's labels are split alike before the positions are tied."""
    from xa import backprop

    torch.manual_seed(4)
    W = torch.randn(4, 3, dtype=DT, requires_grad=True)
    c = torch.randn(5, 12, dtype=DT)
    eye = torch.eye(12, dtype=DT).reshape(4, 3, 12)

    def mul_rule(ctx, slots):  # y = a * b, its b port one label of 12 entries
        lab = xa.LabelMaker()
        i, j = lab.dims(ctx.out_shape)
        flat = lab.new(12)
        a, b = ctx.saved("self"), ctx.saved("other")
        if slots == (0,):
            return lab.factor((i, j), [(i, j)], [(b, (i, j))])
        if slots == (1,):
            return lab.factor((i, j), [(flat,)], [(a, (i, j)), (eye, (i, j, flat))])
        if slots == (0, 1):
            return lab.factor((i, j), [(i, j), (flat,)], [(eye, (i, j, flat))])
        return None

    def f(W):
        return c @ torch.sin(W * W).reshape(12)  # (5,)

    calls = []
    real = backprop._refine
    monkeypatch.setattr(backprop, "_refine", lambda *a: calls.append(1) or real(*a))
    for direction in ("backward", "forward"):
        got = xa.diagonal(f(W), W, order=2, batch_dim=batch_dim, direction=direction,
                          configurations={"MulBackward0": mul_rule})
        want = _diag_ref(f, W.detach(), 2)
        _same(got, want)
    assert calls, "the backward plan split the factor's labels"


def test_the_plan_keeps_only_the_diagonal():
    """Backward, a parameter's block is its diagonal per sample, and no block holds n_W^2 entries per sample;
    explain names the query and both directions' prices."""
    import io

    model = _net(d_in=6, d_out=3, width=5)
    X, y = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    losses = F.cross_entropy(model(X), y, reduction="none")
    W = model[0].weight
    out = io.StringIO()
    plan = xa.explain(losses, query=xa.queries.Pure(W, 2), batch_dim=0, file=out)
    assert "query: diagonal" in out.getvalue() and set(plan.prices) == {"forward", "backward"}
    assert plan.direction == "backward"  # 30 rows of jets cost more than the tied backprop
    (i,) = plan.results
    assert plan.block_shapes[(i, i)] == (4,) + tuple(W.shape)  # (B, *S' (none: one loss each), *W.shape)
    assert max(math.prod(s) for s in plan.block_shapes.values()) < 4 * W.numel() ** 2

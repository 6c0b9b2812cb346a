"""Training through xa: the gradient of a loss built from xa's results, against torch.func's.

Every result xa returns is a function of the tensors torch saved on the
user's graph, so a loss built from it has a gradient w.r.t. every tensor
that requires grad: the network's parameters, the points, query
coefficients and directions. Each test builds a loss from xa's results,
takes its gradient with ``torch.autograd.grad``, and compares it, in float64
to 1e-10 (relative to max(1, |ref|)), with ``torch.func.grad`` of the same
loss written with nested ``jacrev``/``jacfwd`` (and ``vmap`` per sample).
A loss's weights are drawn at random so that every entry, every order and
every leaf contributes; tests of a loss with several terms check each
term's share of ``.grad``, not only the total.
"""

from __future__ import annotations

import gc
import io
import warnings
import weakref
from unittest.mock import patch

import pytest
import test_composite
import test_extend
import test_operators
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import DEVICE, nested
from test_batched import MLP
from test_random_graphs import SETTINGS, build
from torch.func import functional_call, jacfwd, jacrev, vmap

import xa
import xa.composite
from xa import attach, execute, queries

DTYPE = torch.float64
TOL = 1e-10


# ====================================================================== references


def ref_grad(loss, args):
    """``torch.func.grad`` of ``loss(*args)`` w.r.t. every argument."""
    detached = [a.detach() for a in args]
    return torch.func.grad(loss, argnums=tuple(range(len(args))))(*detached)


def nested_autograd(f, args, i, order):
    """:func:`nested` by nested ``torch.autograd.grad(create_graph=True)``: the second reference, for ops whose
    torch.func derivatives fail (vector_norm and std modify a saved tensor in place under torch.func; glu has
    no forward-mode derivative of its backward)."""
    x = args[i]
    y = f(*args[:i], x, *args[i + 1:]).reshape(-1)
    out, rows = [], y  # rows: the entries of the current derivative, flattened, as functions of x
    for _ in range(order):
        grads = [torch.autograd.grad(r, x, create_graph=True, allow_unused=True, materialize_grads=True)[0]
                 for r in rows]
        d = torch.stack(grads).reshape(tuple(y.shape) + (x.numel(),) * (len(out) + 1))
        out.append(d)
        rows = d.reshape(-1)
    return out


def ref_grad_autograd(f, args, order, C, ref_f):
    """The gradient of the same loss through :func:`nested_autograd`."""
    xs = [a.detach().clone().requires_grad_(True) for a in args]
    total = 0.0
    for i in range(len(xs)):
        for k, d in enumerate(nested_autograd(ref_f, xs, i, order)):
            total = total + (d.reshape(C[i * order + k].shape) * C[i * order + k]).sum()
    return grads(total, xs)


def error(got, want) -> float:
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    if not want.numel():
        return 0.0
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def assert_grads(got, want, tol=TOL, what=""):
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f"{what}: argument {n} got no gradient"
        err = error(g, w)
        assert err <= tol, f"{what}: gradient of argument {n} off by {err:.3e} (tolerance {tol:.0e})"


def grads(loss, args):
    """The gradient of ``loss`` w.r.t. ``args``; zeros where it does not depend on them (as torch.func gives)."""
    if not loss.requires_grad:  # a derivative that is a constant (relu's first): torch's autograd gives none
        return [torch.zeros_like(a) for a in args]
    return torch.autograd.grad(loss, args, allow_unused=True, materialize_grads=True)


def weights(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DTYPE).to(DEVICE) for s in shapes]


def fresh(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ====================================================================== random programs


def check_program(f, leaves, order, ref_f=None, **kwargs):
    """Loss ``sum_i sum_k <C_ik, leaf_i.xgrad[k]>``: its gradient w.r.t. every leaf against torch.func.

    ``ref_f``: the same function written out for the reference, where torch's own derivatives of ``f``
    are wrong at the orders the gradient needs.
    """
    ref_f = f if ref_f is None else ref_f
    ls = fresh(leaves)
    y = f(*ls)
    s = y.numel()
    C = weights([(s,) + (x.numel(),) * k for x in ls for k in range(1, order + 1)], seed=order)
    xa.backward(y, order, **kwargs)
    loss = sum((x.xgrad[k] * C[i * order + k]).sum() for i, x in enumerate(ls) for k in range(order))
    got = grads(loss, ls)

    def ref(*args):
        total = 0.0
        for i in range(len(args)):
            for k, d in enumerate(nested(ref_f, args, i, order)):
                total = total + (d.reshape(C[i * order + k].shape) * C[i * order + k]).sum()
        return total

    try:
        want = ref_grad(ref, ls)
    except (RuntimeError, NotImplementedError):  # torch.func cannot differentiate it: nested autograd can
        want = ref_grad_autograd(f, ls, order, C, ref_f)
    assert_grads(got, want, what=f"order {order}, {kwargs}")


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), order=st.integers(1, 3), direction=st.sampled_from(["backward", "forward"]))
def test_random_program_gradients(data, order, direction):
    """Random graphs (fan-out, non-scalar sources, several leaves): the gradient of a loss of every ``.xgrad``."""
    n_ops = data.draw(st.integers(1, 4), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=data.draw(st.integers(1, 2)), max_leaves=3, n_ops=n_ops)
    check_program(f, leaves, order, direction=direction)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), order=st.integers(1, 4), direction=st.sampled_from(["backward", "forward"]))
def test_recorded_and_plain_runs_give_the_same_numbers(data, order, direction):
    """Recorded (out of place, for autograd) and plain (in place) execution: bit for bit the same ``.xgrad``."""
    n_ops = data.draw(st.integers(1, 5 if order <= 2 else 3), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=data.draw(st.integers(1, 2)), max_leaves=3, n_ops=n_ops)
    ls = fresh(leaves)
    y = f(*ls)
    xa.backward(y, order, direction=direction, create_graph=False)
    plain = [[t.clone() for t in x.xgrad] for x in ls]
    xa.backward(y, order, direction=direction)
    for x, want in zip(ls, plain):
        for got, w in zip(x.xgrad, want):
            assert torch.equal(got.detach(), w)


@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_random_program_gradients_order_4(data):
    f, leaves, _ = build(data, order=4, n_initial=1, max_leaves=2, n_ops=data.draw(st.integers(1, 3)))
    check_program(f, leaves, 4, direction=data.draw(st.sampled_from(["backward", "forward"])))


def test_fan_out_non_scalar_source_chunked_and_whole():
    """``x * tanh(W x) + x``, a vector source, in chunks of source rows and whole: the same gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, generator=g, dtype=DTYPE)
    W = torch.randn(4, 4, generator=g, dtype=DTYPE)

    def f(x, W):
        return x * torch.tanh(W @ x) + x

    check_program(f, [x, W], 3, direction="backward")
    ls = fresh([x, W])
    whole = xa.backward(f(*ls), 3, direction="backward")
    results = sum(t.numel() * t.element_size() for leaf in ls for t in leaf.xgrad)
    budget = results + whole.plan.tape_bytes // 2
    assert xa.backward(f(*ls), 3, direction="backward", max_memory=budget).plan.tape_bytes < whole.plan.tape_bytes
    check_program(f, [x, W], 3, direction="backward", max_memory=budget)


# ====================================================================== every rule

# torch.func's own gradient of these is not a number where the function is identically zero: checked apart
REFERENCE_NAN = {"prod with zero"}
# torch's own derivatives of layer and batch norm are wrong beyond the first (a loss of their first
# derivatives already differs from the written-out formula's): test_composite_gradients checks them
# against the written-out formulas instead.
TORCH_WRONG = ("layer_norm", "LayerNorm", "batch_norm", "BatchNorm")
OPERATOR_CASES = [c for c in test_operators.CASES
                  if c[0] not in REFERENCE_NAN and not any(w in c[0] for w in TORCH_WRONG)]
# torch's own third derivatives of solve are wrong: here a loss of its first derivatives (test_composite_gradients
# has the second, against inv(A) @ b)
THIRD_ORDER_WRONG = ("linalg.solve",)


@pytest.mark.parametrize("case", OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES])
def test_operator_gradients(case):
    """Every rule's samples: the gradient of a loss of ``.xgrad`` (orders up to 2) w.r.t. every input.

    A rule computes its factors from what torch saved with differentiable torch ops, never from
    detached copies or Python numbers read off a tensor; this is where one that does shows.
    """
    name, f, shapes, order, *domain = case
    inputs = [x.to(DEVICE) for x in test_operators._inputs(name, shapes, domain[0] if domain else None)]
    top = 1 if any(w in name for w in THIRD_ORDER_WRONG) else 2
    check_program(f, inputs, min(order, top), direction="backward")


@pytest.mark.parametrize("expand", [True, False], ids=["pieces", "small nodes whole"])
@pytest.mark.parametrize("case", test_composite.CASES, ids=[c[0] for c in test_composite.CASES])
def test_composite_gradients(case, expand, monkeypatch):
    """Composites (softmax, norms, attention, solve) as pieces, and small ones whole (their dense rules):
    against the written-out formula, where torch's own third derivatives are wrong."""
    if expand:
        monkeypatch.setattr(xa.composite, "DENSE_LIMIT", 0)
    name, f, ref, shapes, order = case
    for direction in ("backward", "forward"):
        check_program(f, test_composite._inputs(name, shapes), min(order, 2), ref_f=ref, direction=direction)


def test_prod_with_a_zero_factor_has_a_zero_gradient():
    """``prod(x * [1, 0, 1, 1])`` is zero everywhere: every derivative, and its gradient, is zero (not NaN)."""
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DTYPE)
    (x,) = fresh([torch.randn(4, dtype=DTYPE)])
    xa.backward((x * mask).prod(), 3)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in x.xgrad)
    loss = sum((t * c).sum() for t, c in zip(x.xgrad, weights([t.shape for t in x.xgrad], seed=3)))
    (g,) = grads(loss, [x])
    assert torch.equal(g, torch.zeros_like(g))


# ====================================================================== networks, per sample


torch.manual_seed(0)
NET = MLP([2, 8, 8, 1]).double().to(DEVICE)
NET3 = MLP([3, 6, 6, 1]).double().to(DEVICE)


def points(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, d, generator=g, dtype=DTYPE) * 2 - 1).to(DEVICE)


def params_of(net):
    return {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}


def per_point(net, order_fn):
    """``order_fn(u, x)`` of one point's ``u = net(x)`` (``x`` of shape ``(d,)``), vmapped over the points."""

    def one(p, x):
        return order_fn(lambda z: functional_call(net, p, (z[None],))[0, 0], x)

    return vmap(one, in_dims=(None, 0))


def lap_ref(u, x):
    return torch.func.hessian(u)(x).diagonal().sum()


def biharmonic_ref(u, x):
    H4 = jacfwd(jacfwd(torch.func.hessian(u)))(x)
    return torch.einsum("iijj->", H4)


def check_pinn(net, X, xa_residual, ref_residual, seed=0, with_points=True):
    """``mean((r - f)^2)`` for xa's residual ``r``: the gradient w.r.t. every parameter (and the points)."""
    p = params_of(net)
    names = list(p)
    Xl = X.detach().clone().requires_grad_(True)
    u = functional_call(net, p, (Xl,))
    r = xa_residual(u, Xl)
    assert r.grad_fn is not None, "the residual carries no gradient"
    target = weights([tuple(r.shape)], seed)[0]
    loss = ((r - target) ** 2).mean()
    wrt = [p[n] for n in names] + ([Xl] if with_points else [])
    got = grads(loss, wrt)

    def ref(*args):
        q = dict(zip(names, args[:len(names)]))
        x = args[len(names)] if with_points else X
        rr = per_point(net, ref_residual)(q, x).reshape(r.shape)
        return ((rr - target) ** 2).mean()

    want = ref_grad(ref, wrt)
    assert_grads(got, want, what="pinn")
    return loss


@pytest.mark.parametrize("direction", ["forward", "backward", "auto"])
@pytest.mark.parametrize("batch_dim", [0, -1])
def test_laplacian_residual(direction, batch_dim):
    """Poisson: ``mean((Δu - f)^2)``, points first (``u`` of shape (B, 1)) and last (``(1, B)``)."""
    X = points(16, 2)

    def residual(u, x):
        if batch_dim == -1:
            return xa.laplacian(u.T, x, batch_dim=-1, direction=direction).T
        return xa.laplacian(u, x, batch_dim=0, direction=direction)

    check_pinn(NET, X, residual, lap_ref)


def test_heat_operator_residual():
    """``u_t - 0.1 u_xx`` by ``differential_operator`` with an entry dict, points (t, x)."""
    X = points(12, 2, seed=1)
    ops = {1: {(0,): 1.0}, 2: {(1, 1): -0.1}}

    def ref(u, x):
        g = torch.func.grad(u)(x)
        return g[0] - 0.1 * torch.func.hessian(u)(x)[1, 1]

    check_pinn(NET, X, lambda u, x: xa.differential_operator(u, x, ops, batch_dim=0), ref)


def test_kdv_residual_from_partials():
    """KdV: ``u_t + 6 u u_x + u_xxx`` from ``xa.partials``, where ``u`` itself is in the loss too."""
    X = points(10, 2, seed=2)

    def residual(u, x):
        u_t, u_x, u_xxx = xa.partials(u, x, [(0,), (1,), (1, 1, 1)], batch_dim=0)
        return u_t + 6 * u * u_x + u_xxx

    def ref(u, x):
        g = torch.func.grad(u)(x)
        d3 = jacfwd(jacfwd(torch.func.grad(u)))(x)
        return g[0] + 6 * u(x) * g[1] + d3[1, 1, 1]

    check_pinn(NET, X, residual, ref)


def test_biharmonic_residual():
    X = points(6, 2, seed=3)
    check_pinn(NET, X, lambda u, x: xa.biharmonic(u, x, batch_dim=0), biharmonic_ref)


def test_laplacian_in_chunks_of_samples():
    """A budget below the recorded plan: chunks of samples, each done again in the backward; same gradient."""
    X = points(24, 3, seed=4)
    Xl = X.clone().requires_grad_(True)
    plan = xa.explain(NET3(Xl), query=queries.Laplacian(Xl), batch_dim=0, direction="backward", file=io.StringIO())
    budget = (plan.tape_bytes + plan.result_elements * plan.itemsize) // 3
    runs = []

    def residual(u, x):
        return xa.laplacian(u, x, batch_dim=0, direction="backward", max_memory=budget)

    def counted(*args, real=execute.run, **kwargs):
        runs.append(args[0].batch.size)
        return real(*args, **kwargs)

    with patch.object(execute, "run", counted):
        check_pinn(NET3, X, residual, lap_ref)
    # the chunks ran in the call, and each once more in the backward (the reference's runs are torch.func's)
    chunks = len(runs) // 2
    assert chunks > 1 and len(runs) == 2 * chunks and max(runs) < 24 and sum(runs[:chunks]) == 24, runs


def test_coefficients_and_directions_that_require_grad():
    """A dense coefficient tensor and a direction that require grad get their gradients too."""
    X = points(8, 2, seed=5)
    p = params_of(NET)
    names = list(p)
    g = torch.Generator().manual_seed(6)
    A = torch.randn(2, 2, generator=g, dtype=DTYPE).requires_grad_(True)
    v = torch.randn(2, generator=g, dtype=DTYPE).requires_grad_(True)
    Xl = X.clone().requires_grad_(True)
    u = functional_call(NET, p, (Xl,))
    op = xa.differential_operator(u, Xl, {2: A}, batch_dim=0)
    d1, d2 = xa.directional(u, Xl, v, order=2, batch_dim=0)
    loss = (op ** 2).sum() + (d2 * d1).sum()
    wrt = [p[n] for n in names] + [Xl, A, v]
    got = grads(loss, wrt)

    def ref(*args):
        q = dict(zip(names, args[:len(names)]))
        x, A_, v_ = args[len(names):]

        def one(x1):
            uf = lambda z: functional_call(NET, q, (z[None],))[0, 0]  # noqa: E731
            H = torch.func.hessian(uf)(x1)
            gr = torch.func.grad(uf)(x1)
            return (A_ * H).sum(), gr @ v_, v_ @ H @ v_

        o, e1, e2 = vmap(one)(x)
        return (o ** 2).sum() + (e2 * e1).sum()

    assert_grads(got, ref_grad(ref, wrt), what="coefficients")
    assert got[-1].abs().max() > 0 and got[-2].abs().max() > 0


def test_double_backward_hessian_vector_product():
    """A Hessian-vector product of a PINN loss w.r.t. the parameters (Newton-CG, Hessian-free)."""
    X = points(8, 2, seed=7)
    p = params_of(NET)
    names = list(p)
    vec = weights([p[n].shape for n in names], seed=8)
    Xl = X.clone().requires_grad_(True)
    u = functional_call(NET, p, (Xl,))
    loss = (xa.laplacian(u, Xl, batch_dim=0) ** 2).mean()
    g = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True, allow_unused=True,
                            materialize_grads=True)
    hv = grads(sum((a * b).sum() for a, b in zip(g, vec)), [p[n] for n in names])

    def loss_ref(*args):
        q = dict(zip(names, args))
        return (per_point(NET, lap_ref)(q, X) ** 2).mean()

    def gv(*args):
        gr = torch.func.grad(loss_ref, argnums=tuple(range(len(args))))(*args)
        return sum((a * b).sum() for a, b in zip(gr, vec))

    want = ref_grad(gv, [p[n] for n in names])
    assert_grads(hv, want, what="Hessian-vector product")


def test_no_grad_and_create_graph_false_record_nothing():
    """Under ``torch.no_grad()`` and with ``create_graph=False``: the same numbers, no ``grad_fn``."""
    X = points(8, 2, seed=9).requires_grad_(True)
    u = NET(X)
    recorded = xa.laplacian(u, X, batch_dim=0)
    with torch.no_grad():
        plain = xa.laplacian(u, X, batch_dim=0)
    off = xa.laplacian(u, X, batch_dim=0, create_graph=False)
    assert recorded.grad_fn is not None and plain.grad_fn is None and off.grad_fn is None
    assert torch.equal(recorded.detach(), plain) and torch.equal(plain, off)
    xa.backward(u, 2, batch_dim=0, create_graph=False)
    assert all(t.grad_fn is None for t in X.xgrad)
    plain_xgrad = [t.clone() for t in X.xgrad]
    xa.backward(u, 2, batch_dim=0)
    assert all(t.grad_fn is not None for t in X.xgrad)
    assert all(torch.equal(a.detach(), b) for a, b in zip(X.xgrad, plain_xgrad))
    with pytest.raises(TypeError, match="create_graph"):
        xa.laplacian(u, X, batch_dim=0, create_graph="yes")


def test_data_term_and_xa_term_each_contribute():
    """``loss = data + pde``: ``.grad`` minus the data term's own gradient is the PDE term's, as torch.func says."""
    X = points(10, 2, seed=10)
    Xb = points(6, 2, seed=11)
    p = params_of(NET)
    names = list(p)
    data = weights([(6, 1)], seed=12)[0]
    Xl = X.clone().requires_grad_(True)
    u = functional_call(NET, p, (Xl,))
    pde = (xa.laplacian(u, Xl, batch_dim=0) ** 2).mean()
    fit = ((functional_call(NET, p, (Xb,)) - data) ** 2).mean()
    (pde + fit).backward()
    total = [p[n].grad.clone() for n in names]
    fit_only = grads(((functional_call(NET, p, (Xb,)) - data) ** 2).mean(), [p[n] for n in names])
    share = [a - b for a, b in zip(total, fit_only)]

    def pde_ref(*args):
        q = dict(zip(names, args))
        return (per_point(NET, lap_ref)(q, X) ** 2).mean()

    want = ref_grad(pde_ref, [p[n] for n in names])
    assert_grads(share, want, tol=1e-9, what="the PDE term's share")
    assert max(w.abs().max().item() for w in want[:-1]) > 1e-3  # the PDE term does move the weights


def test_per_sample_hessian_penalty():
    """A penalty on per-sample Hessians w.r.t. a weight (``.xgrad`` with ``batch_dim``), trained on."""
    g = torch.Generator().manual_seed(13)
    W = torch.randn(3, 4, generator=g, dtype=DTYPE)
    X = torch.randn(5, 4, generator=g, dtype=DTYPE)
    labels = torch.tensor([0, 2, 1, 1, 0])

    def per_sample_loss(W, X):
        return F.cross_entropy(torch.tanh(X @ W.T), labels, reduction="none")

    Wl, Xl = fresh([W, X])
    xa.backward(per_sample_loss(Wl, Xl), 2, batch_dim=0)
    penalty = (Wl.xgrad[1] ** 2).sum() + (Xl.xgrad[1] ** 2).sum()
    got = grads(penalty, [Wl, Xl])

    def ref(W, X):
        def one(w, x, lab):
            return F.cross_entropy(torch.tanh(x[None] @ w.T), lab[None])

        Hw = vmap(torch.func.hessian(one, argnums=0), in_dims=(None, 0, 0))(W, X, labels)
        Hx = vmap(torch.func.hessian(one, argnums=1), in_dims=(None, 0, 0))(W, X, labels)
        return (Hw ** 2).sum() + (Hx ** 2).sum()

    assert_grads(got, ref_grad(ref, [W, X]), what="per-sample Hessian penalty")


def test_retained_partials_and_mixed_blocks():
    """``Superset.operator_partials`` of an intermediate and ``xa.mixed`` blocks carry gradients too."""
    g = torch.Generator().manual_seed(14)
    A = torch.randn(3, 3, generator=g, dtype=DTYPE)
    x = torch.randn(3, generator=g, dtype=DTYPE)
    C = weights([(1, 3, 3), (1, 9, 3), (1, 3)], seed=15)

    def parts(A, x):
        h = torch.tanh(A @ x)
        return h, (h * h).sum() + (torch.sin(h) * x).sum()

    Al, xl = fresh([A, x])
    h, s = parts(Al, xl)
    sup = xa.Superset(s).retain_partials(h)
    sup.backward(2)
    Hh = sup.operator_partials(h)[1]
    HAx = xa.mixed(s, (Al, xl))
    loss = (Hh * C[0]).sum() + (HAx * C[1]).sum() + (sup.operator_partials(h)[0] * C[2]).sum()
    got = grads(loss, [Al, xl])

    def ref(A, x):
        def through_h(hh):
            return (hh * hh).sum() + (torch.sin(hh) * x).sum()

        hh = torch.tanh(A @ x)
        Hh_ = torch.func.hessian(through_h)(hh)
        dh = torch.func.grad(through_h)(hh)
        HAx_ = jacfwd(torch.func.grad(lambda a, z: parts(a, z)[1], argnums=0), argnums=1)(A, x)
        return (Hh_.reshape(1, 3, 3) * C[0]).sum() + (HAx_.reshape(1, 9, 3) * C[1]).sum() + \
            (dh.reshape(1, 3) * C[2]).sum()

    assert_grads(got, ref_grad(ref, [A, x]), what="retained and mixed")


def test_composite_softmax_fallback_and_user_rule():
    """Gradients through a composite (softmax), the generic fallback (``logaddexp``) and a user's own rule."""
    from xa.extend import elementwise, register, unregister

    register("CubeBackward", elementwise(test_extend._cube), override=True)
    try:
        _check_composite_fallback_and_user_rule(test_extend.Cube)
    finally:
        unregister("CubeBackward")


def _check_composite_fallback_and_user_rule(Cube):  # noqa: N803
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, generator=g, dtype=DTYPE)
    W = torch.randn(6, 6, generator=g, dtype=DTYPE)

    def f(x, W):
        h = torch.softmax(W @ x, 0)
        return torch.logaddexp(h, torch.tanh(x)) + Cube.apply(h)

    def f_ref(x, W):
        h = torch.softmax(W @ x, 0)
        return torch.logaddexp(h, torch.tanh(x)) + h ** 3

    for direction in ("backward", "forward"):
        ls = fresh([x, W])
        xa.backward(f(*ls), 2, direction=direction)
        C = weights([(6, 6), (6, 6, 6), (6, 36), (6, 36, 36)], seed=17)
        loss = sum((t * c).sum() for t, c in zip(list(ls[0].xgrad) + list(ls[1].xgrad), C))
        got = grads(loss, ls)

        def ref(x, W, C=C):
            dx = nested(f_ref, [x, W], 0, 2)
            dW = nested(f_ref, [x, W], 1, 2)
            return sum((d.reshape(c.shape) * c).sum() for d, c in zip(dx + dW, C))

        assert_grads(got, ref_grad(ref, [x, W]), what=f"composite/fallback/user rule, {direction}")


# ====================================================================== xa on xa


def test_xa_differentiates_its_own_laplacian():
    """``xa.backward(residual, 1, batch_dim=0)`` on ``residual = Δu - f``: each point's Jacobian w.r.t. every
    parameter, ``(B, 1, P)`` (Gauss-Newton), and at order 2 its per-point Hessian, against ``vmap(jacrev)``."""
    X = points(5, 2, seed=18)
    p = params_of(NET)
    names = list(p)
    Xl = X.clone().requires_grad_(True)
    u = functional_call(NET, p, (Xl,))
    residual = xa.laplacian(u, Xl, batch_dim=0) - torch.sin(Xl[:, :1])
    xa.backward(residual, 2, batch_dim=0)

    def one(q, x):
        return per_point(NET, lap_ref)(q, x[None])[0] - torch.sin(x[0])

    J = vmap(jacrev(one), in_dims=(None, 0))(p, X)
    H = vmap(torch.func.hessian(one), in_dims=(None, 0))(p, X)
    reached = [n for n in names if hasattr(p[n], "xgrad")]
    assert reached == names[:-1]  # the last bias does not change the Laplacian
    assert J[names[-1]].abs().max() == 0
    for n in reached:
        P = p[n].numel()
        got1, got2 = p[n].xgrad
        assert error(got1, J[n].reshape(5, 1, P)) <= TOL, n
        assert error(got2, H[n][n].reshape(5, 1, P, P)) <= TOL, n


# ====================================================================== .xgrad and its leaf


def _fresh_leaf_with_xgrad(create_graph):
    X = points(6, 2, seed=20).requires_grad_(True)
    xa.backward(NET(X), 2, batch_dim=0, target=X, create_graph=create_graph)
    assert (X.xgrad[1].grad_fn is not None) == bool(create_graph)
    return weakref.ref(X)


def test_a_recorded_xgrad_and_its_leaf_are_freed_by_clear_partials():
    """A recorded ``.xgrad``'s graph holds its leaf: the two live until ``.xgrad`` goes; plain data does not."""
    plain = _fresh_leaf_with_xgrad(False)
    gc.collect()
    assert plain() is None
    recorded = _fresh_leaf_with_xgrad(True)
    gc.collect()
    assert recorded() is not None and hasattr(recorded(), "xgrad")
    assert xa.clear_partials() >= 1
    gc.collect()
    assert recorded() is None


def test_recorded_xgrad_piling_up_on_fresh_tensors_warns_once(monkeypatch):
    monkeypatch.setitem(attach._WARNED, "cycle", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(attach.CYCLES_BEFORE_WARNING + 2):
            _fresh_leaf_with_xgrad(True)
    said = [w for w in caught if "keep each other alive" in str(w.message)]
    assert len(said) == 1 and "clear_partials" in str(said[0].message)
    assert said[0].filename == __file__  # it points at the caller of xa.backward
    with warnings.catch_warnings(record=True) as caught:  # parameters: overwritten each step, no pile-up
        warnings.simplefilter("always")
        monkeypatch.setitem(attach._WARNED, "cycle", False)
        xa.clear_partials()
        for _ in range(attach.CYCLES_BEFORE_WARNING + 2):
            xa.backward(NET(points(4, 2)), 1, batch_dim=0)
    assert not [w for w in caught if "keep each other alive" in str(w.message)]

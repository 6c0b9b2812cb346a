"""The query API beyond the Laplacian: chosen partials, differential operators, biharmonic, directional jets and
mixed partials across leaves, each against torch.func in float64 at orders up to 4.

- random programs of ``test_random_graphs`` (fan-out, broadcasting, non-scalar sources), unbatched, in both
  directions, with ``"auto"`` checked too;
- per-sample queries (``batch_dim``) on small PINN-like networks against ``torch.func.vmap`` of per-point
  references, with the sample dim first and last, whole and in chunks of samples;
- soundness of the plan cache: the same structure with other values (coefficients, directions, points) gives
  each call its own answer;
- errors: typed, and the user's tensors left as they were.

The references: nested ``jacrev``/``jacfwd`` for the derivative tensors, nested ``torch.func.jvp`` for the
directional jets, ``hessian(argnums=...)`` (and nested ``jacfwd``) for the mixed partials.
"""

from __future__ import annotations

import io
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
from hypothesis import given, note, settings
from hypothesis import strategies as st
from reference import DEVICE
from test_random_graphs import SETTINGS, build
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import xa
from xa import execute
from xa import plan as planner
from xa.queries import Diagonal, RankOne

DTYPE = torch.float64
TOL = 1e-9
DIRECTIONS = ("forward", "backward")
ALL_DIRECTIONS = DIRECTIONS + ("auto",)  # "auto" (the cheaper of the two) must agree as well


# ====================================================================== helpers and references


def close(got, want, what=""):
    """``got`` is a float64 tensor of ``want``'s shape, within TOL of it relative to max(1, |want|)."""
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, not a tensor"
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0
    assert err <= TOL, f"{what}: error {err:.2e}"


def derivatives(f, x, order):
    """``[D_1, .., D_order]``: ``D_k`` of shape ``(s, n, .., n)``, the k-th derivative of ``f(x).flatten()``."""
    x = x.detach()
    s, n = f(x).numel(), x.numel()
    g = jacrev(lambda z: f(z).reshape(-1))
    out = [g(x)]
    for _ in range(1, order):
        g = jacfwd(g)
        out.append(g(x))
    return [d.reshape((s,) + (n,) * (k + 1)) for k, d in enumerate(out)]


def partial_of(D, a, shape):
    """``d^k S / dx_(a_1) .. dx_(a_k)`` shaped ``shape``, from the derivative tensors ``D``."""
    return D[len(a) - 1][(slice(None),) + tuple(a)].reshape(shape)


def apply_operator(D, dense: dict, shape):
    """``sum_k sum C_k[i..] D_k[:, i..]`` for dense coefficient tensors ``{k: C_k}``, shaped ``shape``."""
    total = torch.zeros(D[0].shape[0], dtype=DTYPE, device=D[0].device)
    for k, C in dense.items():
        total = total + torch.tensordot(D[k - 1], C, dims=k)
    return total.reshape(shape)


def biharmonic_of(D4, shape):
    n = D4.shape[1]
    return sum(D4[:, i, i, j, j] for i in range(n) for j in range(n)).reshape(shape)


def jvp_jet(f, x, v, k):
    """``d^k f(x) [v, .., v]`` by nesting ``torch.func.jvp`` ``k`` times (``v`` shaped like ``x``)."""
    g = f
    for _ in range(k):
        g = (lambda h: lambda z: jvp(h, (z,), (v,))[1])(g)
    return g(x.detach())


def directional_reference(f, x, V, order):
    """``[d^k f(x)[v, .., v]]_k`` for each row of ``V`` (``(m, n)``): ``(m, *S.shape)`` per order."""
    return [torch.stack([jvp_jet(f, x, v.reshape(x.shape), k) for v in V]) for k in range(1, order + 1)]


def one_leaf(f, leaves, i):
    """``f`` as a function of its ``i``-th argument, the others fixed at ``leaves``."""
    def fi(z):
        args = list(leaves)
        args[i] = z
        return f(*args)
    return fi


def program(data, order, max_ops=5):
    """A random program of one or two leaves; ``(f, leaves, copies that require grad, y = f(*copies))``."""
    f, leaves, _ = build(data, order=order, n_initial=data.draw(st.integers(1, 2), label="n_initial"),
                         max_leaves=2, n_ops=data.draw(st.integers(1, max_ops if order <= 2 else 4), label="n_ops"))
    leaves = [x.to(DEVICE) for x in leaves]
    xs = [x.detach().clone().requires_grad_(True) for x in leaves]
    return f, leaves, xs, f(*xs)


def program_and_leaf(data, order=None):
    """:func:`program` at a drawn order (1..4) or ``order``, and the leaf asked about:
    ``(order, f, leaves, xs, y, i)``."""
    if order is None:
        order = data.draw(st.integers(1, 4), label="order")
    f, leaves, xs, y = program(data, order)
    return order, f, leaves, xs, y, data.draw(st.integers(0, len(xs) - 1), label="leaf")


def coefficient(kind, k, n, gen, keys=()):
    """``(what xa takes, its dense tensor (n,)*k)`` for a coefficient of order ``k``, values drawn from ``gen``.

    ``keys`` (kind "entries"): the multi-indices named, unsorted, maybe two orderings of one entry; an int
    stands for ``(i,)``.
    """
    rand = lambda *shape: (torch.rand(shape, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    if kind == "dense":
        C = rand(*(n,) * k)
        return C, C
    C = torch.zeros((n,) * k, dtype=DTYPE, device=DEVICE)
    if kind in ("diagonal number", "diagonal vector"):
        c = rand(n) if kind == "diagonal vector" else float(rand(1).item())
        i = torch.arange(n, device=DEVICE)
        C[(i,) * k] = torch.as_tensor(c, dtype=DTYPE, device=DEVICE).expand(n)
        return Diagonal(c), C
    if kind == "rank one vector":
        v = rand(n)
        return RankOne(v), _power(v, k)
    if kind.startswith("rank one matrix"):  # "rank one matrix r"
        V = rand(int(kind.split()[-1]), n)
        return RankOne(V), sum(_power(v, k) for v in V)
    entries = {}
    for a in keys:
        value = float(rand(1).item())
        C[(a,) if isinstance(a, int) else a] += value
        entries[a] = value
    return entries, C


def _power(v, k):
    """``v ⊗ .. ⊗ v``, ``k`` times."""
    t = v
    for _ in range(1, k):
        t = torch.tensordot(t, v, dims=0)
    return t


KINDS = ("dense", "diagonal number", "diagonal vector", "rank one vector", "rank one matrix 1", "rank one matrix 3",
         "entries")


def draw_structure(data, order, n):
    """A random operator's structure: ``[(k, kind, keys)]`` for a nonempty set of orders up to ``order``."""
    out = []
    for k in sorted(data.draw(st.sets(st.integers(1, order), min_size=1), label="orders")):
        kind = data.draw(st.sampled_from(KINDS), label=f"kind of order {k}")
        keys = ()
        if kind == "entries":
            keys = data.draw(st.lists(st.tuples(*[st.integers(0, n - 1)] * k), min_size=1, max_size=4,
                                      unique=True), label=f"entries of order {k}")
            keys = [a[0] if k == 1 and data.draw(st.booleans(), label="int key") else a for a in keys]
        out.append((k, kind, keys))
    return out


def coefficients_of(structure, n, gen):
    """``({k: C_k as xa takes it}, {k: dense C_k})`` for ``structure``, with values drawn from ``gen``."""
    given_, dense = {}, {}
    for k, kind, keys in structure:
        given_[k], dense[k] = coefficient(kind, k, n, gen, keys)
    return given_, dense


# ====================================================================== random programs, unbatched


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_random_program_partials(direction, data):
    order, f, leaves, xs, y, i = program_and_leaf(data)
    n = xs[i].numel()
    multi = st.integers(1, order).flatmap(lambda k: st.tuples(*[st.integers(0, n - 1)] * k))
    indices = data.draw(st.lists(multi, min_size=1, max_size=4), label="indices")
    asked = [a[0] if len(a) == 1 and data.draw(st.booleans(), label="as int") else a for a in indices]
    D = derivatives(one_leaf(f, leaves, i), leaves[i], order)
    got = xa.partials(y, xs[i], asked, direction=direction)
    assert isinstance(got, tuple) and len(got) == len(indices)
    for g, a in zip(got, indices):
        close(g, partial_of(D, a, y.shape), f"d^{len(a)}/dx{a}")
    assert not hasattr(xs[i], "xgrad")


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_random_program_operator(direction, data):
    order, f, leaves, xs, y, i = program_and_leaf(data)
    n = xs[i].numel()
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="coefficient seed"))
    structure = draw_structure(data, order, n)
    D = derivatives(one_leaf(f, leaves, i), leaves[i], order)
    coefficients, dense = coefficients_of(structure, n, gen)
    note(f"coefficients: {coefficients}")
    close(xa.differential_operator(y, xs[i], coefficients, direction=direction), apply_operator(D, dense, y.shape),
          "operator")
    # the same structure with other values: the plan is the cached one, the answer this call's
    coefficients, dense = coefficients_of(structure, n, gen)
    close(xa.differential_operator(y, xs[i], coefficients, direction=direction), apply_operator(D, dense, y.shape),
          "operator, other values")


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_random_program_directional(direction, data):
    order, f, leaves, xs, y, i = program_and_leaf(data)
    x = xs[i]
    n = x.numel()
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="direction seed"))
    m = data.draw(st.integers(1, 3), label="m")
    layout = data.draw(st.sampled_from(["single", "rows", "leaf-shaped"] if x.dim() else ["single", "rows"]))
    V = (torch.rand(m, n, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    fi = one_leaf(f, leaves, i)
    for values in (V, -0.5 * V.flip(0) + 0.25):  # a second call: same structure, other directions
        want = directional_reference(fi, leaves[i], values[:1] if layout == "single" else values, order)
        if layout == "single":
            asked, want = values[0], [w[0] for w in want]
        else:
            asked = values if layout == "rows" else values.reshape((m,) + tuple(x.shape))
        got = xa.directional(y, x, asked, order=order, direction=direction)
        assert isinstance(got, tuple) and len(got) == order
        for k in range(order):
            close(got[k], want[k], f"{layout} d^{k + 1}S[v..v]")


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_random_program_biharmonic(direction, data):
    _, f, leaves, xs, y, i = program_and_leaf(data, 4)
    D = derivatives(one_leaf(f, leaves, i), leaves[i], 4)
    close(xa.biharmonic(y, xs[i], direction=direction), biharmonic_of(D[3], y.shape), "biharmonic")


def mixed_reference(f, A, B, pattern):
    """``d^k f(A, B)`` for ``pattern`` a string of "A"/"B": ``(*S, *shape of each, in the pattern's order)``.

    Two leaves: ``hessian(f, argnums=(0, 1))``; three: nested ``jacfwd`` over ``jacrev``.
    """
    A, B = A.detach(), B.detach()
    arg = {"A": 0, "B": 1}
    if len(pattern) == 2:
        return hessian(f, argnums=(0, 1))(A, B)[arg[pattern[0]]][arg[pattern[1]]]
    g = jacrev(f, argnums=arg[pattern[0]])
    for p in pattern[1:]:
        g = jacfwd(g, argnums=arg[p])
    return g(A, B)


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_random_program_mixed(data):
    f, leaves, _ = build(data, order=3, n_initial=2, max_leaves=2, n_ops=data.draw(st.integers(1, 4), label="n_ops"))
    A0, B0 = [x.to(DEVICE) for x in leaves]
    A, B = [x.detach().clone().requires_grad_(True) for x in (A0, B0)]
    y = f(A, B)
    of = {"A": A, "B": B}
    patterns = ["AB", "BA", "AAB", "ABA", "BBA"]
    want = {}
    for p in patterns:
        w = mixed_reference(f, A0, B0, p)
        want[p] = w.reshape((y.numel(),) + tuple(of[c].numel() for c in p))
        assert w.shape == y.shape + sum((of[c].shape for c in p), torch.Size())
    for p in ("AB", "BA", "AAB"):
        close(xa.mixed(y, tuple(of[c] for c in p)), want[p], f"mixed {p}")
    together = xa.mixed(y, [tuple(of[c] for c in p) for p in patterns])
    assert isinstance(together, tuple) and len(together) == len(patterns)
    for p, got in zip(patterns, together):
        close(got, want[p], f"mixed {p} in a list")
    # the layout's promise: reshaped, it is torch.func.hessian(f, argnums=(0, 1))(A, B)[0][1]
    close(xa.mixed(y, (A, B)).reshape(y.shape + A.shape + B.shape), mixed_reference(f, A0, B0, "AB"), "reshaped")
    assert not hasattr(A, "xgrad") and not hasattr(B, "xgrad")


def test_mixed_of_leaves_that_never_meet_is_zero():
    """``S = f(A) + g(B)``: no joint block; still a tensor of zeros in the layout ``(s, nA, nB)``."""
    A = torch.tensor([0.3, -0.2, 0.9], dtype=DTYPE, device=DEVICE, requires_grad=True)
    B = torch.tensor([[1.0, -0.5]], dtype=DTYPE, device=DEVICE, requires_grad=True)
    y = torch.tanh(A) * A.sum() + (B * B).sum()
    close(xa.mixed(y, (A, B)), torch.zeros(3, 3, 2, dtype=DTYPE, device=DEVICE), "AB")
    close(xa.mixed(y, (B, A, A)), torch.zeros(3, 2, 3, 3, dtype=DTYPE, device=DEVICE), "BAA")


def test_mixed_of_one_leaf_repeated():
    """Repeats allowed: ``(A, A)`` is ``d^2 S / dA^2``, ``(A, A, A)`` the third, ``(A,)`` the Jacobian."""
    A0 = torch.tensor([0.3, -0.2, 0.9], dtype=DTYPE, device=DEVICE)
    B0 = torch.tensor([0.5, 1.0], dtype=DTYPE, device=DEVICE)
    f = lambda a, b: torch.tanh(a) * a.sum() + (b * b).sum() * a[0]
    A, B = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    y = f(A, B)
    close(xa.mixed(y, (A, B)), mixed_reference(f, A0, B0, "AB"), "AB, the control")
    close(xa.mixed(y, (A,)), jacrev(f)(A0, B0), "A")
    close(xa.mixed(y, (A, A)), mixed_reference(f, A0, B0, "AA"), "AA")
    close(xa.mixed(y, (A, A, A)), mixed_reference(f, A0, B0, "AAA"), "AAA")
    AA, AB = xa.mixed(y, [(A, A), (A, B)])
    close(AA, mixed_reference(f, A0, B0, "AA"), "AA in a list with AB")
    close(AB, mixed_reference(f, A0, B0, "AB"), "AB in a list with AA")


def test_mixed_per_sample_with_the_sample_dim_last():
    """Points as columns ``X (d, B)``, a shared weight ``W``; ``u (1, B)``, ``batch_dim`` 1 and -1."""
    gen = torch.Generator().manual_seed(12)
    W0 = (torch.rand(4, 3, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    X0 = (torch.rand(3, 5, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    g = lambda x, w: (torch.tanh(w @ x) * x[:1]).sum(0, keepdim=True)  # one point x (3,) -> (1,); x read twice
    X, W = X0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
    u = (torch.tanh(W @ X) * X[:1]).sum(0, keepdim=True)  # (1, 5)
    XW = vmap(lambda x: hessian(g, argnums=(0, 1))(x, W0)[0][1], in_dims=1)(X0).reshape(5, 1, 3, 12)
    WXX = vmap(lambda x: jacfwd(jacfwd(jacrev(g, argnums=1), argnums=0), argnums=0)(x, W0), in_dims=1)(X0)
    close(xa.mixed(u, (X, W), batch_dim=1), XW, "XW")
    close(xa.mixed(u, (W, X, X), batch_dim=-1), WXX.reshape(5, 1, 12, 3, 3), "WXX")


def test_mixed_per_sample_layout_with_one_sample():
    """One sample is still ``(B, s', nX', nW)`` = ``(1, s', ..)``, as for more samples (and as xa.backward)."""
    g, rows, W0 = explicit_net(seed=13)
    for B in (2, 1):
        X0 = points(B=B, seed=14)
        X, W = X0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        u = rows(X, W)  # (B, 1)
        want = vmap(lambda x: hessian(g, argnums=(0, 1))(x, W0)[0][1])(X0).reshape(B, 1, 3, W.numel())
        close(xa.mixed(u, (X, W), batch_dim=0), want, f"{B} samples")


# ====================================================================== named fan-out cases, all kinds


def _fanout_cases():
    gen = torch.Generator().manual_seed(7)
    W = (torch.rand(3, 3, generator=gen, dtype=DTYPE, device="cpu") - 0.5).to(DEVICE)
    return {
        "x*x": (lambda x: x * x, (3,)),
        "residual x+tanh(Wx)": (lambda x: x + torch.tanh(W @ x), (3,)),
        "two readers": (lambda x: torch.sin(x) * x.sum() + torch.exp(x).prod(), (2, 2)),
        "x*x*x summed": (lambda x: (x * x * x).sum(), (2, 2)),
        "softmax of x*tanh(x)": (lambda x: torch.softmax(x * torch.tanh(x), dim=-1), (2, 3)),
    }


FANOUT = _fanout_cases()


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@pytest.mark.parametrize("case", list(FANOUT))
def test_fanout_cases_every_kind(case, direction):
    """Fan-out and non-scalar sources, order 4, every query kind; zero derivatives (x*x) are zero tensors."""
    f, shape = FANOUT[case]
    gen = torch.Generator().manual_seed(11)
    x0 = (torch.rand(shape, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    x = x0.clone().requires_grad_(True)
    y = f(x)
    n = x.numel()
    D = derivatives(f, x0, 4)
    indices = [(0,), (n - 1, 0), (0, 1, 0), (1, 1, 1, 1), (0, n - 1, 1, 0)]
    for got, a in zip(xa.partials(y, x, indices, direction=direction), indices):
        close(got, partial_of(D, a, y.shape), f"partial {a}")
    coefficients = {1: torch.linspace(-1, 1, n, dtype=DTYPE, device=DEVICE), 2: Diagonal(0.5),
                    3: RankOne(torch.linspace(0.2, 1, n, dtype=DTYPE, device=DEVICE)), 4: {(0, 1, 1, 0): 2.0}}
    dense = {1: coefficients[1], 2: 0.5 * torch.eye(n, dtype=DTYPE, device=DEVICE),
             3: _power(coefficients[3].v[0], 3), 4: torch.zeros((n,) * 4, dtype=DTYPE, device=DEVICE)}
    dense[4][0, 1, 1, 0] = 2.0
    close(xa.differential_operator(y, x, coefficients, direction=direction), apply_operator(D, dense, y.shape),
          "operator")
    close(xa.biharmonic(y, x, direction=direction), biharmonic_of(D[3], y.shape), "biharmonic")
    V = (torch.rand(2, n, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    want = directional_reference(f, x0, V, 4)
    got = xa.directional(y, x, V, order=4, direction=direction)
    assert len(got) == 4
    for k in range(4):
        close(got[k], want[k], f"directional order {k + 1}")
    assert not hasattr(x, "xgrad")


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
@pytest.mark.parametrize("kind", ["partials", "biharmonic", "directional", "operator"])
def test_zero_derivatives_are_zero_tensors(kind, direction):
    """``x * x`` has no third or fourth derivative, ``3 x + 1`` no second: still tensors (zeros) shaped like S."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE, device=DEVICE, requires_grad=True)
    y, z = x * x, 3 * x + 1
    zeros = torch.zeros(3, dtype=DTYPE, device=DEVICE)
    ones = torch.ones(3, dtype=DTYPE, device=DEVICE)
    if kind == "partials":
        first, third = xa.partials(y, x, [(1,), (0, 1, 2)], direction=direction)
        close(first, torch.tensor([0.0, -2.0, 0.0], dtype=DTYPE, device=DEVICE), "partials (1,)")
        close(third, zeros, "partials (0, 1, 2)")
        (second,) = xa.partials(z, x, [(0, 0)], direction=direction)
        close(second, zeros, "partials (0, 0) of an affine source")
    elif kind == "biharmonic":
        close(xa.biharmonic(y, x, direction=direction), zeros, "biharmonic of x * x")
    elif kind == "directional":
        d1, d2, d3 = xa.directional(y, x, ones, order=3, direction=direction)
        close(d1, 2 * x.detach(), "directional order 1")
        close(d2, 2 * ones, "directional order 2")
        close(d3, zeros, "directional order 3")
        close(xa.directional(z, x, ones, order=2, direction=direction)[1], zeros, "order 2 of an affine source")
    else:
        close(xa.differential_operator(y, x, {3: Diagonal(1.0), 4: RankOne(ones)}, direction=direction), zeros,
              "operator of orders 3 and 4 on x * x")
        close(xa.differential_operator(y, x, {1: {(0,): 1.0}, 3: Diagonal(1.0)}, direction=direction),
              torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE, device=DEVICE), "operator of orders 1 and 3 on x * x")


# ====================================================================== per-sample queries on PINN-like networks


def pinn(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().to(DEVICE)


def per_point(net):
    """``u(x)`` for one point ``x`` (d,): the network plus a term that reads ``x`` again (fan-out)."""
    return lambda z: net(z) * (1 + torch.sin(z).sum(-1, keepdim=True)) + z[..., :1] * z[..., -1:]


def per_point_derivatives(g, X, order, in_dims=0, out_dims=0):
    """``vmap`` of ``derivatives(g, x, order)`` over the points: ``D_k`` of shape ``(B, s', d, .., d)``."""
    return [vmap(lambda x, k=k: derivatives(g, x, order)[k], in_dims=in_dims, out_dims=out_dims)(X)
            for k in range(order)]


def points(B=7, d=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, d, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)


PINN_INDICES = [(0,), (2,), (1, 1), (0, 2), (0, 1, 2), (2, 2, 2), (0, 0, 1, 1), (2, 2, 2, 2)]


def pinn_coefficients(d):
    coefficients = {1: {(0,): 1.0, 2: -0.5}, 2: Diagonal(torch.tensor([0.0, -0.1, -0.2], dtype=DTYPE,
                                                                      device=DEVICE)),
                    3: RankOne(torch.tensor([[1.0, 0.5, -0.5], [0.2, 0.0, 0.3]], dtype=DTYPE, device=DEVICE)),
                    4: torch.full((d,) * 4, 0.01, dtype=DTYPE, device=DEVICE)}
    dense = {1: torch.tensor([1.0, 0.0, -0.5], dtype=DTYPE, device=DEVICE),
             2: torch.diag(coefficients[2].c),
             3: sum(_power(v, 3) for v in coefficients[3].v),
             4: coefficients[4]}
    return coefficients, dense


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
def test_pinn_per_point_every_kind(direction):
    net = pinn([3, 12, 12, 1])
    g = per_point(net)
    X0 = points()
    X = X0.clone().requires_grad_(True)
    u = g(X)  # (B, 1)
    D = [t.reshape(t.shape[0], *t.shape[2:]) for t in per_point_derivatives(g, X0, 4)]  # s' = 1: (B, d, ..)
    got = xa.partials(u, X, PINN_INDICES, batch_dim=0, direction=direction)
    for t, a in zip(got, PINN_INDICES):
        close(t, D[len(a) - 1][(slice(None),) + a][:, None], f"partial {a}")
    coefficients, dense = pinn_coefficients(3)
    want = sum(torch.tensordot(D[k - 1], C, dims=([*range(1, k + 1)], [*range(k)])) for k, C in dense.items())
    close(xa.differential_operator(u, X, coefficients, batch_dim=0, direction=direction), want[:, None], "operator")
    bih = sum(D[3][:, i, i, j, j] for i in range(3) for j in range(3))
    close(xa.biharmonic(u, X, batch_dim=0, direction=direction), bih[:, None], "biharmonic")
    V = torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.3, 0.0]], dtype=DTYPE, device=DEVICE)
    jets = xa.directional(u, X, V, order=4, batch_dim=0, direction=direction)
    one = xa.directional(u, X, V[0], order=2, batch_dim=0, direction=direction)
    for k in range(4):
        want_k = vmap(lambda x, k=k: torch.stack([jvp_jet(g, x, v, k + 1) for v in V]))(X0)  # (B, m, 1)
        close(jets[k], want_k.movedim(1, 0), f"directional order {k + 1}")
        if k < 2:
            close(one[k], want_k[:, 0], f"one direction, order {k + 1}")
    assert not hasattr(X, "xgrad")


@pytest.mark.parametrize("batch_dim", [1, -1])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_pinn_sample_dim_last(direction, batch_dim):
    """Points as columns: X (d, B), u (2, B) -- two outputs per sample, the sample dim last."""
    net = pinn([3, 10, 2], seed=1)
    g = lambda z: torch.tanh(net(z)) * z.sum(-1, keepdim=True)  # z read twice
    X0 = points(B=6, seed=4).T.contiguous()  # (3, 6)
    X = X0.clone().requires_grad_(True)
    u = g(X.T).T  # (2, 6)
    D = per_point_derivatives(g, X0, 4, in_dims=1)  # (B, 2, 3, ..)
    indices = [(1,), (0, 2), (1, 1, 2), (0, 1, 1, 2)]
    for t, a in zip(xa.partials(u, X, indices, batch_dim=batch_dim, direction=direction), indices):
        close(t, D[len(a) - 1][(slice(None), slice(None)) + a].T, f"partial {a}")
    coefficients, dense = pinn_coefficients(3)
    want = sum(torch.tensordot(D[k - 1], C, dims=([*range(2, k + 2)], [*range(k)])) for k, C in dense.items())
    close(xa.differential_operator(u, X, coefficients, batch_dim=batch_dim, direction=direction), want.T,
          "operator")
    bih = sum(D[3][:, :, i, i, j, j] for i in range(3) for j in range(3))
    close(xa.biharmonic(u, X, batch_dim=batch_dim, direction=direction), bih.T, "biharmonic")
    v = torch.tensor([0.5, -1.0, 0.25], dtype=DTYPE, device=DEVICE)
    jets = xa.directional(u, X, v, order=3, batch_dim=batch_dim, direction=direction)
    for k in range(3):
        close(jets[k], vmap(lambda x, k=k: jvp_jet(g, x, v, k + 1), in_dims=1, out_dims=1)(X0), f"order {k + 1}")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_per_sample_leaf_of_matrices(direction):
    """Each sample a 2x2 matrix ``X[b]``: directions ``(m, 2, 2)``, multi-indices over its 4 entries."""
    gen = torch.Generator().manual_seed(15)
    X0 = (torch.rand(4, 2, 2, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    g = lambda x: torch.tanh(x @ x).sum((-1, -2))[..., None] * x[..., 0, :]  # one sample (2, 2) -> (2,)
    X = X0.clone().requires_grad_(True)
    u = g(X)  # (4, 2)
    V = (torch.rand(3, 2, 2, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    got = xa.directional(u, X, V, order=3, batch_dim=0, direction=direction)
    for k in range(3):
        want = torch.stack([vmap(lambda x, v=v, k=k: jvp_jet(g, x, v, k + 1))(X0) for v in V])
        close(got[k], want, f"directional order {k + 1}")
    D = per_point_derivatives(g, X0, 3)  # (B, 2, 4, ..)
    indices = [(3,), (0, 3), (1, 2, 3)]
    for t, a in zip(xa.partials(u, X, indices, batch_dim=0, direction=direction), indices):
        close(t, D[len(a) - 1][(slice(None), slice(None)) + a], f"partial {a}")


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
def test_pinn_queries_in_chunks_of_samples(direction):
    """A memory budget that splits the samples into chunks: the same answers, seeds and weights per chunk."""
    net = pinn([3, 12, 12, 1], seed=2)
    g = per_point(net)
    X = points(B=16, seed=5).requires_grad_(True)
    u = g(X)
    coefficients, _ = pinn_coefficients(3)
    V = torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.3, 0.0]], dtype=DTYPE, device=DEVICE)
    queries = {
        "partials": lambda **kw: xa.partials(u, X, PINN_INDICES, batch_dim=0, **kw),
        "operator": lambda **kw: (xa.differential_operator(u, X, coefficients, batch_dim=0, **kw),),
        "biharmonic": lambda **kw: (xa.biharmonic(u, X, batch_dim=0, **kw),),
        "directional": lambda **kw: xa.directional(u, X, V, order=4, batch_dim=0, **kw),
    }
    for name, q in queries.items():  # the plain-data budget (with autograd's tape: tests/test_train.py)
        whole = q(direction=direction, create_graph=False)
        runs = []
        counting = lambda *a, runs=runs, real=execute.run, **k: runs.append(a[0].batch.size) or real(*a, **k)
        budget = _budget_for_chunks(u, X, name, coefficients, V, direction)
        with patch.object(execute, "run", counting):
            chunked = q(direction=direction, max_memory=budget, create_graph=False)
        assert len(runs) > 1 and max(runs) < 16, (name, runs)
        for a, b in zip(chunked, whole):
            close(a, b, f"{name} in chunks")


def _budget_for_chunks(u, X, name, coefficients, V, direction):
    """A budget of about a third of what the whole batch needs in the chosen direction."""
    query = {"partials": lambda: xa.queries.Partials(X, PINN_INDICES),
             "operator": lambda: xa.queries.Operator(X, coefficients),
             "biharmonic": lambda: xa.queries.Biharmonic(X),
             "directional": lambda: xa.queries.Directional(X, V, 4)}[name]()
    plan = xa.explain(u, query=query, batch_dim=0, direction=direction, file=io.StringIO())
    need = plan.peak_bytes + plan.result_elements * plan.itemsize
    return need / 3


def explicit_net(seed=6):
    """``(g, rows, W)``: ``g(x, W)`` for one point, ``rows(X, W)`` the same formula on a batch of points."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.rand(s, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    W1, b1, w2 = r(8, 3), r(8), r(8)

    def g(x, W):  # one point x (3,), the first layer's weight W (8, 3), shared by all points; x read thrice
        return (torch.tanh(x @ W.T + b1) @ w2)[None] * x[:1] + (x * x).sum(-1, keepdim=True)

    def rows(X, W):
        return (torch.tanh(X @ W.T + b1) @ w2)[:, None] * X[:, :1] + (X * X).sum(-1, keepdim=True)
    return g, rows, W1


def test_pinn_per_sample_mixed_with_a_shared_weight():
    g, rows, W0 = explicit_net()
    X0 = points(B=5, seed=8)
    X, W = X0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
    u = rows(X, W)  # (B, 1)
    close(u.detach(), vmap(g, in_dims=(0, None))(X0, W0), "the batched formula is g per point")
    nX, nW = 3, W.numel()
    ref = {
        "XW": vmap(lambda x: hessian(g, argnums=(0, 1))(x, W0)[0][1])(X0).reshape(5, 1, nX, nW),
        "WX": vmap(lambda x: hessian(g, argnums=(0, 1))(x, W0)[1][0])(X0).reshape(5, 1, nW, nX),
        "XXW": vmap(lambda x: jacfwd(jacfwd(jacrev(g, argnums=0), argnums=0), argnums=1)(x, W0))(X0)
        .reshape(5, 1, nX, nX, nW),
    }
    of = {"X": X, "W": W}
    for p, want in ref.items():
        close(xa.mixed(u, tuple(of[c] for c in p), batch_dim=0), want, f"per-sample mixed {p}")
    both = xa.mixed(u, [(X, W), (X, X, W)], batch_dim=0)
    close(both[0], ref["XW"], "in a list, XW")
    close(both[1], ref["XXW"], "in a list, XXW")
    # per-sample partials w.r.t. the shared weight: all its entries, every sample
    D = vmap(lambda x: jacfwd(jacrev(g, argnums=1), argnums=1)(x, W0))(X0).reshape(5, 1, nW, nW)
    G = vmap(lambda x: jacrev(g, argnums=1)(x, W0))(X0).reshape(5, 1, nW)
    for direction in ALL_DIRECTIONS:
        first, second = xa.partials(u, W, [(4,), (nW - 1, 2)], batch_dim=0, direction=direction)
        close(first, G[:, :, 4], f"{direction} per-sample du/dW_4")
        close(second, D[:, :, nW - 1, 2], f"{direction} per-sample d2u/dW_23 dW_2")
    assert not hasattr(X, "xgrad") and not hasattr(W, "xgrad")


# ====================================================================== soundness of the plan cache


def _cached_calls():
    """Patch ``planner.build`` to record whether each plan came from the cache."""
    seen = []
    real = planner.build

    def build_(*a, **k):
        plan = real(*a, **k)
        seen.append(plan.cached)
        return plan
    return seen, patch.object(planner, "build", build_)


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
def test_plan_cache_never_changes_a_number(direction):
    """One structure, other values: coefficients, directions, indices, points. Each call's own answer."""
    f = lambda x: torch.tanh(x) * x.sum() + (x * x).prod()
    gen = torch.Generator().manual_seed(21)
    rand = lambda *s: (torch.rand(s, generator=gen, dtype=DTYPE, device="cpu") * 2 - 1).to(DEVICE)
    for trial in range(3):  # new points each time: a new graph of the same structure
        x0 = rand(2, 2)
        x = x0.clone().requires_grad_(True)
        y = f(x)
        D = derivatives(f, x0, 4)
        for values in range(2):
            C2, d2, V, c1 = rand(4, 4), rand(4), rand(2, 4), float(rand(1).item())
            coefficients = {1: {(3,): c1, 0: 2 * c1}, 2: C2, 3: Diagonal(d2), 4: RankOne(V)}
            dense = {1: torch.tensor([2 * c1, 0, 0, c1], dtype=DTYPE, device=DEVICE), 2: C2,
                     3: _diag3(d2), 4: sum(_power(v, 4) for v in V)}
            seen, patched = _cached_calls()
            with patched:
                got = xa.differential_operator(y, x, coefficients, direction=direction)
            assert trial + values == 0 or any(seen), "the second call with one structure plans again"
            close(got, apply_operator(D, dense, y.shape), f"operator, trial {trial}, values {values}")
            want = directional_reference(f, x0, V, 3)
            for k, t in enumerate(xa.directional(y, x, V, order=3, direction=direction)):
                close(t, want[k], f"directional order {k + 1}, trial {trial}, values {values}")
            a = tuple(int(i) for i in torch.randint(0, 4, (3,), generator=gen, device="cpu"))
            b = (a[0], a[1])
            pa, pb = xa.partials(y, x, [a, b], direction=direction)
            close(pa, partial_of(D, a, y.shape), f"partial {a}")
            close(pb, partial_of(D, b, y.shape), f"partial {b}")
        close(xa.biharmonic(y, x, direction=direction), biharmonic_of(D[3], y.shape), f"biharmonic, trial {trial}")


def _diag3(d):
    n = d.shape[0]
    C = torch.zeros(n, n, n, dtype=DTYPE, device=DEVICE)
    i = torch.arange(n, device=DEVICE)
    C[i, i, i] = d
    return C


@pytest.mark.parametrize("direction", ALL_DIRECTIONS)
def test_plan_cache_per_sample_new_points_and_values(direction):
    """Per-sample: the same net and query structure on other points and with other values."""
    net = pinn([3, 8, 1], seed=9)
    g = per_point(net)
    for seed in (10, 11):
        X0 = points(B=5, seed=seed)
        X = X0.clone().requires_grad_(True)
        u = g(X)
        D = [t[:, 0] for t in per_point_derivatives(g, X0, 3)]
        for scale in (1.0, -2.5):
            C = {1: torch.tensor([scale, 0.0, 1.0], dtype=DTYPE, device=DEVICE),
                 3: {(0, 1, 2): scale, (2, 2, 2): 1.0}}
            dense3 = torch.zeros(3, 3, 3, dtype=DTYPE, device=DEVICE)
            dense3[0, 1, 2], dense3[2, 2, 2] = scale, 1.0
            want = D[0] @ C[1] + torch.tensordot(D[2], dense3, dims=([1, 2, 3], [0, 1, 2]))
            close(xa.differential_operator(u, X, C, batch_dim=0, direction=direction), want[:, None],
                  f"seed {seed}, scale {scale}")
            v = torch.tensor([scale, 1.0, -scale], dtype=DTYPE, device=DEVICE)
            (_, second) = xa.directional(u, X, v, order=2, batch_dim=0, direction=direction)
            close(second, vmap(lambda x, v=v: jvp_jet(g, x, v, 2))(X0), f"directional, seed {seed}, scale {scale}")


# ====================================================================== errors


def _setup_errors():
    x = torch.randn(3, 2, dtype=DTYPE, device=DEVICE, requires_grad=True)
    h = torch.tanh(x)
    return x, h, (h * x).sum(1)


def _bad_calls(x, h, u):
    n = x.numel()
    v = torch.ones(n, dtype=DTYPE, device=DEVICE)
    query_errors = {
        "partials index = n": lambda: xa.partials(u, x, [(0, n)]),
        "partials negative index": lambda: xa.partials(u, x, [(-1,)]),
        "partials int index = n": lambda: xa.partials(u, x, [n]),
        "partials per sample index = d": lambda: xa.partials(u, x, [(2,)], batch_dim=0),
        "partials index = n, backward": lambda: xa.partials(u, x, [(1, n)], direction="backward"),
        "entries out of range, backward": lambda: xa.differential_operator(u, x, {1: {n: 1.0}}, direction="backward"),
        "direction too short, backward": lambda: xa.directional(u, x, torch.ones(n - 1), order=2,
                                                                direction="backward"),
        "entries index out of range": lambda: xa.differential_operator(u, x, {2: {(0, n): 1.0}}),
        "entries of the wrong order": lambda: xa.differential_operator(u, x, {2: {(0, 1, 1): 1.0}}),
        "dense of the wrong shape": lambda: xa.differential_operator(u, x, {2: torch.ones(n, n + 1)}),
        "dense of the wrong order": lambda: xa.differential_operator(u, x, {2: torch.ones(n)}),
        "dense per sample of all entries": lambda: xa.differential_operator(u, x, {1: torch.ones(n)}, batch_dim=0),
        "diagonal vector too long": lambda: xa.differential_operator(u, x, {2: Diagonal(torch.ones(n + 1))}),
        "rank one vector too short": lambda: xa.differential_operator(u, x, {2: RankOne(torch.ones(n - 1))}),
        "order zero": lambda: xa.differential_operator(u, x, {0: torch.ones(())}),
        "direction too long": lambda: xa.directional(u, x, torch.ones(n + 1), order=2),
        "directions per sample of all entries": lambda: xa.directional(u, x, v, order=2, batch_dim=0),
    }
    type_errors = {
        "partials of an int": lambda: xa.partials(u, x, 0),
        "partials of a tuple": lambda: xa.partials(u, x, (0, 1)),
        "partials of nothing": lambda: xa.partials(u, x, []),
        "coefficients a list": lambda: xa.differential_operator(u, x, [torch.ones(n)]),
        "coefficients empty": lambda: xa.differential_operator(u, x, {}),
        "coefficient a string": lambda: xa.differential_operator(u, x, {1: "laplace"}),
        "rank one of a list": lambda: xa.differential_operator(u, x, {1: RankOne([1.0] * n)}),
        "directions a list": lambda: xa.directional(u, x, [1.0] * n, order=2),
        "order a float": lambda: xa.directional(u, x, v, order=2.0),
        "wrt a list": lambda: xa.partials(u, [x], [(0,)]),
        "biharmonic wrt a list": lambda: xa.biharmonic(u, [x]),
        "mixed wrt a tensor": lambda: xa.mixed(u, x),
        "mixed wrt a list of ints": lambda: xa.mixed(u, [(x, 1)]),
    }
    other = torch.randn(3, 2, dtype=DTYPE, device=DEVICE, requires_grad=True)
    target_errors = {
        "partials wrt intermediate": lambda: xa.partials(u, h, [(0,)]),
        "operator wrt unrelated": lambda: xa.differential_operator(u, other, {1: Diagonal(1.0)}),
        "directional wrt intermediate": lambda: xa.directional(u, h, v, order=1),
        "biharmonic wrt unrelated": lambda: xa.biharmonic(u, other),
        "mixed with an intermediate": lambda: xa.mixed(u, (x, h)),
        "mixed with an unrelated leaf": lambda: xa.mixed(u, [(x, x), (x, other)]),
    }
    return query_errors, type_errors, target_errors, other


def _raises(kind, name, call):
    """``call()`` raises ``kind``; otherwise an AssertionError that names the case."""
    try:
        call()
    except kind:
        return
    except Exception as e:  # any other error: reported with the case's name
        raise AssertionError(f"{name}: raised {type(e).__name__} ({e}), not {kind.__name__}") from e
    raise AssertionError(f"{name}: did not raise {kind.__name__}")


def test_errors_are_typed_and_leave_the_tensors_untouched():
    x, h, u = _setup_errors()
    before = x.detach().clone()
    query_errors, type_errors, target_errors, other = _bad_calls(x, h, u)
    assert issubclass(xa.QueryError, ValueError) and issubclass(xa.QueryError, xa.XaError)
    for kind, cases in ((xa.QueryError, query_errors), (TypeError, type_errors), (xa.TargetError, target_errors)):
        for name, call in cases.items():
            _raises(kind, name, call)
            assert not any(hasattr(t, "xgrad") for t in (x, h, u, other)), f"{name}: an .xgrad appeared"
            assert x.grad is None and other.grad is None, name
    with pytest.raises(ValueError, match="direction"):
        xa.partials(u, x, [(0,)], direction="sideways")
    assert torch.equal(x.detach(), before) and x.requires_grad
    # after all of it, the queries still answer and torch's graph still runs
    (first,) = xa.partials(u, x, [(0,)])
    close(first, jacrev(lambda z: (torch.tanh(z) * z).sum(1))(before).reshape(3, -1)[:, 0], "after the errors")
    u.sum().backward()
    assert x.grad is not None and not hasattr(x, "xgrad")

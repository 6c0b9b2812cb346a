"""Per-sample derivatives (``batch_dim=``) against torch.func, in float64.

With ``batch_dim=d``, ``B = source.shape[d]`` and sample ``b``'s source is
``source.select(d, b).flatten()`` (``s'`` entries). A leaf the sample
dimension reaches (its own batch dim ``e``) is *batched*: ``L.xgrad[k-1]``
has shape ``(B, s', n', ..., n')`` with ``n' = L.numel() // B`` and holds
``d^k source_b[a] / d L.select(e, b).flatten()[i1] ...``. A leaf it does not
reach (weights) is *shared*: ``(B, s', n, ..., n)``, ``n = L.numel()``.

Two references:

- :func:`diagonal_reference` differentiates the whole batched function
  (nested ``jacrev``/``jacfwd``, as ``reference.torch_partials``) and takes
  the per-sample blocks out of it: source rows regrouped by sample, and for
  a batched leaf the entries where every sample index is the same. It also
  checks that every entry across two samples is zero, i.e. that the graph
  really does not couple samples.
- :func:`vmap_partials` is ``torch.func.vmap`` over nested Jacobians of the
  per-sample function (``functional_call`` for a module's parameters).

A graph that couples samples raises ``xa.BatchMixingError`` before anything
runs, and leaves torch's graph as it was.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from reference import DEVICE, nested, torch_partials
from samples_attention import fused
from test_networks import EncoderBlock
from torch.func import functional_call, vmap

import xa

DTYPE = torch.float64
TOL = 1e-8  # relative to max(1, |ref|)


# ====================================================================== references


def _sample_rows(d_k, out_shape, d):
    """``(s, ...)`` with rows in ``out_shape``'s order -> ``(B, s', ...)``, the source's dim ``d`` first."""
    rest = d_k.shape[1:]
    t = d_k.reshape(tuple(out_shape) + tuple(rest)).movedim(d, 0)
    return t.reshape((out_shape[d], -1) + tuple(rest))


def diagonal_reference(f, inputs, order, batch_dim, leaf_dims, check_uncoupled=True):
    """Per-sample partials of ``f(*inputs)`` out of the full nested Jacobian of the batched function.

    ``leaf_dims[i]``: the batch dim of ``inputs[i]``, or ``None`` for a shared input.
    Returns ``out[i][k-1]`` of xa's per-sample layout.
    """
    inputs = [x.detach() for x in inputs]
    with torch.no_grad():
        out_shape = tuple(f(*inputs).shape)
    d = batch_dim % len(out_shape)
    B = out_shape[d]
    full = torch_partials(f, inputs, order)
    result = []
    for x, e, per in zip(inputs, leaf_dims, full):
        got = []
        for k, t in enumerate(per, start=1):
            t = _sample_rows(t, out_shape, d)  # (B, s', n, ..., n)
            if e is None:
                got.append(t)
                continue
            shape = tuple(x.shape)
            r = len(shape)
            e = e % r
            assert shape[e] == B, (shape, e, B)
            s1 = t.shape[1]
            t = t.reshape((B, s1) + shape * k)
            perm = [0, 1]
            for j in range(k):
                base = 2 + j * r
                perm += [base + e] + [base + q for q in range(r) if q != e]
            t = t.permute(perm).reshape((B, s1) + (B, x.numel() // B) * k)  # (B, s', B, n', B, n', ...)
            idx = torch.arange(B, device=t.device)
            # advanced indices separated by slices: their (common) dim goes first -> (B, s', n', ..., n')
            diag = t[(idx, slice(None)) + (idx, slice(None)) * k]
            if check_uncoupled and B > 1 and bool(torch.isfinite(t).all()):
                rest = t.clone()
                rest[(idx, slice(None)) + (idx, slice(None)) * k] = 0.0
                scale = max(1.0, t.abs().max().item())
                assert rest.abs().max().item() <= 1e-12 * scale, "the test's graph couples samples"
            got.append(diag)
        result.append(got)
    return result


def vmap_partials(fn, args, in_dims, wrt, order):
    """``torch.func.vmap`` over nested Jacobians of the per-sample ``fn(*args)`` w.r.t. ``args[wrt]``.

    ``in_dims`` as for ``vmap`` (``None`` for an argument shared by all samples).
    Returns the k = 1..order derivatives, each ``(B, s', m, ..., m)`` with ``m`` the
    per-sample size of ``args[wrt]`` (its whole size when it is shared).
    """
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]

    def per_sample(*a):
        return tuple(nested(fn, a, wrt, order))

    outs = vmap(per_sample, in_dims=tuple(in_dims))(*args)
    B = outs[0].shape[0]
    x = args[wrt]
    m = x.numel() if in_dims[wrt] is None else x.numel() // x.shape[in_dims[wrt]]
    s1 = outs[0].numel() // (B * m)
    return [t.reshape((B, s1) + (m,) * k) for k, t in enumerate(outs, start=1)]


def error(got, want):
    """Largest error of ``got`` against ``want``, relative to max(1, |want|); asserts the shapes agree."""
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    if not want.numel():
        return 0.0
    scale = max(1.0, want.abs().max().item())
    return (got.to(want.dtype) - want).abs().max().item() / scale


def assert_partials(got, want, tol=TOL, what=""):
    assert len(got) == len(want), (what, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want), start=1):
        assert g.dtype == DTYPE, (what, k, g.dtype)
        err = error(g, w)
        assert err <= tol, f"{what} order {k}: error {err:.3e} (relative to max(1, |ref|)) over {tol:.1e}"


def leaf(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=DTYPE, device="cpu") * scale).to(DEVICE).requires_grad_(True)


# ====================================================================== networks

torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self, sizes, act=torch.tanh):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


PINN = MLP([3, 8, 8, 1]).double().to(DEVICE)
PINN_SIN = MLP([6, 16, 16, 1]).double().to(DEVICE)


def pinn_sin(x):
    return PINN_SIN(torch.cat([x, torch.sin(3.0 * x)], dim=-1))  # Fourier-style input features


def _params(module, grad_names=()):
    """The module's parameters as fresh tensors; those named require grad."""
    return {n: p.detach().clone().requires_grad_(n in grad_names) for n, p in module.named_parameters()}


def _check_pinn(direction):
    B = 4
    X = leaf(B, 3, seed=1)
    params = _params(PINN, ("layers.0.weight",))
    W = params["layers.0.weight"]
    u = functional_call(PINN, params, (X,))
    assert u.shape == (B, 1)
    xa.backward(u, 4, direction=direction, batch_dim=0)
    assert [tuple(t.shape) for t in X.xgrad] == [(B, 1) + (3,) * k for k in range(1, 5)]
    assert X.xgrad[3].shape == (B, 1, 3, 3, 3, 3)
    assert W.xgrad[1].shape == (B, 1, W.numel(), W.numel())
    assert not hasattr(params["layers.1.weight"], "xgrad")
    want_x = vmap_partials(lambda x: PINN(x), [X], [0], 0, 4)
    assert_partials(X.xgrad, want_x, what=f"PINN d/dX ({direction})")

    def per_w(x, w):
        p = dict(params)
        p["layers.0.weight"] = w
        return functional_call(PINN, p, (x,))

    want_w = vmap_partials(per_w, [X, W], [0, None], 1, 4)
    assert_partials(W.xgrad, want_w, what=f"PINN d/dW ({direction})")
    # the user's own graph is intact
    u.sum().backward()
    assert X.grad is not None and torch.allclose(X.grad, X.xgrad[0][:, 0, :], atol=1e-12)


def test_reference_helpers_agree_on_a_pinn():
    """The two references (diagonal of the full Jacobian, vmap of the per-sample one) agree."""
    B = 3
    X = leaf(B, 3, seed=1).detach()
    W = PINN.layers[0].weight.detach()
    p = _params(PINN)

    def f(x, w):
        q = dict(p)
        q["layers.0.weight"] = w
        return functional_call(PINN, q, (x,))

    diag = diagonal_reference(f, [X, W], 3, 0, [0, None])
    for i, in_dims in ((0, [0, None]), (1, [0, None])):
        via_vmap = vmap_partials(f, [X, W], in_dims, i, 3)
        for k in range(3):
            assert error(diag[i][k], via_vmap[k]) < 1e-12
    # and by hand: per-sample rows of the full Jacobian, and d u_b / d X_c == 0 for c != b
    full = torch_partials(f, [X, W], 1)[0][0].reshape(B, B, 3)
    for b in range(B):
        assert torch.equal(diag[0][0][b, 0], full[b, b])
    # batch dim 1, a non-scalar sample: x (3, B), y = x.T @ M (B, 2) -> batch_dim=0
    M = torch.randn(3, 2, dtype=DTYPE, device=DEVICE)
    xt = torch.randn(3, B, dtype=DTYPE, device=DEVICE)
    diag = diagonal_reference(lambda x: torch.tanh(x.T @ M) ** 2, [xt], 2, 0, [1])
    via_vmap = vmap_partials(lambda x: torch.tanh(x @ M) ** 2, [xt], [1], 0, 2)  # one sample: x (3,)
    for k in range(2):
        assert error(diag[0][k], via_vmap[k]) < 1e-12
    assert diag[0][1].shape == (B, 2, 3, 3)
    # by hand: y_b = sum_i (x[i, b] w_i)^2 with x (2, B) (sample dim 1), w shared
    x2 = torch.randn(2, B, dtype=DTYPE, device=DEVICE)
    w = torch.randn(2, dtype=DTYPE, device=DEVICE)
    d = diagonal_reference(lambda x, w: ((x * w[:, None]) ** 2).sum(0), [x2, w], 2, 0, [1, None])
    assert torch.allclose(d[0][0], (2 * x2.T * w**2)[:, None, :])  # (B, 1, 2)
    assert torch.allclose(d[0][1], torch.diag_embed(2 * w**2).expand(B, 2, 2)[:, None])
    assert torch.allclose(d[1][0], (2 * x2.T**2 * w)[:, None, :])
    assert torch.allclose(d[1][1], torch.diag_embed(2 * x2.T**2)[:, None])


@pytest.mark.parametrize("direction", ["backward", "forward", "auto"])
def test_pinn_order_4(direction):
    """A PINN: X (B, 3) -> tanh MLP -> (B, 1), per-point derivatives to order 4."""
    _check_pinn(direction)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_pinn_with_sin_features_order_4_target_x(direction):
    B = 3
    X = leaf(B, 3, seed=2)
    u = pinn_sin(X)
    xa.backward(u, 4, target=X, direction=direction, batch_dim=0)
    assert X.xgrad[3].shape == (B, 1, 3, 3, 3, 3)
    assert not any(hasattr(p, "xgrad") for p in PINN_SIN.parameters())
    assert_partials(X.xgrad, vmap_partials(pinn_sin, [X], [0], 0, 4), what=f"sin PINN ({direction})")


SEQ = MLP([2, 4, 2]).double().to(DEVICE)


@pytest.mark.parametrize("batch_dim", [1, -2])
def test_sequence_first_batch_at_dim_1(batch_dim):
    """(T, B, F) through nn.Linear and tanh: the sample dim is dim 1 of the source and of x."""
    T, B = 3, 2
    x = leaf(T, B, 2, seed=3)
    params = _params(SEQ, ("layers.0.weight",))
    W = params["layers.0.weight"]
    y = functional_call(SEQ, params, (x,))  # (T, B, 2)
    xa.backward(y, 3, batch_dim=batch_dim)
    assert x.xgrad[2].shape == (B, T * 2, T * 2, T * 2, T * 2)
    assert W.xgrad[2].shape == (B, T * 2, 8, 8, 8)

    def per(x, w):
        p = dict(params)
        p["layers.0.weight"] = w
        return functional_call(SEQ, p, (x,))

    assert_partials(x.xgrad, vmap_partials(per, [x, W], [1, None], 0, 3), what="x")
    assert_partials(W.xgrad, vmap_partials(per, [x, W], [1, None], 1, 3), what="W")


def test_sequence_first_summed_over_time():
    """x (T, B, F), the source summed over T: (B, 2) with batch_dim=0, x's sample dim is 1."""
    T, B = 3, 3
    x = leaf(T, B, 2, seed=4)
    y = SEQ(x).sum(0)
    xa.backward(y, 2, target=x, direction="backward", batch_dim=0)
    assert x.xgrad[1].shape == (B, 2, T * 2, T * 2)
    want = vmap_partials(lambda z: SEQ(z).sum(0), [x], [1], 0, 2)
    assert_partials(x.xgrad, want)
    # and the same with forward jets
    x2 = x.detach().clone().requires_grad_(True)
    xa.backward(SEQ(x2).sum(0), 2, target=x2, direction="forward", batch_dim=0)
    assert_partials(x2.xgrad, want)


@pytest.mark.parametrize("width", [3, 4])
def test_linear_whose_width_equals_the_batch_size(width):
    """A weight dim as long as the batch is not a sample dim: W is shared whatever its sizes."""
    B = 4
    X = leaf(B, width, seed=19)
    W = leaf(3, width, seed=20)
    b = leaf(3, seed=21)
    M = leaf(3, B, seed=22)  # (3, B): both of its dims could be mistaken for one of B samples
    y = torch.tanh(F.linear(X, W, b)) @ M  # (B, B)
    xa.backward(y, 2, batch_dim=0)
    f = lambda x, w, b, m: torch.tanh(F.linear(x, w, b)) @ m  # noqa: E731
    ref = diagonal_reference(f, [X, W, b, M], 2, 0, [0, None, None, None])
    assert W.xgrad[1].shape == (B, B, 3 * width, 3 * width)
    assert M.xgrad[1].shape == (B, B, 3 * B, 3 * B)
    for i, t in enumerate((X, W, b, M)):
        assert_partials(t.xgrad, ref[i], what=f"leaf {i}")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):  # (B, 1, 4, 4) or one sample (1, 4, 4)
        h = F.avg_pool2d(torch.relu(self.conv(x)), 2)
        return F.log_softmax(self.fc(torch.flatten(h, -3)), dim=-1)


CNN = SmallCNN().double().to(DEVICE)


def _cnn_loss(params, x, labels):
    return F.nll_loss(functional_call(CNN, params, (x,)), labels, reduction="none")


def test_cnn_order_2_wrt_input_and_conv_weight():
    B = 3
    x = leaf(B, 1, 4, 4, seed=5)
    labels = torch.tensor([2, 0, 1], device=DEVICE)
    params = _params(CNN, ("conv.weight",))
    w = params["conv.weight"]
    loss = _cnn_loss(params, x, labels)
    assert loss.shape == (B,)
    xa.backward(loss, 2, batch_dim=0)
    assert x.xgrad[1].shape == (B, 1, 16, 16)
    assert w.xgrad[1].shape == (B, 1, 18, 18)

    def per(x, w, label):
        p = dict(params)
        p["conv.weight"] = w
        return _cnn_loss(p, x, label)

    assert_partials(x.xgrad, vmap_partials(per, [x, w, labels], [0, None, 0], 0, 2), what="input")
    assert_partials(w.xgrad, vmap_partials(per, [x, w, labels], [0, None, 0], 1, 2), what="conv weight")


BLOCK = EncoderBlock().double().to(DEVICE).eval()


def test_encoder_block_order_2_wrt_input():
    """LayerNorm, nn.MultiheadAttention (batch_first, eval), MLP: attention within each sample."""
    B, T, d = 2, 3, 4
    x = leaf(B, T, d, seed=6)
    y = BLOCK(x)
    xa.backward(y, 2, target=x, batch_dim=0)
    assert x.xgrad[1].shape == (B, T * d, T * d, T * d)
    # torch.func cannot run the fused attention kernel in forward mode: the reference takes the math backend
    assert_partials(x.xgrad, vmap_partials(fused(BLOCK), [x], [0], 0, 2), tol=1e-9)


BN_NET = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().to(DEVICE)
with torch.no_grad():
    BN_NET[1].running_mean.copy_(torch.randn(4, dtype=DTYPE))
    BN_NET[1].running_var.copy_(torch.rand(4, dtype=DTYPE) + 0.5)
    BN_NET[1].weight.copy_(torch.randn(4, dtype=DTYPE))
    BN_NET[1].bias.copy_(torch.randn(4, dtype=DTYPE))
BN_NET.eval()


def test_eval_mode_batch_norm_order_3():
    """BatchNorm1d in eval mode normalises with running statistics: no coupling across samples."""
    B = 3
    x = leaf(B, 3, seed=7)
    params = _params(BN_NET, ("1.weight", "1.bias"))
    names = ("1.weight", "1.bias")

    def f(x, w, b):
        p = dict(params)
        p.update(zip(names, (w, b)))
        return functional_call(BN_NET, p, (x,))

    leaves = [x, params["1.weight"], params["1.bias"]]
    y = f(*leaves)
    xa.backward(y, 3, batch_dim=0)
    ref = diagonal_reference(f, leaves, 3, 0, [0, None, None])
    assert x.xgrad[2].shape == (B, 2, 3, 3, 3)
    assert leaves[1].xgrad[2].shape == (B, 2, 4, 4, 4)
    for i, t in enumerate(leaves):
        assert_partials(t.xgrad, ref[i], what=f"leaf {i}")


def test_retained_intermediates_batched_and_shared():
    """Superset: a batched intermediate h (B, 5) and a shared one V = tanh(W) (no batch dim)."""
    B = 3
    x = leaf(B, 2, seed=8)
    W = leaf(5, 2, seed=9)
    M = torch.randn(5, 2, dtype=DTYPE, device=DEVICE)
    V = torch.tanh(W)
    h = torch.sin(x @ V.T)  # (B, 5)
    y = torch.softmax(h @ M, dim=-1) * h[:, :2]  # (B, 2)
    sup = xa.Superset(y).retain_partials([h, V])
    sup.backward(3, batch_dim=0)
    got_h, got_v = sup.operator_partials(h), sup.operator_partials(V)
    assert [tuple(t.shape) for t in got_h] == [(B, 2) + (5,) * k for k in (1, 2, 3)]
    assert [tuple(t.shape) for t in got_v] == [(B, 2) + (10,) * k for k in (1, 2, 3)]

    def rest(h):  # the source as a function of h (one sample or all)
        return torch.softmax(h @ M, dim=-1) * h[..., :2]

    assert_partials(got_h, vmap_partials(rest, [h], [0], 0, 3), what="h")
    assert_partials(got_h, diagonal_reference(rest, [h], 3, 0, [0])[0], what="h (diagonal)")

    def from_v(x, v):
        hh = torch.sin(x @ v.T)
        return torch.softmax(hh @ M, dim=-1) * hh[..., :2]

    assert_partials(got_v, vmap_partials(from_v, [x, V], [0, None], 1, 3), what="V")
    # the leaves got theirs too, in the same call
    assert_partials(x.xgrad, vmap_partials(lambda x: from_v(x, torch.tanh(W)), [x], [0], 0, 3), what="x")
    assert W.xgrad[1].shape == (B, 2, 10, 10)
    assert_partials(W.xgrad, vmap_partials(lambda x, w: from_v(x, torch.tanh(w)), [x, W], [0, None], 1, 3),
                    what="W")


def test_retained_intermediate_with_sample_dim_moved():
    """An intermediate whose sample dim is not at the source's position: g = tanh(x).T (4, B)."""
    B = 2
    x = leaf(B, 4, seed=10)
    g = torch.tanh(x).T  # (4, B)
    y = (g * g.sin()).T.sum(-1)  # (B,)
    sup = xa.Superset(y).retain_partials(g).backward(2, batch_dim=0)
    got = sup.operator_partials(g)
    assert [tuple(t.shape) for t in got] == [(B, 1, 4), (B, 1, 4, 4)]
    assert_partials(got, diagonal_reference(lambda g: (g * g.sin()).T.sum(-1), [g], 2, 0, [1])[0])


# ---------------------------------------------------------------------- chunking


WIDE = MLP([3, 24, 24, 2]).double().to(DEVICE)


@pytest.mark.parametrize("direction", ["backward", "auto"])
def test_chunked_over_samples_equals_unchunked(direction):
    """A budget half the whole plan's peak: the samples run in chunks, with the same numbers."""
    B = 6
    X = leaf(B, 3, seed=11)
    params = _params(WIDE, ("layers.2.bias",))
    bias = params["layers.2.bias"]  # a shared leaf: its per-sample rows are filled chunk by chunk too

    def f(x, p):
        return torch.tanh(functional_call(WIDE, p, (x,))) * x[..., :1]

    u = f(X, params)  # (B, 2): wide hidden blocks, small results
    full = xa.backward(u, 3, direction="backward", batch_dim=0, create_graph=False)  # the plain-data budget
    want_x, want_b = [t.clone() for t in X.xgrad], [t.clone() for t in bias.xgrad]
    budget = full.plan.peak_bytes * 0.5
    chunked = xa.backward(u, 3, direction=direction, max_memory=budget, batch_dim=0, create_graph=False)
    assert chunked.plan.peak_bytes <= budget < full.plan.peak_bytes  # it ran a smaller plan than the whole
    for got, want in ((X.xgrad, want_x), (bias.xgrad, want_b)):
        for a, b in zip(got, want):
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12
    assert_partials(X.xgrad, vmap_partials(lambda x: f(x, params), [X], [0], 0, 3), what="X")

    def per_b(x, b):
        p = dict(params)
        p["layers.2.bias"] = b
        return f(x, p)

    assert_partials(bias.xgrad, vmap_partials(per_b, [X, bias], [0, None], 1, 3), what="bias")


def _softmax_graph(B):
    x = leaf(B, 3, seed=12)
    Wd = torch.randn(24, 3, dtype=DTYPE, device="cpu", generator=torch.Generator().manual_seed(0)).to(DEVICE)
    h = torch.tanh(x)

    def rest(h):
        g = torch.tanh(h @ Wd.T)  # (B, 24)
        return torch.softmax(g * g, dim=-1)  # (B, 24): per sample, wide blocks and a dense softmax factor

    return x, h, rest(h), rest


def test_chunked_retained_intermediate():
    B = 5
    x, h, y, rest = _softmax_graph(B)
    sup = xa.Superset(y).retain_partials(h)
    plain = dict(direction="backward", batch_dim=0, create_graph=False)  # the plain-data budget
    want = [t.clone() for t in sup.backward(2, **plain).operator_partials(h)]
    want_x = [t.clone() for t in x.xgrad]
    whole = sup.plan.peak_bytes
    got = sup.backward(2, max_memory=whole * 0.9, **plain).operator_partials(h)
    assert sup.plan.peak_bytes < whole
    assert got[1].shape == (B, 24, 3, 3)
    for a, b in zip(list(got) + list(x.xgrad), want + want_x):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12
    assert_partials(got, vmap_partials(rest, [h], [0], 0, 2))


def test_a_chunk_of_samples_bounds_the_blocks_and_is_refused_below_one_sample():
    """Chunking over samples shrinks the blocks and the factors (each chunk's built from its slices).

    So a budget a little under the whole plan's peak runs in chunks of samples (and gives the
    same numbers), and a budget under what one sample needs, factors included, is refused
    before anything runs, saying so.
    """
    B = 5
    x, h, y, _ = _softmax_graph(B)
    sup = xa.Superset(y).retain_partials(h)
    plain = dict(direction="backward", batch_dim=0, create_graph=False)  # the plain-data budget
    want = [t.clone() for t in sup.backward(2, **plain).operator_partials(h)]
    whole = sup.plan.peak_bytes
    got = sup.backward(2, max_memory=whole * 0.9, **plain).operator_partials(h)
    assert sup.plan.batch.size < B  # it did run in chunks of samples
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12
    with pytest.raises(xa.MemoryBudgetError, match="one sample at a time"):
        sup.backward(2, max_memory=whole * 0.1, **plain)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_points_on_a_grid_leaf(direction):
    """The leaf is a (3, 4, 2) grid of points, flattened into the batch inside the forward pass:
    its samples lie over two dims, which every node keeps together."""
    net = MLP([2, 6, 1]).double().to(DEVICE)
    G = leaf(3, 4, 2, seed=31)
    u = net(G.reshape(-1, 2))
    xa.backward(u, 3, batch_dim=0, direction=direction, target=G)
    f = lambda p: net(p[None])[0]
    want = vmap_partials(f, (G.detach().reshape(-1, 2),), (0,), 0, 3)
    for k in range(3):
        assert G.xgrad[k].shape == (12, 1) + (2,) * (k + 1)
        assert_partials(G.xgrad[k], want[k], what=f"grid, order {k + 1}")


# ---------------------------------------------------------------------- explain, errors


def test_explain_mentions_the_samples(capsys):
    X = leaf(4, 3, seed=13)
    u = PINN(X)
    plan = xa.explain(u, 2, batch_dim=0)
    text = capsys.readouterr().out
    assert plan is not None
    assert "sample" in text.lower(), text
    assert not hasattr(X, "xgrad")


def test_invalid_batch_dim():
    x = leaf(3, 2, seed=14)
    y = torch.tanh(x)
    for bad in (2, -3, 7):
        with pytest.raises((IndexError, ValueError), match="batch_dim"):
            xa.backward(y, 1, batch_dim=bad)
    for bad in (1.0, "0", [0]):
        with pytest.raises(TypeError, match="batch_dim"):
            xa.backward(y, 1, batch_dim=bad)
    with pytest.raises((IndexError, ValueError), match="batch_dim"):
        xa.backward(y.sum(), 1, batch_dim=0)  # a 0-d source has no sample dim
    with pytest.raises((IndexError, ValueError), match="batch_dim"):
        xa.Superset(y).backward(1, batch_dim=5)
    with pytest.raises((IndexError, ValueError), match="batch_dim"):
        xa.explain(y, 1, batch_dim=-5)
    assert not hasattr(x, "xgrad")
    y.sum().backward()
    assert x.grad is not None


def test_batch_mixing_error_is_typed():
    assert issubclass(xa.BatchMixingError, xa.XaError)
    assert issubclass(xa.BatchMixingError, ValueError)


def _mix_softmax(x):
    return torch.softmax(torch.tanh(x), dim=0)


def _mix_log_softmax(x):
    return F.log_softmax(x * 2.0, dim=0)


def _mix_sum(x):
    h = torch.tanh(x)
    return h.sum(0, keepdim=True) + h


def _mix_mean(x):
    h = torch.tanh(x)
    return h - h.mean(0)


def _mix_max(x):
    h = torch.sin(x)
    return h - h.max(dim=0).values


def _mix_amax(x):
    return x * torch.amax(x, dim=0, keepdim=True)


def _mix_shared_from_batched(x):
    h = torch.tanh(x)
    return h * h.sum(0)


def _mix_batch_norm_training(x):
    return torch.tanh(F.batch_norm(x, None, None, training=True))


def _mix_sdpa_over_batch(x):
    q = x.unsqueeze(0)  # (1, B, F): the samples are the sequence
    return F.scaled_dot_product_attention(q, q, q).squeeze(0)


MHA_SEQ_FIRST = nn.MultiheadAttention(4, 2).double().to(DEVICE).eval()


def _mix_mha_seq_first(x):
    # (B, T, d) data given to a sequence-first module: it attends across dim 0, the samples
    return MHA_SEQ_FIRST(x, x, x, need_weights=False)[0]


def _mix_softmax_dim1(x):
    return torch.softmax(torch.tanh(x), dim=1)


# (name, f, input shape, batch_dim, what the message names)
COUPLING = [
    ("softmax over the batch", _mix_softmax, (3, 2), 0, r"softmax"),
    ("log_softmax over the batch", _mix_log_softmax, (3, 2), 0, r"softmax"),
    ("sum over the batch", _mix_sum, (3, 2), 0, r"sum"),
    ("h - h.mean(0)", _mix_mean, (3, 2), 0, r"mean"),
    ("max over the batch", _mix_max, (3, 2), 0, r"max"),
    ("amax over the batch", _mix_amax, (3, 2), 0, r"max"),
    ("h * h.sum(0)", _mix_shared_from_batched, (3, 2), 0, r"sum|mul"),
    ("batch norm, training", _mix_batch_norm_training, (4, 3), 0, r"batch_?norm"),
    ("sdpa across the batch", _mix_sdpa_over_batch, (3, 2), 0, r"backward\d"),
    ("nn.MultiheadAttention seq-first on batch-first data", _mix_mha_seq_first, (3, 2, 4), 0, r"backward\d"),
    ("softmax over the batch at dim 1", _mix_softmax_dim1, (2, 3, 2), 1, r"softmax"),
]


@pytest.mark.parametrize("name,f,shape,batch_dim,names", COUPLING, ids=[c[0] for c in COUPLING])
def test_coupling_raises_batch_mixing_error(name, f, shape, batch_dim, names):
    x = leaf(*shape, seed=15)
    w = leaf(shape[-1], seed=16)
    y = f(x) * w
    with pytest.raises(xa.BatchMixingError) as err:
        xa.backward(y, 2, batch_dim=batch_dim)
    message = str(err.value)
    assert re.search(names, message, re.IGNORECASE), f"{name}: the message does not name the node: {message}"
    assert isinstance(err.value, xa.XaError) and isinstance(err.value, ValueError)
    assert not hasattr(x, "xgrad") and not hasattr(w, "xgrad")
    # torch's graph is as it was
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_coupling_raises_from_superset_and_explain_too():
    x = leaf(3, 2, seed=17)
    h = torch.tanh(x)
    y = h * h.sum(0)
    with pytest.raises(xa.BatchMixingError):
        xa.Superset(y).retain_partials(h).backward(2, batch_dim=0)
    with pytest.raises(xa.BatchMixingError):
        xa.explain(y, 2, batch_dim=0)
    assert not hasattr(x, "xgrad")
    # without batch_dim the same graph is fine: the full derivative across samples
    xa.backward(y, 1)
    assert x.xgrad[0].shape == (6, 6)


# ====================================================================== random batched graphs

SETTINGS = dict(deadline=None, database=None, derandomize=True, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_PER_SAMPLE = 8  # entries of one sample of any tensor
MAX_LEAF = {1: 8, 2: 6, 3: 4, 4: 3}  # per-sample entries of a batched leaf, entries of a shared one
MAX_OPS = 5


def numel(shape) -> int:
    return math.prod(shape)


class BatchedProgram:
    """A small program whose values each carry their sample dim ``bd`` (``None``: shared)."""

    def __init__(self, data, order: int, B: int):
        self.data, self.order, self.B = data, order, B
        self.lines: list[str] = []
        self.pool: list[dict] = []  # batched values: {"name", "shape", "bd", "leaves"}
        self.leaves: list[tuple] = []  # (name, shape, bd)
        self.consts: list[tuple] = []
        self.features: set[str] = set()

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def per_sample(self, shape, bd):
        return numel(shape) // (self.B if bd is not None else 1)

    # ------------------------------------------------------------ values

    def new_leaf(self, shape, bd):
        name = f"x{len(self.leaves)}"
        self.leaves.append((name, tuple(shape), bd))
        self.features.add("batched leaf" if bd is not None else "shared leaf")
        entry = {"name": name, "shape": tuple(shape), "bd": bd, "leaves": frozenset([name])}
        if bd is not None:
            self.pool.append(entry)
        return entry

    def const(self, shape):
        self.consts.append(tuple(shape))
        return {"name": f"C[{len(self.consts) - 1}]", "shape": tuple(shape), "bd": None, "leaves": frozenset()}

    def shared(self, shape):
        """A shared operand: a weight leaf, new or read again (perhaps through tanh), or a constant."""
        kinds = ["const"]
        if numel(shape) <= MAX_LEAF[self.order] and len(self.leaves) < 4:
            kinds += ["leaf", "leaf"]
        again = [name for name, s, bd in self.leaves if bd is None and s == tuple(shape)]
        if again:
            kinds.append("again")
        kind = self.draw(st.sampled_from(kinds))
        if kind != "const":
            if kind == "again":
                self.features.add("shared leaf read twice")
                name = again[self.draw(st.integers(0, len(again) - 1))]
                w = {"name": name, "shape": tuple(shape), "bd": None, "leaves": frozenset([name])}
            else:
                w = self.new_leaf(shape, None)
            if self.draw(st.integers(0, 3)) == 0:  # a shared intermediate
                self.features.add("shared intermediate")
                return dict(w, name=f"torch.tanh({w['name']})")
            return w
        return self.const(shape)

    def batched(self, shape, bd):
        """A batched operand of exactly this shape: a pool value, a new batched leaf or a constant."""
        kinds = ["const"]
        if self.per_sample(shape, bd) <= MAX_LEAF[self.order] and len(self.leaves) < 4:
            kinds.append("leaf")
        pooled = [e for e in self.pool if e["shape"] == tuple(shape) and e["bd"] == bd]
        if pooled:
            kinds.append("pool")
        kind = self.draw(st.sampled_from(kinds))
        if kind == "leaf":
            return self.new_leaf(shape, bd)
        if kind == "pool":
            return pooled[-1 - self.draw(st.integers(0, len(pooled) - 1))]
        self.features.add("batched constant")
        return self.const(shape)

    def emit(self, expr, shape, bd, *operands):
        shape = tuple(shape)
        assert bd is not None and shape[bd] == self.B, (expr, shape, bd)
        if self.per_sample(shape, bd) > MAX_PER_SAMPLE:
            return None
        name = f"t{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        entry = {"name": name, "shape": shape, "bd": bd,
                 "leaves": frozenset().union(*(o["leaves"] for o in operands))}
        self.pool.append(entry)
        return entry

    # ------------------------------------------------------------ operators

    def op_unary(self, a):
        fn = self.draw(st.sampled_from(["torch.tanh", "torch.sin", "torch.exp", "torch.sigmoid", "square"]))
        if fn == "square":
            self.features.add("fan-out")
            return self.emit(f"{a['name']} * {a['name']}", a["shape"], a["bd"], a)
        return self.emit(f"{fn}({a['name']})", a["shape"], a["bd"], a)

    def op_binary(self, a):
        s, bd = a["shape"], a["bd"]
        fn = self.draw(st.sampled_from(["*", "+", "-"]))
        if self.draw(st.booleans()):
            b = self.batched(s, bd)
        else:  # shared, broadcast over the samples (and perhaps over other dims)
            shape = [1 if i == bd or self.draw(st.integers(0, 3)) == 0 else x for i, x in enumerate(s)]
            drop = self.draw(st.integers(0, len(shape)))
            if all(x == 1 for x in shape[:drop]):
                shape = shape[drop:]
            b = self.shared(shape)
            self.features.add("broadcast shared")
        x, y = (a, b) if self.draw(st.booleans()) else (b, a)
        return self.emit(f"{x['name']} {fn} {y['name']}", s, bd, a, b)

    def op_matmul(self, a):
        s, bd, n = a["shape"], a["bd"], a["name"]
        r = len(s)
        fn = self.draw(st.sampled_from(["right", "linear", "left", "bmm"]))
        m = self.draw(st.integers(1, 3))
        if fn in ("right", "linear"):
            if r < 2 or bd == r - 1:
                return None
            out = s[:-1] + (m,)
            if self.per_sample(out, bd) > MAX_PER_SAMPLE:
                return None
            self.features.add("matmul shared")
            if fn == "right":
                w = self.shared((s[-1], m))
                return self.emit(f"{n} @ {w['name']}", out, bd, a, w)
            w = self.shared((m, s[-1]))
            if self.draw(st.booleans()):
                bias = self.shared((m,))
                return self.emit(f"F.linear({n}, {w['name']}, {bias['name']})", out, bd, a, w, bias)
            return self.emit(f"F.linear({n}, {w['name']})", out, bd, a, w)
        if fn == "left":
            if r < 2 or bd == r - 2:
                return None
            out = s[:-2] + (m, s[-1])
            if self.per_sample(out, bd) > MAX_PER_SAMPLE:
                return None
            w = self.shared((m, s[-2]))
            self.features.add("matmul shared")
            return self.emit(f"torch.matmul({w['name']}, {n})", out, bd, a, w)
        # per-sample matrices: (B, i, k) @ (B, k, m)
        if r != 3 or bd != 0:
            return None
        out = (s[0], s[1], m)
        if self.per_sample(out, bd) > MAX_PER_SAMPLE:
            return None
        w = self.batched((s[0], s[2], m), 0)
        self.features.add("bmm batched")
        return self.emit(f"torch.bmm({n}, {w['name']})", out, bd, a, w)

    def op_reduce(self, a):
        s, bd, n = a["shape"], a["bd"], a["name"]
        r = len(s)
        if r < 2:
            return None
        dims = [i for i in range(r) if i != bd]
        fn = self.draw(st.sampled_from(["sum", "softmax", "log_softmax", "sum", "softmax", "sum_all"]))
        d = self.draw(st.sampled_from(dims))
        neg = self.draw(st.booleans())
        dd = d - r if neg else d
        if fn == "softmax":
            self.features.add("softmax")
            return self.emit(f"torch.softmax({n}, dim={dd})", s, bd, a)
        if fn == "log_softmax":
            self.features.add("softmax")
            return self.emit(f"F.log_softmax({n}, dim={dd})", s, bd, a)
        self.features.add("sum")
        if fn == "sum_all":
            return self.emit(f"{n}.sum(dim={tuple(dims)})", (self.B,), 0, a)
        if self.draw(st.booleans()):
            out = s[:d] + (1,) + s[d + 1:]
            return self.emit(f"{n}.sum({dd}, keepdim=True)", out, bd, a)
        out = s[:d] + s[d + 1:]
        return self.emit(f"torch.sum({n}, dim={dd})", out, bd - (d < bd), a)

    def op_shape(self, a):
        s, bd, n = a["shape"], a["bd"], a["name"]
        r = len(s)
        fn = self.draw(st.sampled_from(["reshape", "view", "permute", "transpose", "unsqueeze"]))
        if fn in ("reshape", "view"):  # keeps the sample dim whole: the sizes before and after it regroup
            pre = self.draw(st.sampled_from(regroupings(numel(s[:bd]))))
            post = self.draw(st.sampled_from(regroupings(numel(s[bd + 1:]))))
            out = pre + (s[bd],) + post
            if len(out) > 4 or out == s:
                return None
            self.features.add("reshape")
            expr = f"{n}.reshape({list(out)})" if fn == "reshape" else f"{n}.contiguous().view({list(out)})"
            return self.emit(expr, out, len(pre), a)
        if fn == "permute":
            if r < 2:
                return None
            perm = self.draw(st.permutations(list(range(r))))
            self.features.add("sample dim moved")
            return self.emit(f"{n}.permute({', '.join(map(str, perm))})", [s[i] for i in perm], perm.index(bd), a)
        if fn == "transpose":
            if r < 2:
                return None
            d0, d1 = self.draw(st.lists(st.integers(0, r - 1), min_size=2, max_size=2, unique=True))
            out = list(s)
            out[d0], out[d1] = out[d1], out[d0]
            new = d1 if bd == d0 else d0 if bd == d1 else bd
            if new != bd:
                self.features.add("sample dim moved")
            return self.emit(f"{n}.transpose({d0}, {d1})", out, new, a)
        if r >= 4:
            return None
        q = self.draw(st.integers(0, r))
        return self.emit(f"{n}.unsqueeze({q})", s[:q] + (1,) + s[q:], bd + (q <= bd), a)

    def op_residual(self, a):
        s, bd, n = a["shape"], a["bd"], a["name"]
        self.features.add("residual")
        if len(s) >= 2 and bd != len(s) - 1 and self.draw(st.booleans()):
            w = self.shared((s[-1], s[-1]))
            return self.emit(f"{n} + torch.tanh({n} @ {w['name']})", s, bd, a, w)
        return self.emit(f"{n} + torch.sin({n})", s, bd, a)

    OPS = ("op_unary", "op_binary", "op_matmul", "op_reduce", "op_shape", "op_residual",
           "op_unary", "op_binary", "op_matmul", "op_reduce", "op_matmul", "op_shape", "op_matmul")

    def step(self):
        a = self.pool[-1]  # mostly a chain, sometimes an older value (which then fans out)
        if len(self.pool) > 1 and self.draw(st.integers(0, 2)) == 2:
            a = self.pool[-1 - self.draw(st.integers(0, len(self.pool) - 1))]
        return getattr(self, self.draw(st.sampled_from(self.OPS)))(a)

    # ------------------------------------------------------------ finishing

    def finish(self, per_sample_scalar: bool):
        out = self.pool[-1]
        for name, shape, bd in self.leaves:
            if name in out["leaves"]:
                continue
            o = out["shape"]
            if bd is None:
                how = self.draw(st.sampled_from(["mul_sigmoid", "add_tanh_sum"]))
                expr = (f"{out['name']} * torch.sigmoid({name}.sum())" if how == "mul_sigmoid"
                        else f"{out['name']} + torch.tanh({name}).sum()")
            else:  # per-sample scalars of the leaf, broadcast along the source's sample dim
                rest = tuple(i for i in range(len(shape)) if i != bd)
                g = f"torch.tanh({name})" + (f".sum(dim={rest})" if rest else "")
                view = [self.B if i == out["bd"] else 1 for i in range(len(o))]
                expr = f"{out['name']} + {g}.reshape({view})"
            self.lines.append(f"t{len(self.lines)} = {expr}")
            out = {"name": f"t{len(self.lines) - 1}", "shape": o, "bd": out["bd"],
                   "leaves": out["leaves"] | {name}}
        if per_sample_scalar and len(out["shape"]) > 1:
            rest = tuple(i for i in range(len(out["shape"])) if i != out["bd"])
            self.lines.append(f"t{len(self.lines)} = {out['name']}.sum(dim={rest})")
            out = {"name": f"t{len(self.lines) - 1}", "shape": (self.B,), "bd": 0, "leaves": out["leaves"]}
        self.source = out

    def source_code(self) -> str:
        args = ", ".join(name for name, _, _ in self.leaves)
        body = "\n".join("    " + line for line in self.lines)
        return f"def f({args}):\n{body}\n    return {self.source['name']}\n"


def regroupings(n: int) -> list:
    """Shapes of at most 2 dims with ``n`` elements (``()`` for 1)."""
    out = [()] if n == 1 else [(n,)]
    out += [(i, n // i) for i in range(1, n + 1) if n % i == 0]
    return out


def values(gen, shape):
    return (torch.rand(shape, generator=gen, dtype=DTYPE, device="cpu") * 3.0 - 1.5).to(DEVICE)


def build(data, order, per_sample_scalar=False):
    """Draw a batched program: ``(f, leaves, leaf batch dims, source batch_dim)``."""
    B = data.draw(st.sampled_from([2, 3, 1]), label="B")
    prog = BatchedProgram(data, order, B)
    # the first batched leaf: sample dim at 0, 1 or last
    r = data.draw(st.sampled_from([2, 3, 1]), label="rank")
    bd = data.draw(st.sampled_from(sorted({0, min(1, r - 1), r - 1})), label="leaf batch dim")
    cap = MAX_LEAF[order]
    other = []
    for _ in range(r - 1):
        size = data.draw(st.sampled_from([2, 3, 1]))
        while numel(other) * size > cap and size > 1:
            size -= 1
        other.append(size)
    prog.new_leaf(tuple(other[:bd]) + (B,) + tuple(other[bd:]), bd)
    if data.draw(st.booleans(), label="a shared leaf from the start"):  # a weight, later read or folded in
        prog.new_leaf(tuple(other[-1:]) if other else (), None)
    n_ops = data.draw(st.integers(1, MAX_OPS if order <= 2 else 3), label="n_ops")
    applied = attempts = 0
    while applied < n_ops and attempts < 4 * n_ops:
        attempts += 1
        if prog.step() is not None:
            applied += 1
    if not prog.lines:
        prog.op_unary(prog.pool[-1])
    prog.finish(per_sample_scalar)
    out = prog.source
    d = out["bd"]
    batch_dim = d - len(out["shape"]) if data.draw(st.booleans(), label="negative batch_dim") else d
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    leaves = [values(gen, shape) for _, shape, _ in prog.leaves]
    consts = [values(gen, shape) for shape in prog.consts]
    code = prog.source_code()
    namespace = {"torch": torch, "F": F, "C": consts}
    exec(code, namespace)  # noqa: S102
    note(f"order {order}, B {B}, batch_dim={batch_dim}, seed {seed}\n"
         f"leaves: {[(n, list(s), e) for n, s, e in prog.leaves]} (name, shape, sample dim)\n"
         f"constants: {[list(s) for s in prog.consts]}\n{code}")
    prog.features.add(f"source sample dim {'last' if d == len(out['shape']) - 1 else d}")
    prog.features.add(f"{len(prog.leaves)} leaves")
    for feat in sorted(prog.features):
        event(feat)
    return namespace["f"], leaves, [e for _, _, e in prog.leaves], batch_dim


WORST = [0.0]


def check_program(f, inputs, dims, order, batch_dim):
    with torch.no_grad():
        assume(bool(torch.isfinite(f(*inputs)).all()))  # exp(exp(exp(x))) overflows: no derivative to compare
    ref = diagonal_reference(f, inputs, order, batch_dim, dims)
    assume(all(bool(torch.isfinite(t).all()) for per in ref for t in per))
    for direction in ("backward", "forward"):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        y = f(*leaves)
        B = y.shape[batch_dim]
        xa.backward(y, order, direction=direction, batch_dim=batch_dim)
        for i, (leaf_, e) in enumerate(zip(leaves, dims)):
            assert hasattr(leaf_, "xgrad"), f"leaf x{i} got no .xgrad ({direction})"
            n = leaf_.numel() // B if e is not None else leaf_.numel()
            s1 = y.numel() // B
            assert [tuple(t.shape) for t in leaf_.xgrad] == [(B, s1) + (n,) * k for k in range(1, order + 1)]
            for k in range(order):
                err = error(leaf_.xgrad[k], ref[i][k])
                WORST[0] = max(WORST[0], err)
                assert err <= TOL, f"x{i} order {k + 1} ({direction}): error {err:.3e} over {TOL:.1e}"


@settings(max_examples=200, **SETTINGS)
@given(data=st.data(), order=st.integers(1, 4))
def test_random_batched_graph(data, order):
    f, leaves, dims, batch_dim = build(data, order)
    check_program(f, leaves, dims, order, batch_dim)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), order=st.integers(1, 4))
def test_random_batched_graph_per_sample_scalar(data, order):
    """The same programs summed to one value per sample at the end (s' = 1)."""
    f, leaves, dims, batch_dim = build(data, order, per_sample_scalar=True)
    check_program(f, leaves, dims, order, batch_dim)


def build_mlp(data, order):
    """A random small MLP on a batch: ``(B, w)``, ``(T, B, w)`` (sequence first) or ``(w, B)`` (``W @ h``).

    Every weight and bias is a shared leaf (or a constant when too large for the order); widths
    and batch sizes are drawn from the same small range, so they often coincide.
    """
    B = data.draw(st.integers(1, 3), label="B")
    layout = data.draw(st.sampled_from(["batch first", "sequence first", "features first"]), label="layout")
    depth = data.draw(st.integers(1, 3 if order <= 2 else 2), label="depth")
    widths = [data.draw(st.integers(1, 3), label=f"width {i}") for i in range(depth + 1)]
    T = data.draw(st.integers(1, 2), label="T") if layout == "sequence first" else 1
    x_shape = {"batch first": (B, widths[0]), "sequence first": (T, B, widths[0]),
               "features first": (widths[0], B)}[layout]
    bd = {"batch first": 0, "sequence first": 1, "features first": 1}[layout]
    leaves, consts, lines = [("x0", x_shape, bd)], [], []

    def param(shape):
        if numel(shape) <= MAX_LEAF[order] * 2 or order == 1:
            leaves.append((f"x{len(leaves)}", shape, None))
            return leaves[-1][0]
        consts.append(shape)
        return f"C[{len(consts) - 1}]"

    h = "x0"
    for i in range(depth):
        w_in, w_out = widths[i], widths[i + 1]
        if layout == "features first":
            expr = f"{param((w_out, w_in))} @ {h}"
            if data.draw(st.booleans(), label=f"bias {i}"):
                expr += f" + {param((w_out, 1))}"
        elif data.draw(st.booleans(), label=f"F.linear {i}"):
            bias = f", {param((w_out,))}" if data.draw(st.booleans(), label=f"bias {i}") else ""
            expr = f"F.linear({h}, {param((w_out, w_in))}{bias})"
        else:
            expr = f"{h} @ {param((w_in, w_out))}"
        lines.append(f"t{len(lines)} = {expr}")
        h = f"t{len(lines) - 1}"
        feature_dim = 0 if layout == "features first" else -1
        act = data.draw(st.sampled_from(["torch.tanh({})", "torch.sin({})", "F.softplus({})",
                                         "torch.softmax({}, dim=%d)" % feature_dim, "{} * torch.sigmoid({})"]),
                        label=f"activation {i}")
        if i < depth - 1 or data.draw(st.booleans(), label="last activation"):
            lines.append(f"t{len(lines)} = {act.format(h, h)}")
            h = f"t{len(lines) - 1}"
    out_bd = bd
    if layout == "sequence first" and data.draw(st.booleans(), label="sum over T"):
        lines.append(f"t{len(lines)} = {h}.sum(0)")
        h, out_bd = f"t{len(lines) - 1}", 0
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    inputs = [values(gen, shape) for _, shape, _ in leaves]
    namespace = {"torch": torch, "F": F, "C": [values(gen, shape) for shape in consts]}
    args = ", ".join(name for name, _, _ in leaves)
    code = f"def f({args}):\n" + "".join(f"    {line}\n" for line in lines) + f"    return {h}\n"
    exec(code, namespace)  # noqa: S102
    note(f"order {order}, B {B}, {layout}, batch_dim={out_bd}, seed {seed}\n"
         f"leaves: {[(n, list(s), e) for n, s, e in leaves]} (name, shape, sample dim)\n{code}")
    event(layout)
    if B in widths:
        event("a width equal to B")
    return namespace["f"], inputs, [e for _, _, e in leaves], out_bd


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), order=st.integers(1, 3))
def test_random_batched_mlp(data, order):
    """Small MLPs, their weights shared leaves, in the three layouts users write."""
    f, leaves, dims, batch_dim = build_mlp(data, order)
    check_program(f, leaves, dims, order, batch_dim)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print(f"\nlargest error against torch.func in tests/test_batched.py (random graphs): {WORST[0]:.3e}")


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_a_value_reached_only_through_zero_derivatives_is_a_constant(direction):
    """``3 * x`` feeds only ``floor``, whose derivatives are zero: it is left out, not taken as shared."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return torch.floor(3 * x) * x + x.clone().fill_(1.0)

    xa.backward(torch.func.vmap(f)(x), 3, batch_dim=0, direction=direction)
    g, want = f, []
    for k in range(3):
        g = torch.func.jacrev(g) if k == 0 else torch.func.jacfwd(g)
        want.append(torch.func.vmap(g)(x.detach()))
    for k in range(3):
        assert x.xgrad[k].shape == (2, 3) + (3,) * (k + 1)
        assert torch.allclose(x.xgrad[k], want[k].reshape(x.xgrad[k].shape), atol=1e-12)

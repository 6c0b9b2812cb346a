"""Normalization layers: layer_norm, group_norm and batch_norm (training and eval).

Each is ``y = xhat(x) * w + b`` with per-channel ``w`` and ``b`` (both
optional), where ``xhat`` normalizes independent groups of ``m`` entries,
``xhat(g) = (g - mean(g)) / sqrt(var(g) + eps)`` with the biased variance:

* layer_norm: each row of the trailing ``normalized_shape`` dims (one label
  of size ``m`` on the ports); the weight is shaped like the row.
* group_norm: each ``(n, group)`` slab of ``C / G`` channels times the
  spatial dims, contiguous; ``C`` is split into ``(G, C / G)`` labels so the
  per-channel weight ties to both.
* batch_norm in training: each channel across ``(N, spatial)``.

Within a group ``xhat`` is dense: ``T_k = d^k xhat / dg^k`` is computed per
group with nested ``jacfwd``, vmapped over the groups, shaped
``(*groups, m, m^k)`` (``T_0 = xhat``). The affine part on top gives

* ``d^k y / dx^k = w * T_k``,
* ``d^k y / dx^(k-1) dw = T_(k-1)`` (the weight port tied to the output's channel),
* ``dy / db`` = the wiring of ``b``'s channel to the output's,

and zero for two weight slots or for the bias with anything else.

batch_norm in eval mode normalizes with the saved running statistics, so
it is affine in ``x``: ``y = (x - rm) * s * w + b`` with ``s = (rv + eps)^-1/2``.
"""

from __future__ import annotations

import math

import torch
from torch.func import jacfwd, vmap

from xa.factor import LabelMaker
from xa.families import Piece, composite
from xa.registry import register

JACFWD_WORKSPACE = 2


def _normalize(g: torch.Tensor, eps) -> torch.Tensor:
    mean = g.mean()
    return (g - mean) * torch.rsqrt(((g - mean) ** 2).mean() + eps)


def _dense(ctx, groups: torch.Tensor, eps, k: int) -> torch.Tensor:
    """``d^k xhat / dg^k`` for each row of ``groups`` (``(G, m)``), shaped ``(G, m, m^k)`` as ``(G, m, .., m)``."""
    count, m = groups.shape
    if ctx.planning:  # the dense derivative is made only to run
        return torch.empty((count, *([m] * (k + 1))), dtype=ctx.dtype, device="meta")
    f = lambda g: _normalize(g, eps)
    for _ in range(k):
        f = jacfwd(f)
    return vmap(f)(groups)


class _Layout:
    """How a normalization's input splits into groups, and the labels of its ports.

    ``group`` are the sizes of the dims that pick a group, ``within`` those of
    one group's entries; ``rows(x)`` lays a tensor shaped like the input out as
    ``(*group, *within)``. ``port(g, w)`` orders group labels ``g`` and within
    labels ``w`` as the input's dims (row-major), and ``channel(g, w)`` gives
    the labels of the weight, reshaped to ``channel_shape``.
    """

    def __init__(self, group, within, rows, port, channel, channel_shape):
        self.group, self.within = tuple(group), tuple(within)
        self.rows, self.port, self.channel, self.channel_shape = rows, port, channel, tuple(channel_shape)


def _affine_rule(layout_of, eps_of):
    """The rule for ``y = xhat(x) * w + b``; slots 0, 1, 2 are input, weight, bias."""

    def rule(ctx, slots):
        nx, nw, nb = slots.count(0), slots.count(1), slots.count(2)
        if (nb and slots != (2,)) or nw > 1:
            return None
        layout = layout_of(ctx)
        lab = LabelMaker()
        g = lab.dims(layout.group)
        y = lab.dims(layout.within)
        if nb:
            # y = ... + b: the bias port is the output's channel labels, every other label broadcasts.
            return lab.factor(layout.port(g, y), [layout.channel(g, y)])
        xs = [lab.dims(layout.within) for _ in range(nx)]
        x = ctx.saved("input").to(ctx.dtype)
        groups = layout.rows(x).reshape(math.prod(layout.group), math.prod(layout.within))
        dense = _dense(ctx, groups, eps_of(ctx, groups), nx)
        dense = dense.reshape(*layout.group, *(layout.within * (nx + 1)))
        operands = [(dense, g + y + sum(xs, ()))]
        ins = [layout.port(g, xi) for xi in xs]
        if nw:
            ins.append(layout.channel(g, y))
        elif ctx.has("weight"):
            w = ctx.saved("weight").to(ctx.dtype).reshape(layout.channel_shape)
            operands.append((w, layout.channel(g, y)))
        # nested jacfwd under vmap holds the result and the tangents it is built from: about two more of its size
        return lab.factor(layout.port(g, y), ins, operands, workspace=JACFWD_WORKSPACE * dense.numel())

    return rule


# ---------------------------------------------------------------- layer_norm


def _layer_layout(ctx):
    n = math.prod(ctx.saved("normalized_shape"))
    rows = math.prod(ctx.out_shape) // max(n, 1)
    return _Layout((rows,), (n,), lambda t: t.reshape(rows, n),
                   lambda g, w: g + w, lambda g, w: w, (n,))


def _recovered_eps(ctx, groups):
    # torch does not save eps for layer_norm (nor, from torch 2.14 on, for group_norm); with
    # rstd = (var + eps)^-1/2 per group, eps is rstd^-2 - var (biased) of any group; the mean
    # over groups averages out the rounding.
    if ctx.has("eps"):
        return float(ctx.saved("eps"))
    rstd = ctx.saved("result2").to(ctx.dtype).reshape(-1)
    # a constant: detached, or a recorded run would differentiate it as a function of the input
    return (rstd ** -2 - groups.reshape(rstd.shape[0], -1).var(-1, unbiased=False)).mean().detach()


# ---------------------------------------------------------------- as composites (xa.composite)


def _pieces(ctx, work, reduced, channel):
    """``xhat = (x - mean) * rsqrt(var + eps)`` over ``reduced`` dims of the input seen as ``work``, then ``* w + b``.

    ``rsqrt``'s derivatives are read from torch's saved ``rstd`` (``result2``), so eps is never needed;
    ``channel`` is the shape the weight and bias are viewed as to broadcast against the input.
    """
    if ctx.in_shapes[0] is None:  # only the affine part needs grad: the dense rule's T_0 = xhat does
        return None
    x = ctx.saved("input").to(ctx.dtype)
    shape, work, reduced = tuple(x.shape), tuple(work), tuple(reduced)
    pieces = []

    def add(name, out, inputs, saved, what):
        pieces.append(Piece(name, tuple(out), inputs, saved, what))
        return ("piece", len(pieces) - 1)

    src = ("in", 0)
    xw = x.reshape(work)
    if work != shape:
        src = add("ViewBackward0", work, (src,), {}, "grouped")
    mean = xw.mean(reduced, keepdim=True)
    d_value = xw - mean
    m = add("MeanBackward1", mean.shape, (src,), {"dim": reduced, "keepdim": True}, "mean")
    d = add("SubBackward0", work, (src, m), {"alpha": 1}, "x - mean")
    q = add("PowBackward0", work, (d,), {"self": d_value, "exponent": 2.0}, "square")
    v = add("MeanBackward1", mean.shape, (q,), {"dim": reduced, "keepdim": True}, "variance")
    r_value = _rstd(ctx.saved("result2").to(ctx.dtype).reshape(mean.shape), d_value, reduced)
    r = add("RsqrtBackward0", mean.shape, (v,), {"result": r_value}, "rsqrt(var + eps)")
    h_value = d_value * r_value
    h = add("MulBackward0", work, (d, r), {"self": d_value, "other": r_value}, "normalized")
    if work != shape:
        h, h_value = add("ViewBackward0", shape, (h,), {}, "ungrouped"), h_value.reshape(shape)
    # torch saves the weight whenever there is one (its input gradient needs it), never batch or
    # group norm's bias: a bias is known by its slot alone, and a constant one changes no derivative
    for slot, name in ((1, "weight"), (2, "bias")):
        grad = len(ctx.in_shapes) > slot and ctx.in_shapes[slot] is not None
        if not (grad or (slot == 1 and ctx.has(name))):
            continue
        p = ("in", slot) if grad else None
        if grad and tuple(ctx.in_shapes[slot]) != tuple(channel):
            p = add("ViewBackward0", channel, (p,), {}, f"{name} per channel")
        if slot == 1:
            w = ctx.saved(name).to(ctx.dtype).reshape(channel)
            h = add("MulBackward0", shape, (h, p), {"self": h_value, "other": w}, "* weight")
        else:
            h = add("AddBackward0", shape, (h, p), {"alpha": 1}, "+ bias")
    return pieces


def _rstd(saved, d, reduced):
    """torch's saved ``rstd = (var + eps)^-1/2``, as a function of the input when autograd records.

    torch marks layer and batch norm's an output without a derivative, so read as saved it would be a
    constant and a gradient through the normalization would miss its dependence on the input. Its value stays the
    saved one, bit for bit; its derivatives are those of ``(var(d) + eps)^-1/2`` with eps recovered.
    """
    if not (torch.is_grad_enabled() and d.requires_grad):
        return saved
    var = (d * d).mean(reduced, keepdim=True)
    again = torch.rsqrt(var + (saved.detach() ** -2 - var.detach()))
    # group_norm's is an output with a derivative, but torch 2.11 drops the gradient that reaches it:
    # every version's gradient comes from the input here
    return saved.detach() + (again - again.detach())


def _layer_pieces(ctx):
    shape = ctx.in_shapes[0] or ()
    k = len(ctx.saved("normalized_shape"))
    return _pieces(ctx, shape, range(len(shape) - k, len(shape)), shape[len(shape) - k:])


def _group_pieces(ctx):
    n, c, hw, groups = (int(ctx.saved(a)) for a in ("N", "C", "HxW", "group"))
    shape = ctx.in_shapes[0] or ()
    return _pieces(ctx, (n, groups, c // groups * hw), (2,), (c,) + (1,) * (len(shape) - 2))


def _batch_pieces(ctx):
    if not ctx.saved("training"):  # eval: affine in x, one structured factor
        return None
    shape = ctx.in_shapes[0] or ()
    return _pieces(ctx, shape, [0] + list(range(2, len(shape))), (shape[1],) + (1,) * (len(shape) - 2))


def _group_entries(layout_of):
    """The composite's ``entries``: the input's entries times a group's size to the order."""

    def entries(ctx, order):
        layout = layout_of(ctx)
        return math.prod(layout.group) * math.prod(layout.within) ** (order + 1)

    return entries


register("NativeLayerNormBackward0", composite(_affine_rule(_layer_layout, _recovered_eps), _layer_pieces,
                                                _group_entries(_layer_layout)))

# ---------------------------------------------------------------- group_norm


def _group_layout(ctx):
    n, c, hw, groups = (int(ctx.saved(a)) for a in ("N", "C", "HxW", "group"))
    within = (c // groups, hw)
    return _Layout((n, groups), within, lambda t: t.reshape(n, groups, *within),
                   lambda g, w: g + w, lambda g, w: (g[1], w[0]), (groups, c // groups))


register("NativeGroupNormBackward0", composite(_affine_rule(_group_layout, _recovered_eps), _group_pieces,
                                                _group_entries(_group_layout)))

# ---------------------------------------------------------------- batch_norm


def _batch_layout(ctx):
    shape = ctx.out_shape
    n, c, hw = shape[0], shape[1], math.prod(shape[2:])
    # A channel's entries run over (N, spatial): the group dim sits between them in the input.
    return _Layout((c,), (n, hw), lambda t: t.reshape(n, c, hw).transpose(0, 1),
                   lambda g, w: (w[0], g[0], w[1]), lambda g, w: g, (c,))


def _batch_eps(ctx, groups=None):
    # the native kernel saves eps, the cuDNN one (torch's choice on CUDA) epsilon
    return float(ctx.saved("eps") if ctx.has("eps") else ctx.saved("epsilon"))


_batch_train = _affine_rule(_batch_layout, _batch_eps)


def _batch_norm(ctx, slots):
    if ctx.saved("training"):
        return _batch_train(ctx, slots)
    # Eval: y = (x - rm) * s * w + b, affine in x; every term is per channel c.
    nx, nw, nb = slots.count(0), slots.count(1), slots.count(2)
    if nx > 1 or nw > 1 or (nb and slots != (2,)):
        return None
    layout = _batch_layout(ctx)
    lab = LabelMaker()
    (c,) = g = lab.dims(layout.group)
    y = lab.dims(layout.within)
    port = layout.port(g, y)
    if nb:
        return lab.factor(port, [(c,)])
    x = ctx.saved("input").to(ctx.dtype).reshape(layout.within[0], layout.group[0], layout.within[1])
    rm, rv = (ctx.saved(a).to(ctx.dtype) for a in ("running_mean", "running_var"))
    s = torch.rsqrt(rv + _batch_eps(ctx))
    operands = [(s, (c,))]
    if nw:
        if not nx:
            # dy/dw = xhat itself, an operand shaped like the input.
            operands = [((x - rm.reshape(1, -1, 1)) * s.reshape(1, -1, 1), port)]
        return lab.factor(port, [port] * nx + [(c,)], operands)
    if ctx.has("weight"):
        operands.append((ctx.saved("weight").to(ctx.dtype), (c,)))
    return lab.factor(port, [port], operands)


_batch_norm_rule = composite(_batch_norm, _batch_pieces, _group_entries(_batch_layout))
register("NativeBatchNormBackward0", _batch_norm_rule)
register("CudnnBatchNormBackward0", _batch_norm_rule)  # CUDA: the same saved names, eps as epsilon (Functions.h)

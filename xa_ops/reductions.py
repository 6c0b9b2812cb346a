"""Reductions: mean, logsumexp, log_softmax, max and min.

mean: ``y = sum(x) / count`` over the reduced dims is linear; its factor is
sum's relabelling with the coefficient ``1 / count``.

logsumexp: ``dy / dx_j = s_j`` with ``s = softmax(x)`` over the reduced
dims, so ``d^k y / dx_j1 .. dx_jk`` is the (k-1)-th derivative of
``s_j1`` w.r.t. ``x_j2 .. x_jk``: softmax's partition sum (see
:mod:`xa_ops.special`) with ``j1`` in the output's place. Several reduced
dims are one flattened softmax axis.

log_softmax: ``y_i = x_i - logsumexp(x)``, so ``dy_i / dx_j = d_ij - s_j``
and every higher derivative is minus logsumexp's, the same for every ``i``.

max / min along a dim pick one entry (torch's saved index): the
derivative is that one-hot selection, every higher order is zero. max /
min of all entries and amax / amin share a tie among the ``c`` maxima
evenly, as torch does: the derivative is ``[x == y] / c``. The masks come
from comparisons, constant under differentiation, so higher orders vanish.
"""

from __future__ import annotations

import math

import torch

from xa.factor import LabelMaker, normalize_dim
from xa.registry import register

from .families import linear
from .linear import _sum_all, _sum_dims
from .special import softmax_derivative

# ---------------------------------------------------------------- mean


def _mean(ports):
    def rule(ctx, slots):
        # count = reduced entries per output entry; an empty input has no derivative to scale.
        count = math.prod(ctx.in_shapes[0]) // max(math.prod(ctx.out_shape), 1)
        return linear(ports, coef=1.0 / max(count, 1))(ctx, slots)

    return rule


register("MeanBackward0", _mean(_sum_all))
register("MeanBackward1", _mean(_sum_dims))

# ---------------------------------------------------------------- softmax-shaped reductions


class _Along:
    """The input's dims as batch dims (kept, tied to the output) and the reduced dims.

    Each run of adjacent reduced dims gets one label per port, so ports stay
    row-major and operands small; ``flat`` lays a tensor shaped like the input
    out as ``(*batch, n)``, the reduced dims flattened in order.
    """

    def __init__(self, ctx, dims):
        self.shape = tuple(ctx.in_shapes[0])
        ndim = len(self.shape)
        self.reduced = sorted({normalize_dim(d, ndim) for d in dims}) if ndim else []
        self.kept = [d for d in range(ndim) if d not in self.reduced]
        self.runs = []
        for d in self.reduced:
            if self.runs and self.runs[-1][-1] == d - 1:
                self.runs[-1].append(d)
            else:
                self.runs.append([d])
        self.sizes = [math.prod(self.shape[d] for d in run) for run in self.runs]
        self.batch = [self.shape[d] for d in self.kept]

    def flat(self, t):
        return t.permute([*self.kept, *self.reduced]).reshape([*self.batch, math.prod(self.sizes)])

    def port(self, batch_labels, run_labels):
        labels = dict(zip(self.kept, batch_labels))
        labels.update({run[0]: label for run, label in zip(self.runs, run_labels)})
        return tuple(labels[d] for d in sorted(labels))


def _softmax_factor(along, s, k, coef=1.0, y_along=False):
    """``coef`` times the (k-1)-th derivative of softmax ``s`` (shaped like the input), on ``k`` x ports.

    The y port is the batch labels, plus, with ``y_along``, fresh labels on the
    reduced dims that no operand carries: the derivative is the same for every
    entry along them (log_softmax).
    """
    derivative = softmax_derivative(along.flat(s), k - 1).reshape([*along.batch, *(along.sizes * k)])
    lab = LabelMaker()
    bl = lab.dims(along.batch)
    pos = [lab.dims(along.sizes) for _ in range(k)]
    out = along.port(bl, lab.dims(along.sizes)) if y_along else bl
    return lab.factor(out, [along.port(bl, p) for p in pos], [(derivative, bl + sum(pos, ()))], coef)


def _logsumexp(ctx, slots):
    x, result = ctx.saved("self"), ctx.saved("result")
    along = _Along(ctx, ctx.saved("dim"))
    if not ctx.saved("keepdim"):
        result = result.reshape([1 if d in along.reduced else n for d, n in enumerate(x.shape)])
    return _softmax_factor(along, torch.exp(x - result), len(slots))


def _log_softmax(ctx, slots):
    along = _Along(ctx, (ctx.saved("dim"),))
    s = torch.exp(ctx.saved("result"))
    if len(slots) >= 2:
        return _softmax_factor(along, s, len(slots), coef=-1.0, y_along=True)
    # d_ij - s_j is a sum, so it is one dense operand along dim: (batch, i, j).
    flat = along.flat(s)
    n = flat.shape[-1]
    jac = torch.eye(n, dtype=flat.dtype, device=flat.device) - flat.unsqueeze(-2)
    lab = LabelMaker()
    bl, i, j = lab.dims(along.batch), lab.dims(along.sizes), lab.dims(along.sizes)
    operand = jac.reshape([*along.batch, *along.sizes, *along.sizes])
    return lab.factor(along.port(bl, i), [along.port(bl, j)], [(operand, bl + i + j)])


register("LogsumexpBackward0", _logsumexp)
register("LogSoftmaxBackward0", _log_softmax)

# ---------------------------------------------------------------- max and min


def _select(ctx, slots):
    """max / min along ``dim``: the one-hot of torch's saved indices along it."""
    if len(slots) > 1:
        return None
    along = _Along(ctx, (ctx.saved("dim"),))
    lab = LabelMaker()
    if not along.reduced:  # a 0-d input is its own max
        return lab.factor((), [()])
    (d,) = along.reduced
    indices = ctx.saved("indices")
    if not ctx.saved("keepdim"):
        indices = indices.unsqueeze(d)
    # scatter reads only shapes on meta tensors, so planning needs no branch.
    onehot = torch.zeros(along.shape, dtype=ctx.dtype, device=indices.device).scatter(d, indices, 1.0)
    x = lab.dims(along.shape)
    return lab.factor([x[k] for k in along.kept], [x], [(onehot, x)])


def _even(all_dims: bool):
    """max / min of all entries, amax / amin: ``[x == y] / c``, ``c`` the number of ties per output."""

    def rule(ctx, slots):
        if len(slots) > 1:
            return None
        x, result = ctx.saved("self"), ctx.saved("result")
        dims = () if all_dims else ctx.saved("dim")
        along = _Along(ctx, dims or range(x.dim()))
        if all_dims or not ctx.saved("keepdim"):
            result = result.reshape([1 if d in along.reduced else n for d, n in enumerate(x.shape)])
        ties = (x == result).to(ctx.dtype)
        share = ties / ties.sum(along.reduced, keepdim=True) if along.reduced else ties
        lab = LabelMaker()
        xl = lab.dims(along.shape)
        return lab.factor([xl[d] for d in along.kept], [xl], [(share, xl)])

    return rule


register("MaxBackward0", _select)
register("MinBackward0", _select)
register("MaxBackward1", _even(all_dims=True))
register("MinBackward1", _even(all_dims=True))
register("AmaxBackward0", _even(all_dims=False))
register("AminBackward0", _even(all_dims=False))

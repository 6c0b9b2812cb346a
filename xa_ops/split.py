"""Operators with several outputs: split, chunk, unbind.

Each output the graph reads is a value of its own, a linear function of the
input: output ``o`` of a split is the slice ``[start_o, start_o + len_o)``
along ``dim`` (a 0/1 matrix on that dim alone, every other dim tied), and of
an unbind the entry ``o`` along ``dim`` (a one-hot vector). Rules for such
nodes set ``multi_output`` and read ``ctx.output``.
"""

import torch

from xa.factor import LabelMaker, normalize_dim
from xa.registry import register


def _piece(ctx, start, length, keep_dim):
    shape = ctx.in_shapes[0]
    dim = normalize_dim(ctx.saved("dim"), len(shape))
    lab = LabelMaker()
    x = lab.dims(shape)
    n = shape[dim]
    positions = torch.arange(n, device=ctx.device)
    if keep_dim:
        i = lab.new(length)
        rows = torch.arange(length, device=ctx.device).reshape(-1, 1) + start
        select = (positions.reshape(1, -1) == rows).to(ctx.dtype)  # [i, l] = (l == start + i)
        y = x[:dim] + (i,) + x[dim + 1:]
        return lab.factor(y, [x], [(select, (i, x[dim]))])
    onehot = (positions == start).to(ctx.dtype)
    return lab.factor(x[:dim] + x[dim + 1:], [x], [(onehot, (x[dim],))])


def _multi(rule):
    rule.multi_output = True
    return rule


@_multi
def _split(ctx, slots):
    if len(slots) > 1:
        return None
    size = ctx.saved("split_size")
    return _piece(ctx, ctx.output * size, _extent(ctx), keep_dim=True)


@_multi
def _split_with_sizes(ctx, slots):
    if len(slots) > 1:
        return None
    sizes = ctx.saved("split_sizes")
    return _piece(ctx, sum(sizes[: ctx.output]), sizes[ctx.output], keep_dim=True)


@_multi
def _unbind(ctx, slots):
    if len(slots) > 1:
        return None
    return _piece(ctx, ctx.output, 1, keep_dim=False)


def _extent(ctx):
    dim = normalize_dim(ctx.saved("dim"), len(ctx.in_shapes[0]))
    return ctx.out_shape[dim]


register("SplitBackward0", _split)
register("UnsafeSplitBackward0", _split)
register("SplitWithSizesBackward0", _split_with_sizes)
register("UnbindBackward0", _unbind)

"""Operators with several outputs: split, chunk, unbind.

Each output the graph reads is a value of its own, a linear function of the
input: output ``o`` of a split is the slice ``[start_o, start_o + len_o)``
along ``dim`` (the strided selection of ``indexing``), and of an unbind the
entry ``o`` along ``dim`` (a one-hot vector). Rules for such nodes set
``multi_output`` and read ``ctx.output``.
"""

from xa.factor import normalize_dim
from xa.registry import register

from .indexing import _linear_map, _one_hot, _strided


def _dim(ctx):
    return normalize_dim(ctx.saved("dim"), len(ctx.in_shapes[0]))


def _split(ctx, lab, slot):
    return _strided(ctx, lab, _dim(ctx), ctx.output * ctx.saved("split_size"), 1)


def _split_with_sizes(ctx, lab, slot):
    return _strided(ctx, lab, _dim(ctx), sum(ctx.saved("split_sizes")[: ctx.output]), 1)


def _unbind(ctx, lab, slot):
    shape, d = ctx.in_shapes[0], _dim(ctx)
    x = lab.dims(shape)
    return x[:d] + x[d + 1:], x, [(_one_hot(ctx.output, shape[d], ctx), (x[d],))]


def _multi_output(build):
    rule = _linear_map(build)
    rule.multi_output = True
    return rule


register("SplitBackward0", _multi_output(_split))
register("UnsafeSplitBackward0", _multi_output(_split))
register("SplitWithSizesBackward0", _multi_output(_split_with_sizes))
register("UnbindBackward0", _multi_output(_unbind))

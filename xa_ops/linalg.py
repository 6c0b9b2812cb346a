"""Diagonals and traces (what ``torch.einsum`` records for repeated indices).

A main diagonal is a tie: the x port carries the same label on both dims,
the y port carries it once, no tensor at all. An off-diagonal (offset != 0)
picks ``x[a, b]`` with ``b - a = offset``: a 0/1 operand on those two dims.
"""

import torch

from xa.factor import LabelMaker, normalize_dim, signed
from xa.registry import register

from .families import linear


def _diagonal(ctx, slots):
    if len(slots) > 1:
        return None
    shape = ctx.in_shapes[0]
    d1, d2 = (normalize_dim(ctx.saved(n), len(shape)) for n in ("dim1", "dim2"))
    offset = signed(ctx.saved("offset"))
    lab = LabelMaker()
    x = list(lab.dims(shape))
    rest = [x[d] for d in range(len(shape)) if d not in (d1, d2)]
    n = ctx.out_shape[-1]
    if offset == 0:
        diag = lab.new(n)
        x[d1] = x[d2] = diag
        return lab.factor(rest + [diag], [x])
    diag = lab.new(n)
    i = torch.arange(n, device=ctx.device)
    rows = i + max(-offset, 0)
    cols = i + max(offset, 0)
    pick = ((torch.arange(shape[d1], device=ctx.device).reshape(1, -1, 1) == rows.reshape(-1, 1, 1))
            & (torch.arange(shape[d2], device=ctx.device).reshape(1, 1, -1) == cols.reshape(-1, 1, 1)))
    return lab.factor(rest + [diag], [x], [(pick.to(ctx.dtype), (diag, x[d1], x[d2]))])


def _trace(ctx, lab):
    n = min(ctx.in_shapes[0])
    if ctx.in_shapes[0][0] != ctx.in_shapes[0][1]:
        raise NotImplementedError("trace of a non-square matrix")
    diag = lab.new(n)
    return (), (diag, diag)


register("DiagonalBackward0", _diagonal)
register("DiagonalBackward0_copy", _diagonal)
register("TraceBackward0", linear(_trace))

"""Linear operators that relabel: views, permutations, broadcasts, sums and means, diagonals,
sums of inputs, masks. Every order >= 2 is zero (:func:`~xa.families.linear_map`).

Indexing, joining and padding are linear too; they live in :mod:`xa_ops.indexing`.

A main diagonal is a tie: the x port carries the same label on both dims,
the y port carries it once, no tensor at all. An off-diagonal (offset != 0)
or the trace of a non-square matrix picks ``x[a, b]`` with ``b - a = offset``:
a 0/1 operand on those two dims.
"""

import math

import torch

from xa.factor import LabelMaker, broadcast_port, normalize_dim, reshape_ports, signed
from xa.families import linear, linear_map, weighted_sum
from xa.registry import register

# ---------------------------------------------------------------- identity and views


def _same(ctx, lab):
    labels = lab.dims(ctx.out_shape)
    return labels, labels


def _reshape(ctx, lab):
    x, y = reshape_ports(lab, ctx.in_shapes[0], ctx.out_shape)
    return y, x


for _name in ("CloneBackward0", "LazyCloneBackward0", "AliasBackward0"):
    register(_name, linear(_same))
register("NegBackward0", linear(_same, coef=-1.0))


def _pass_through(ctx, slots):
    """A node whose output k is its input k: the identity on that slot, zero on the others (and at order >= 2).

    ``DistributedDataParallel(find_unused_parameters=True)`` wraps the module's outputs so in ``_DDPSink``.
    """
    if len(slots) > 1 or slots[0] != ctx.output:
        return None
    lab = LabelMaker()
    y = lab.dims(ctx.out_shape)
    return lab.factor(y, [y], [])


_pass_through.multi_output = True
register("_DDPSinkBackward", _pass_through)
for _name in (
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "UnsqueezeBackward1",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
    "SqueezeBackward5",
):
    register(_name, linear(_reshape))

# ---------------------------------------------------------------- permutations


def _permutation(dims_of):
    def ports(ctx, lab):
        x = lab.dims(ctx.in_shapes[0])
        return tuple(x[d] for d in dims_of(ctx, len(x))), x

    return ports


def _permute_dims(ctx, ndim):
    return [normalize_dim(d, ndim) for d in ctx.saved("dims")]


def _transpose_dims(ctx, ndim):
    order = list(range(ndim))
    if ndim == 0:  # x.transpose(0, 0) of a 0-d tensor: nothing moves
        return order
    a, b = normalize_dim(ctx.saved("dim0"), ndim), normalize_dim(ctx.saved("dim1"), ndim)
    order[a], order[b] = order[b], order[a]
    return order


def _permutation_rule(dims_of):
    """A permutation's rule; ``rule.permutation(ctx, ndim)`` gives its dims, so the planner may fold
    it into its consumer's port (:mod:`xa.fold`) instead of copying blocks through it."""
    rule = linear(_permutation(dims_of))
    rule.permutation = dims_of
    return rule


register("PermuteBackward0", _permutation_rule(_permute_dims))
register("TransposeBackward0", _permutation_rule(_transpose_dims))
register("TBackward0", _permutation_rule(lambda ctx, ndim: list(range(ndim))[::-1]))

# ---------------------------------------------------------------- broadcasting and reductions


def _expand(ctx, lab):
    y = lab.dims(ctx.out_shape)
    return y, broadcast_port(lab, y, ctx.out_shape, ctx.in_shapes[0])


def _sum_all(ctx, lab):
    return (), lab.dims(ctx.in_shapes[0])


def _sum_dims(ctx, lab):
    shape = ctx.in_shapes[0]
    x = lab.dims(shape)
    dims = ctx.saved("dim") or range(len(shape))
    reduced = {normalize_dim(d, len(shape)) for d in dims}
    # keepdim's size-one dims need no label: a port only names dims of size > 1.
    return tuple(x[d] for d in range(len(shape)) if d not in reduced), x


def _mean(ports):
    def build(ctx, lab, slot):
        return (*ports(ctx, lab), ())

    def coef(ctx, slot):
        # count = reduced entries per output entry; an empty input has no derivative to scale.
        return 1.0 / max(math.prod(ctx.in_shapes[0]) // max(math.prod(ctx.out_shape), 1), 1)

    return linear_map(build, coef)


register("ExpandBackward0", linear(_expand))
register("SumBackward0", linear(_sum_all))
register("SumBackward1", linear(_sum_dims))
register("MeanBackward0", _mean(_sum_all))
register("MeanBackward1", _mean(_sum_dims))

# ---------------------------------------------------------------- diagonals and traces (einsum's repeated indices)


def _diagonal_pick(ctx, lab, rows_n, cols_n, n, offset):
    """A fresh label of size ``n`` and the 0/1 operand ``[a == i + max(-offset, 0)] [b == i + max(offset, 0)]``."""
    diag = lab.new(n)
    i = torch.arange(n, device=ctx.device)
    rows = torch.arange(rows_n, device=ctx.device).reshape(1, -1, 1) == (i + max(-offset, 0)).reshape(-1, 1, 1)
    cols = torch.arange(cols_n, device=ctx.device).reshape(1, 1, -1) == (i + max(offset, 0)).reshape(-1, 1, 1)
    return diag, (rows & cols).to(ctx.dtype)


def _diagonal(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    d1, d2 = (normalize_dim(ctx.saved(n), len(shape)) for n in ("dim1", "dim2"))
    offset = signed(ctx.saved("offset"))
    x = list(lab.dims(shape))
    rest = [x[d] for d in range(len(shape)) if d not in (d1, d2)]
    n = ctx.out_shape[-1]
    if offset == 0 and shape[d1] == shape[d2]:
        diag = lab.new(n)
        x[d1] = x[d2] = diag
        return rest + [diag], x, ()
    diag, pick = _diagonal_pick(ctx, lab, shape[d1], shape[d2], n, offset)
    return rest + [diag], x, [(pick, (diag, x[d1], x[d2]))]


def _trace(ctx, lab, slot):
    rows, cols = ctx.in_shapes[0]
    if rows == cols:
        diag = lab.new(rows)
        return (), (diag, diag), ()
    x = lab.dims((rows, cols))
    diag, pick = _diagonal_pick(ctx, lab, rows, cols, min(rows, cols), 0)
    return (), x, [(pick, (diag, *x))]


register("DiagonalBackward0", linear_map(_diagonal))
register("DiagonalBackward0_copy", linear_map(_diagonal))
register("TraceBackward0", linear_map(_trace))

# ---------------------------------------------------------------- sums of inputs


def _alpha(ctx):
    return float(ctx.saved("alpha"))


register("AddBackward0", weighted_sum(lambda ctx: (1.0, _alpha(ctx))))
register("SubBackward0", weighted_sum(lambda ctx: (1.0, -_alpha(ctx))))
register("RsubBackward0", weighted_sum(lambda ctx: (-_alpha(ctx), 1.0)))  # other - alpha * self
register("RsubBackward1", weighted_sum(lambda ctx: (-_alpha(ctx),)))  # number - alpha * self
# x + c, x - c with a Python number c (aten's Scalar overloads)
register("AddBackward1", weighted_sum(lambda ctx: (1.0,)))
register("SubBackward1", weighted_sum(lambda ctx: (1.0,)))  # x - number (aten::sub.Scalar)
# torch.fill(x, number) and x.fill_(number): a constant, every derivative zero
register("FillBackward0", lambda ctx, slots: None)
register("FillBackward2", lambda ctx, slots: None)
# ---------------------------------------------------------------- masks: masked_fill, dropout (constants)


def _masked(mask):
    def build(ctx, lab, slot):
        y = lab.dims(ctx.out_shape)
        return y, y, [(mask(ctx), y)]

    return build


def _dropout_scale(ctx, slot):
    p = float(ctx.saved("p"))
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


# x.masked_fill(mask, c): x where the mask is off
register("MaskedFillBackward0", linear_map(_masked(
    lambda ctx: (~ctx.saved("mask")).to(ctx.dtype).expand(ctx.out_shape))))
register("NativeDropoutBackward0", linear_map(_masked(lambda ctx: ctx.saved("result1").to(ctx.dtype)), _dropout_scale))

# ---------------------------------------------------------------- identities and scalings


# x.to(dtype), .float(), .double(), .to(device): the derivative is the cast back, the identity in xa's dtype.
# frac is x minus a piecewise constant: slope 1.
for _name in ("ToCopyBackward0", "FracBackward0"):
    register(_name, linear(_same))
register("Deg2RadBackward0", linear(_same, coef=math.pi / 180.0))
register("Rad2DegBackward0", linear(_same, coef=180.0 / math.pi))

# ---------------------------------------------------------------- triangles, diagonal embedding, cumulative sums


def _triangle(keep):
    """tril / triu: the input where ``keep(ones, diagonal)`` of its last two dims is one."""

    def build(ctx, lab, slot):
        y = lab.dims(ctx.out_shape)
        rows, cols = ctx.out_shape[-2:]
        mask = keep(torch.ones(rows, cols, dtype=ctx.dtype, device=ctx.device), signed(ctx.saved("diagonal")))
        return y, y, [(mask, y[-2:])]

    return build


def _diag_embed(ctx, lab, slot):
    """``y[.., a, .., b, ..] = x[.., i]`` where ``(a, b)`` is the ``i``-th entry of the offset diagonal of dims
    ``dim1, dim2`` of ``y``; the other dims of ``y`` are ``x``'s leading ones, in order."""
    out = ctx.out_shape
    d1, d2 = (normalize_dim(ctx.saved(n), len(out)) for n in ("dim1", "dim2"))
    offset = signed(ctx.saved("offset"))
    y = lab.dims(out)
    rest = [y[d] for d in range(len(out)) if d not in (d1, d2)]
    n = ctx.in_shapes[0][-1]
    diag, pick = _diagonal_pick(ctx, lab, out[d1], out[d2], n, offset)
    return y, rest + [diag], [(pick, (diag, y[d1], y[d2]))]


def _cumsum(ctx, lab, slot):
    """``y_i = sum_(j <= i) x_j`` along ``dim``: a lower triangle of ones between the two ports' labels."""
    shape = ctx.out_shape
    if not shape:  # a 0-d input is its own cumulative sum
        return (), (), ()
    d = normalize_dim(ctx.saved("dim"), len(shape))
    y = list(lab.dims(shape))
    x = list(y)
    x[d] = lab.new(shape[d])
    ones = torch.ones(shape[d], shape[d], dtype=ctx.dtype, device=ctx.device).tril()
    return tuple(y), tuple(x), [(ones, (y[d], x[d]))]


register("TrilBackward0", linear_map(_triangle(torch.tril)))
register("TriuBackward0", linear_map(_triangle(torch.triu)))
register("DiagEmbedBackward0", linear_map(_diag_embed))
register("CumsumBackward0", linear_map(_cumsum))

"""Linear operators: shape changes, reductions, sums. Every order >= 2 is zero."""

from xa.factor import LabelMaker, broadcast_port, normalize_dim, reshape_ports
from xa.registry import register

from .families import elementwise, linear, weighted_sum

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
    a, b = normalize_dim(ctx.saved("dim0"), ndim), normalize_dim(ctx.saved("dim1"), ndim)
    order[a], order[b] = order[b], order[a]
    return order


register("PermuteBackward0", linear(_permutation(_permute_dims)))
register("TransposeBackward0", linear(_permutation(_transpose_dims)))
register("TBackward0", linear(_permutation(lambda ctx, ndim: list(range(ndim))[::-1])))

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


register("ExpandBackward0", linear(_expand))
register("SumBackward0", linear(_sum_all))
register("SumBackward1", linear(_sum_dims))

# ---------------------------------------------------------------- sums of inputs


def _alpha(ctx):
    return float(ctx.saved("alpha"))


register("AddBackward0", weighted_sum(lambda ctx: (1.0, _alpha(ctx))))
register("SubBackward0", weighted_sum(lambda ctx: (1.0, -_alpha(ctx))))
register("RsubBackward0", weighted_sum(lambda ctx: (-_alpha(ctx), 1.0)))  # other - alpha * self
register("RsubBackward1", weighted_sum(lambda ctx: (-_alpha(ctx),)))  # number - alpha * self
# x * c, x / c, x + c with a Python number c (aten's Scalar overloads, recorded by cross_entropy)
register("MulBackward1", weighted_sum(lambda ctx: (float(ctx.saved("other")),)))
register("DivBackward1", weighted_sum(lambda ctx: (1.0 / float(ctx.saved("other")),)))
register("AddBackward1", weighted_sum(lambda ctx: (1.0,)))
# x.masked_fill(mask, c): x where the mask is off
register("MaskedFillBackward0", elementwise(
    lambda ctx, k: (~ctx.saved("mask")).to(ctx.dtype).expand(ctx.out_shape) if k == 1 else None))

# ---------------------------------------------------------------- dropout (the mask is a constant)


def _dropout(ctx, slots):
    if len(slots) > 1:
        return None
    lab = LabelMaker()
    y = lab.dims(ctx.out_shape)
    p = float(ctx.saved("p"))
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return lab.factor(y, [y], [(ctx.saved("result1").to(ctx.dtype), y)], coef=scale)


register("NativeDropoutBackward0", _dropout)

"""Bilinear operators: products and matrix products (mul, mm, mv, dot, bmm, addmm, addmv, addr, baddbmm)."""

from xa.factor import LabelMaker, broadcast_port
from xa.families import bilinear, einsum_ports, weighted_sum
from xa.registry import register


def _mul_ports(ctx, lab):
    y = lab.dims(ctx.out_shape)
    shapes = [s if s is not None else ctx.saved(n).shape for s, n in zip(ctx.in_shapes, ("self", "other"))]
    return (y, *(broadcast_port(lab, y, ctx.out_shape, s) for s in shapes))


def _matrix(spec, saved):
    return bilinear(einsum_ports(spec, saved), saved)


register("MulBackward0", bilinear(_mul_ports, ("self", "other")))
register("MulBackward1", weighted_sum(lambda ctx: (float(ctx.saved("other")),)))  # x * c, c a Python number
register("MmBackward0", _matrix("ik,kj->ij", ("self", "mat2")))
register("MvBackward0", _matrix("ik,k->i", ("self", "vec")))
register("DotBackward0", _matrix("k,k->", ("self", "tensor")))
register("BmmBackward0", _matrix("bik,bkj->bij", ("self", "mat2")))


def beta_plus_alpha_product(spec: str, saved: tuple):
    """Rule for ``beta * input + alpha * B(x1, x2)`` (addmm, baddbmm): slot 0 linear, slots 1 and 2 bilinear."""
    product = bilinear(einsum_ports(spec, saved, first_slot=1), saved,
                       coef=lambda ctx: float(ctx.saved("alpha")), slot_offset=1)

    def rule(ctx, slots):
        if slots == (0,):
            lab = LabelMaker()
            y = lab.dims(ctx.out_shape)
            port = broadcast_port(lab, y, ctx.out_shape, ctx.in_shapes[0])
            return lab.factor(y, [port], coef=float(ctx.saved("beta")))
        if 0 in slots:
            return None
        return product(ctx, slots)

    return rule


register("AddmmBackward0", beta_plus_alpha_product("ik,kj->ij", ("mat1", "mat2")))
register("AddmvBackward0", beta_plus_alpha_product("ik,k->i", ("mat", "vec")))
register("AddrBackward0", beta_plus_alpha_product("i,j->ij", ("vec1", "vec2")))
register("BaddbmmBackward0", beta_plus_alpha_product("bik,bkj->bij", ("batch1", "batch2")))
register("AddbmmBackward0", beta_plus_alpha_product("bik,bkj->ij", ("batch1", "batch2")))  # the sum over b

"""Convolution, average and max pooling, as tensor networks over 0/1 window tensors.

Along one spatial dim, with stride ``s``, dilation ``d`` and zero padding ``p``,
output position ``i`` reads input position ``j`` through kernel tap ``k`` when

    P[i, k, j] = [j == i s + k d - p]        (out_len x kernel_len x in_len)

a tap that lands in the padding matches no ``j``: padding is zeros, so it has
no entry. Splitting the channels into groups, ``(g, o)`` and ``(g, c)`` (a
port may split a dim), a convolution in any number of spatial dims is

    y[n, (g,o), i..] = sum_{c, k.., j..} w[(g,o), c, k..] P_1[i_1, k_1, j_1] .. x[n, (g,c), j..] + b[(g,o)]

linear in ``b`` and bilinear in ``(x, w)``: d/dx has the operands ``(w, P..)``,
d/dw has ``(x, P..)``, d^2/dx dw only the ``P``'s, d/db none (``b``'s labels
broadcast over ``n`` and ``i..``); every other derivative is zero.

A transposed convolution (``conv_transpose*``, the same node with ``transposed``
set) is the adjoint: the same window tensors with the roles of input and output
swapped, ``P[j, k, i]`` with ``j`` the input and ``i`` the output position, and
the weight laid out ``(C_in, C_out/groups, K..)``, that is ``w[(g,c), o, k..]``.
``output_padding`` only lengthens the output, which the window reads from the
output shape.

Max pooling is piecewise linear: the first derivative is a one-hot selection of
the flattened input position torch saved per output (``indices``), every higher
derivative is zero.

Average pooling is linear, one matrix per pooled dim (dilation 1):

    y[.., i_1, i_2] = c sum_{j..} A_1[i_1, j_1] A_2[i_2, j_2] x[.., j_1, j_2],   A[i, j] = sum_k P[i, k, j] / count[i]

``count`` is the window length torch divides by: the window clipped to the
padded input (``count_include_pad``) or to the input itself. Torch's divisor
is the product of these per-dim lengths, so each matrix carries its own and
``ceil_mode``'s shorter last windows come out right. ``divisor_override``
replaces it: ``count = 1`` and ``c = 1 / divisor_override``.

Every window tensor is built with ``torch.arange`` on ``ctx.device`` from the
saved ints, so the same code runs on the stand-ins of planning.
"""

import torch

from xa.factor import LabelMaker, signed
from xa.families import linear_map
from xa.registry import register


def _window(ctx, out_len: int, kernel: int, in_len: int, stride: int, dilation: int, padding: int):
    """``P[i, k, j] = [j == i stride + k dilation - padding]`` as a bool tensor."""
    i = torch.arange(out_len, device=ctx.device).view(-1, 1, 1)
    k = torch.arange(kernel, device=ctx.device).view(1, -1, 1)
    j = torch.arange(in_len, device=ctx.device).view(1, 1, -1)
    return j == i * stride + k * dilation - padding


def _per_dim(value, ndim: int) -> tuple:
    """A saved int list for ``ndim`` spatial dims; torch may save a single entry for all of them."""
    value = tuple(value)
    return value * ndim if len(value) == 1 else value


# ---------------------------------------------------------------- convolution


def _shape(ctx, slot: int, name: str) -> tuple:
    # An input that does not require grad has no in_shape; torch saved it anyway.
    shape = ctx.in_shapes[slot]
    return tuple(shape if shape is not None else ctx.saved(name).shape)


def _convolution(ctx, slots):
    if slots not in ((0,), (1,), (2,), (0, 1)):
        return None  # linear in b, bilinear in (x, w)
    transposed = ctx.saved("transposed")
    groups = ctx.saved("groups")
    n, _, *in_len = _shape(ctx, 0, "input")
    wa, wb, *kernel = _shape(ctx, 1, "weight")
    out_len = ctx.out_shape[2:]
    ndim = len(kernel)
    stride, padding, dilation = (_per_dim(ctx.saved(a), ndim) for a in ("stride", "padding", "dilation"))
    # ordinary: weight (C_out, C_in/groups, K..); transposed: weight (C_in, C_out/groups, K..)
    go, c = (wb * groups, wa // groups) if transposed else (wa, wb)

    lab = LabelMaker()
    nl, g, o, cl = lab.new(n), lab.new(groups), lab.new(go // groups), lab.new(c)
    i, k, j = lab.dims(out_len), lab.dims(kernel), lab.dims(in_len)
    y, x = (nl, g, o, *i), (nl, g, cl, *j)
    w = (g, cl, o, *k) if transposed else (g, o, cl, *k)
    if slots == (2,):
        return lab.factor(y, [(g, o)])

    # the window of the adjoint: input position j feeds output position i when i == j s + k d - p
    if transposed:
        windows = [
            (_window(ctx, *sizes).to(ctx.dtype), labels)
            for sizes, labels in zip(zip(in_len, kernel, out_len, stride, dilation, padding), zip(j, k, i))
        ]
    else:
        windows = [
            (_window(ctx, *sizes).to(ctx.dtype), labels)
            for sizes, labels in zip(zip(out_len, kernel, in_len, stride, dilation, padding), zip(i, k, j))
        ]
    if slots == (0,):
        weight = ctx.saved("weight").reshape(tuple(lab.sizes[a] for a in w))
        return lab.factor(y, [x], [(weight, w), *windows])
    if slots == (1,):
        inp = ctx.saved("input").reshape(n, groups, c, *in_len)
        return lab.factor(y, [w], [(inp, x), *windows])
    return lab.factor(y, [x, w], windows)


register("ConvolutionBackward0", _convolution)

# ---------------------------------------------------------------- average pooling


def _pool_matrix(ctx, out_len, kernel, in_len, stride, padding, count_include_pad, override):
    """``A[i, j] = sum_k P[i, k, j] / count[i]``, ``count`` as torch's avg_pool kernels compute it."""
    start = torch.arange(out_len, device=ctx.device) * stride - padding
    end = torch.clamp(start + kernel, max=in_len + padding)
    if override is not None:
        count = torch.ones_like(start)
    elif count_include_pad:
        count = end - start
    else:
        # an empty window (none in torch's own output sizes) has no entries; clamp only avoids 0/0
        count = (torch.clamp(end, max=in_len) - torch.clamp(start, min=0)).clamp(min=1)
    taps = _window(ctx, out_len, kernel, in_len, stride, 1, padding).sum(1)
    return taps.to(ctx.dtype) / count.to(ctx.dtype).unsqueeze(1)


def _avg_pool(ndim: int):
    """Rule for ``avg_pool{ndim}d`` on the last ``ndim`` dims (batched or not)."""

    def build(ctx, lab, slot):
        shape = tuple(ctx.in_shapes[0])
        lead, in_len, out_len = shape[:-ndim], shape[-ndim:], ctx.out_shape[-ndim:]
        kernel = _per_dim(ctx.saved("kernel_size"), ndim)
        stride = _per_dim(ctx.saved("stride") or kernel, ndim)  # stride () means stride = kernel
        padding = _per_dim(ctx.saved("padding"), ndim)
        override = ctx.saved("divisor_override")
        include_pad = ctx.saved("count_include_pad")

        b, i, j = lab.dims(lead), lab.dims(out_len), lab.dims(in_len)
        matrices = [
            (_pool_matrix(ctx, *sizes, include_pad, override), labels)
            for sizes, labels in zip(zip(out_len, kernel, in_len, stride, padding), zip(i, j))
        ]
        return (*b, *i), (*b, *j), matrices

    def coef(ctx, slot):
        override = signed(ctx.saved("divisor_override"))  # saved unsigned: -2 reads as 2**64 - 2
        return 1.0 if override is None else 1.0 / override

    return linear_map(build, coef)


register("AvgPool2DBackward0", _avg_pool(2))  # avg_pool1d too: torch records it as unsqueeze, 2d pool, squeeze
register("AvgPool3DBackward0", _avg_pool(3))

# ---------------------------------------------------------------- max pooling


def _max_pool(ndim: int):
    """Rule for ``max_pool{ndim}d`` with indices, on the last ``ndim`` dims (batched or not).

    Piecewise linear: ``y[.., i..] = x[.., indices[.., i..]]`` with ``indices`` the flattened
    spatial position torch saved per output, so the first derivative is the one-hot
    ``S[.., i.., q] = [indices[.., i..] == q]`` over the flattened input positions ``q``,
    and every higher derivative is zero.
    """

    def build(ctx, lab, slot):
        shape = tuple(ctx.in_shapes[0])
        lead, out_len = shape[:-ndim], ctx.out_shape[-ndim:]
        in_numel = 1
        for size in shape[-ndim:]:
            in_numel *= size
        indices = ctx.saved("result1")
        positions = torch.arange(in_numel, device=ctx.device)
        select = (indices.unsqueeze(-1) == positions).to(ctx.dtype)

        b, i, q = lab.dims(lead), lab.dims(out_len), lab.new(in_numel)
        return (*b, *i), (*b, q), [(select, (*b, *i, q))]

    return linear_map(build)


register("MaxPool2DWithIndicesBackward0", _max_pool(2))  # max_pool1d too: unsqueeze, 2d pool, squeeze
register("MaxPool3DWithIndicesBackward0", _max_pool(3))

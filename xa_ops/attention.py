"""Attention: fused scaled_dot_product_attention, and the pieces of its unfused form.

scaled_dot_product_attention: per head (every leading dim of ``q``, ``k``,
``v``; one tied label on every port)

    out = softmax(q k^T * scale + mask) v,

``q`` ``(L, E)``, ``k`` ``(S, E)``, ``v`` ``(S, Ev)``, ``mask`` the additive
float mask (torch saves a boolean mask as 0 / -inf), ``-inf`` above the
diagonal for ``is_causal``, ``scale`` ``1 / sqrt(E)`` unless given. Within a
head the map is dense: the mixed derivative over the requested slots is
nested ``jacfwd`` of that function, one level per slot, vmapped over the
heads. It is linear in ``v``, so two ``v`` slots are zero. Dropout draws a
random mask torch does not save: refused.

The unfused form (3-d inputs, dropout, a mask that requires grad) records
``_safe_softmax``, softmax that gives zeros on fully masked rows: its
derivatives are softmax's in terms of the saved result (zero on such rows).
It also records ``baddbmm`` and ``mul`` by a Python number (``MulBackward1``),
whose rules are in :mod:`xa_ops.bilinear` and :mod:`xa_ops.linear`.
"""

from __future__ import annotations

import math

import torch
from torch.func import jacfwd, vmap

from xa.errors import UnsupportedOperatorError
from xa.factor import LabelMaker
from xa.families import Piece, composite
from xa.registry import register

from .reductions import softmax

# ---------------------------------------------------------------- scaled_dot_product_attention

_QKV = ("query", "key", "value")
JACFWD_WORKSPACE = 2


def _attention(q, k, v, mask, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1) @ v


def _sdpa(ctx, slots):
    if float(ctx.saved("dropout_p")) > 0:
        raise UnsupportedOperatorError(
            f"{ctx.name} with dropout_p > 0: torch does not save the dropout mask, so its derivatives "
            "cannot be rebuilt; use dropout_p=0 (or model.eval()) for higher-order derivatives"
        )
    if any(s > 2 for s in slots):
        raise UnsupportedOperatorError(f"{ctx.name}: derivatives w.r.t. the attention bias are not supported")
    if slots.count(2) > 1:
        return None
    q, k, v = (ctx.saved(n).to(ctx.dtype) for n in _QKV)
    batch = q.shape[:-2]
    if k.shape[:-2] != batch or v.shape[:-2] != batch:
        raise UnsupportedOperatorError(
            f"{ctx.name}: query, key and value with different leading dims {[tuple(t.shape) for t in (q, k, v)]}"
        )
    heads = math.prod(batch)
    (L, E), (S, Ev) = q.shape[-2:], v.shape[-2:]
    shapes = [(L, E), (S, E), (S, Ev)]
    lab = LabelMaker()
    h = lab.new(heads)
    y = lab.dims((L, Ev))
    xs = [lab.dims(shapes[s]) for s in slots]
    out_shape = (heads, L, Ev, *(n for s in slots for n in shapes[s]))
    if ctx.planning:  # the dense derivative is made only to run
        dense = torch.empty(out_shape, dtype=ctx.dtype, device="meta")
    else:
        scale, mask = _scale_and_mask(ctx, q, L, S, E)
        mask = mask.expand(*batch, L, S).reshape(heads, L, S)
        f = lambda q, k, v, m: _attention(q, k, v, m, scale)
        for s in slots:
            f = jacfwd(f, argnums=s)
        dense = vmap(f)(*(t.reshape(heads, *t.shape[-2:]) for t in (q, k, v)), mask)
    # nested jacfwd under vmap holds the result and the tangents it is built from: about two more of its size
    return lab.factor((h, *y), [(h, *x) for x in xs], [(dense, (h, *y, *sum(xs, ())))],
                      workspace=JACFWD_WORKSPACE * dense.numel())


def _scale_and_mask(ctx, q, L, S, E):
    """The softmax's scale and its additive ``(L, S)`` (or broadcastable) mask, causal and saved parts."""
    scale = ctx.saved("scale")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    mask = torch.zeros((L, S), dtype=ctx.dtype, device=q.device)
    if ctx.saved("is_causal"):
        # torch's causal mask is aligned top-left: query i sees keys 0..i.
        causal = torch.ones((L, S), dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~causal, -math.inf)
    saved_mask = _saved_mask(ctx)
    if saved_mask is not None:
        if saved_mask.dtype == torch.bool:
            saved_mask = torch.zeros_like(saved_mask, dtype=ctx.dtype).masked_fill(~saved_mask, -math.inf)
        mask = mask + saved_mask.to(ctx.dtype)
    return scale, mask


def _sdpa_pieces(ctx):
    """``softmax(q k^T * scale + mask) v`` per head as bmm, scale, softmax's pieces and bmm (:mod:`xa.composite`).

    The mask is a constant: it changes no derivative, only the saved attention weights ``p``,
    recomputed here from the saved q, k and mask. Dropout, a bias that needs grad and
    different leading dims stay with the dense rule, which refuses them with a typed error.
    """
    if float(ctx.saved("dropout_p")) > 0 or any(s is not None for s in ctx.in_shapes[3:]):
        return None
    q, k, v = (ctx.saved(n).to(ctx.dtype) for n in _QKV)
    batch = q.shape[:-2]
    if k.shape[:-2] != batch or v.shape[:-2] != batch:
        return None
    heads = math.prod(batch)
    (L, E), (S, Ev) = q.shape[-2:], v.shape[-2:]
    scale, mask = _scale_and_mask(ctx, q, L, S, E)
    q3, k3, v3 = q.reshape(heads, L, E), k.reshape(heads, S, E), v.reshape(heads, S, Ev)
    kt = k3.transpose(1, 2)
    p = torch.softmax(torch.bmm(q3, kt) * scale + mask.expand(*batch, L, S).reshape(heads, L, S), dim=-1)
    pieces = []

    def add(name, shape, inputs, saved, what):
        pieces.append(Piece(name, tuple(shape), inputs, saved, what))
        return ("piece", len(pieces) - 1)

    def view(slot, shape, what):
        if ctx.in_shapes[slot] is None:
            return None
        if tuple(ctx.in_shapes[slot]) == tuple(shape):
            return ("in", slot)
        return add("ViewBackward0", shape, (("in", slot),), {}, what)

    qv, kv, vv = view(0, q3.shape, "query per head"), view(1, k3.shape, "key per head"), view(2, v3.shape,
                                                                                             "value per head")
    a = None
    if qv is not None or kv is not None:
        if kv is not None:
            kv = add("TransposeBackward0", kt.shape, (kv,), {"dim0": 1, "dim1": 2}, "key transposed")
        scores = add("BmmBackward0", (heads, L, S), (qv, kv), {"self": q3, "mat2": kt}, "q k^T")
        scores = add("MulBackward1", (heads, L, S), (scores,), {"other": scale}, "* scale")
        ones = torch.ones((heads, L, 1), dtype=p.dtype, device=p.device)
        e = add("ExpBackward0", p.shape, (scores,), {"result": p}, "softmax's exp")
        total = add("SumBackward1", ones.shape, (e,), {"dim": (2,), "keepdim": True}, "softmax's sum")
        a = add("DivBackward0", p.shape, (e, total), {"self": p, "other": ones}, "softmax")
    out = add("BmmBackward0", (heads, L, Ev), (a, vv), {"self": p, "mat2": v3}, "weights @ v")
    if len(q.shape) != 3 or batch != (heads,):
        add("ViewBackward0", (*batch, L, Ev), (out,), {}, "heads back")
    return pieces


def _saved_mask(ctx):
    # The CPU kernel saves ``attn_mask``, the CUDA efficient and cuDNN kernels ``attn_bias``, flash none.
    for name in ("attn_mask", "attn_bias"):
        if ctx.has(name):
            return ctx.saved(name)
    return None


def _sdpa_entries(ctx, order):
    """The composite's ``entries``: per head, the output's entries times q, k and v's to the order."""
    q, k, v = (ctx.saved(n).shape for n in _QKV)
    heads = math.prod(q[:-2])
    per_head = [math.prod(t[-2:]) for t in (q, k, v)]
    return heads * q[-2] * v[-1] * sum(per_head) ** order


_sdpa_rule = composite(_sdpa, _sdpa_pieces, _sdpa_entries)
register("ScaledDotProductFlashAttentionForCpuBackward0", _sdpa_rule)
# CUDA kernels: same saved names (query, key, value, scale, is_causal, dropout_p; the bias as attn_bias),
# read from torch/include/torch/csrc/autograd/generated/Functions.h.
register("ScaledDotProductEfficientAttentionBackward0", _sdpa_rule)
register("ScaledDotProductFlashAttentionBackward0", _sdpa_rule)
register("ScaledDotProductCudnnAttentionBackward0", _sdpa_rule)

# ---------------------------------------------------------------- the unfused form's own node

register("SafeSoftmaxBackward0", softmax)

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
    q, k, v = (ctx.saved(n).detach().to(ctx.dtype) for n in _QKV)
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
        mask = mask.expand(*batch, L, S).reshape(heads, L, S)
        f = lambda q, k, v, m: _attention(q, k, v, m, scale)
        for s in slots:
            f = jacfwd(f, argnums=s)
        dense = vmap(f)(*(t.reshape(heads, *t.shape[-2:]) for t in (q, k, v)), mask)
    # nested jacfwd under vmap holds the result and the tangents it is built from: about two more of its size
    return lab.factor((h, *y), [(h, *x) for x in xs], [(dense, (h, *y, *sum(xs, ())))],
                      workspace=JACFWD_WORKSPACE * dense.numel())


def _saved_mask(ctx):
    # The CPU kernel saves ``attn_mask``, the CUDA efficient and cuDNN kernels ``attn_bias``, flash none.
    for name in ("attn_mask", "attn_bias"):
        if ctx.has(name):
            return ctx.saved(name).detach()
    return None


register("ScaledDotProductFlashAttentionForCpuBackward0", _sdpa)
# CUDA kernels: same saved names (query, key, value, scale, is_causal, dropout_p; the bias as attn_bias),
# read from torch/include/torch/csrc/autograd/generated/Functions.h.
register("ScaledDotProductEfficientAttentionBackward0", _sdpa)
register("ScaledDotProductFlashAttentionBackward0", _sdpa)
register("ScaledDotProductCudnnAttentionBackward0", _sdpa)

# ---------------------------------------------------------------- the unfused form's own node

register("SafeSoftmaxBackward0", softmax)

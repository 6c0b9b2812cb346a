"""Operators that need their own formula: softmax and prod.

Both are dense along the dim they act on, and batched (tied labels) along
every other dim. Their k-th derivatives are built from the saved values
with broadcasting and structural masks: no branch looks at a value.

softmax: with ``y = softmax(x)``, ``dy_i/dx_j = y_i (d_ij - y_j)``. So
``d^k y_i0 / dx_i1 .. dx_ik`` is a sum over set partitions ``P`` of
``{0..k}`` of ``c_P * prod_{B in P} y_B * [all indices in B equal]``, and
differentiating one term by ``x_j`` either puts ``j`` into one of its
blocks (+1 each) or adds the block ``{j}`` (-|P|).

prod: ``d^k prod(x) / dx_i1 .. dx_ik`` is the product of the entries not
among ``i1..ik`` when those are distinct, and zero otherwise; it is built
without dividing by ``x``, so zeros in ``x`` are exact.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from xa.factor import LabelMaker, normalize_dim
from xa.registry import register


@lru_cache(maxsize=None)
def _softmax_terms(k: int) -> tuple:
    """``((coef, partition), ...)`` for the k-th derivative; blocks are sorted tuples."""
    terms = {((0,),): 1}
    for j in range(1, k + 1):
        new: dict = {}
        for part, c in terms.items():
            for b in range(len(part)):
                merged = tuple(sorted(part[:b] + (tuple(sorted(part[b] + (j,))),) + part[b + 1:]))
                new[merged] = new.get(merged, 0) + c
            grown = tuple(sorted(part + ((j,),)))
            new[grown] = new.get(grown, 0) - c * len(part)
        terms = {p: c for p, c in new.items() if c != 0}
    return tuple((c, p) for p, c in sorted(terms.items()))


def _equal_positions(n: int, positions: tuple, total: int, device) -> torch.Tensor:
    """Boolean mask over ``total`` positions of size ``n`` (others size 1): all listed indices equal."""
    idx = torch.arange(n, device=device)
    first = idx.reshape([n if p == positions[0] else 1 for p in range(total)])
    mask = torch.ones([n if p in positions else 1 for p in range(total)], dtype=torch.bool, device=device)
    for p in positions[1:]:
        mask = mask & (first == idx.reshape([n if q == p else 1 for q in range(total)]))
    return mask


def softmax_derivative(s: torch.Tensor, k: int) -> torch.Tensor:
    """``d^k s_i0 / dx_i1 .. dx_ik`` for ``s = softmax(x)`` over the last dim, shaped ``(*batch, n, .., n)``."""
    n, batch, total = s.shape[-1], s.shape[:-1], k + 1
    derivative = None
    for coef, partition in _softmax_terms(k):
        term = None
        for block in partition:
            expand = [n if p == block[0] else 1 for p in range(total)]
            piece = s.reshape(*batch, *expand) * _equal_positions(n, block, total, s.device)
            term = piece if term is None else term * piece
        term = coef * term
        derivative = term if derivative is None else derivative + term
    return derivative


def _softmax(ctx, slots):
    k = len(slots)
    y = ctx.saved("result")
    d = normalize_dim(ctx.saved("dim"), y.dim())
    yb = y.movedim(d, -1) if y.dim() else y.reshape(1)
    n = yb.shape[-1]
    batch = yb.shape[:-1]
    total = k + 1
    derivative = softmax_derivative(yb, k)
    lab = LabelMaker()
    bl = lab.dims(batch)
    pos = lab.dims([n] * total)

    def port(p):
        labels = list(bl)
        labels.insert(d, pos[p])
        return tuple(labels) if y.dim() else (pos[p],)

    return lab.factor(port(0), [port(p) for p in range(1, total)], [(derivative, bl + pos)])


def _prod(ctx, slots, dim=None):
    k = len(slots)
    x = ctx.saved("self")
    xb = x.reshape(-1) if dim is None else x.movedim(dim, -1)
    n = xb.shape[-1]
    if k > n:
        return None
    batch = xb.shape[:-1]
    total = k + 1
    left_out = torch.zeros([n] * total, dtype=torch.bool, device=xb.device)
    distinct = torch.ones([n] * k, dtype=torch.bool, device=xb.device)
    for a in range(k):
        left_out = left_out | _equal_positions(n, (a, k), total, xb.device)
        for b in range(a + 1, k):
            distinct = distinct & ~_equal_positions(n, (a, b), k, xb.device)
    kept = torch.where(left_out, torch.ones((), dtype=xb.dtype, device=xb.device),
                       xb.reshape(*batch, *([1] * k), n))
    derivative = kept.prod(-1) * distinct
    lab = LabelMaker()
    bl = lab.dims(batch)
    pos = lab.dims([n] * k)
    if dim is None:
        # Each x port is the flattened input: one label of size numel covers every dim.
        return lab.factor((), [(p,) for p in pos], [(derivative, pos)])

    def port(p):
        labels = list(bl)
        labels.insert(dim, p)
        return tuple(labels)

    return lab.factor(bl, [port(p) for p in pos], [(derivative, bl + pos)])


def _prod_dim(ctx, slots):
    return _prod(ctx, slots, normalize_dim(ctx.saved("dim"), len(ctx.in_shapes[0])))


register("SoftmaxBackward0", _softmax)
register("ProdBackward0", _prod)
register("ProdBackward1", _prod_dim)

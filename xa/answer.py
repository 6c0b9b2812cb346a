"""Running a query: its one plan, within the budget, and the answer read from the source's jets.

A query's plan (:func:`xa.plan.build`) is forward jets of the rows it asks
(the top order collapsed to its weighted sums), or backprop of the whole
derivative tensor, read at those rows here -- whichever was cheaper. Either
way the query (:mod:`xa.queries`) turns the source's jets per order into its
answer, shaped like the source.
"""

from __future__ import annotations

import math

import torch

from . import budget
from . import plan as planner
from .attach import flat
from .jets import Rows, rows_of
from .queries import Query, SourceShape
from .request import Request


def answer(request: Request, query: Query):
    """The answer to ``query``, whose request is ``request`` (:func:`xa.request.query`)."""
    graph, (i,) = request.graph, request.requested
    plan = planner.build(request)
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    rows = request.query.rows(n)
    seeds = query.seeds(rows, n, graph.dtype, graph.device)
    if rows.per_sample and batch is None and "directions" in seeds:
        seeds = {**seeds, "directions": seeds["directions"][0]}  # one sample, planned as the whole graph
    ran, results, _ = budget.compute(request, plan, seeds)
    if plan.direction == "forward":
        jets = results[i]
    else:
        jets = _rows_from_blocks(graph, ran, i, results[i], rows, seeds)
    d = None if ran.batch is None else ran.batch.source_dim
    like = SourceShape(graph.source_shape, graph.dtype, graph.device, d)
    return query.answer(jets, rows, n, like, seeds)


def _rows_from_blocks(graph, plan, i, blocks, rows: Rows, seeds: dict) -> list:
    """The whole tensor's blocks read at a query's rows, laid out like the forward jets (backward direction)."""
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    lead = graph.source_shape if batch is None else (batch.total,) + batch.shape(graph, 0)
    out = []
    for k, t in enumerate(flat(graph, i, rows.order, blocks, batch), start=1):
        kind = rows.kinds[k - 1]
        rows_k = rows_of(rows.m, kind)
        t = t.to(graph.dtype)
        if not rows.seeded:
            at = torch.tensor([sum(a[p] * n ** (k - 1 - p) for p in range(k)) for a in rows_k], dtype=torch.long,
                              device=t.device)
            r = t.reshape(t.shape[:t.dim() - k] + (n ** k,)).index_select(-1, at).movedim(-1, 0)
        elif rows.per_sample and batch is not None:  # each sample's own directions (B, m, n')
            r = _per_sample_rows(t, k, n, rows_k, seeds["directions"])
        else:  # d^k S [d_(a_1), .., d_(a_k)]: contract one leaf position at a time with each row's direction
            size = math.prod(t.shape[:t.dim() - k])
            r = t.reshape(size, n, n ** (k - 1))
            for p in range(k):
                at = torch.tensor([a[p] for a in rows_k], dtype=torch.long, device=t.device)
                Dp = seeds["directions"].index_select(0, at)
                if p == 0:
                    r = torch.einsum("lir,ai->alr", r, Dp)
                else:
                    r = torch.einsum("alir,ai->alr", r.reshape(len(rows_k), size, n, -1), Dp)
        r = r.reshape((len(rows_k),) + tuple(lead))
        if rows.collapse and k == rows.order:
            r = torch.tensordot(seeds["weights"].to(r.dtype), r, dims=([1], [0]))
        out.append(r)
    return out


def _per_sample_rows(t: torch.Tensor, k: int, n: int, rows_k, directions: torch.Tensor) -> torch.Tensor:
    """``d^k S_b [d_(b, a_1), .., d_(b, a_k)]`` from each sample's whole block ``(B, *s', n, .., n)``, laid
    out ``(rows, B, s)``: one leaf position at a time contracted with each sample's direction of the row."""
    B = t.shape[0]
    size = math.prod(t.shape[1:t.dim() - k])
    r = t.reshape(B, size, n, n ** (k - 1))
    for p in range(k):
        at = torch.tensor([a[p] for a in rows_k], dtype=torch.long, device=t.device)
        Dp = directions.to(t.dtype).index_select(1, at)  # (B, rows, n)
        if p == 0:
            r = torch.einsum("bsir,bai->absr", r, Dp)
        else:
            r = torch.einsum("absir,bai->absr", r.reshape(len(rows_k), B, size, n, -1), Dp)
    return r

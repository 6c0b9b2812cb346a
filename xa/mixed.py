"""Mixed partials across leaves: ``d^k S / dA^j dB^l``, backprop's joint blocks of the leaves asked together.

Backprop (:mod:`xa.backprop`) already builds the joint blocks of several
values on its way down; a mixed request keeps those of the leaves asked
(``request.mixed``: each block's sorted value indices), one plan for every
block asked. Here each block is laid out in the order the user named the
leaves.
"""

from __future__ import annotations

import torch

from . import budget
from . import plan as planner
from .queries import Mixed
from .request import Request


def blocks(request: Request, query: Mixed):
    """Each request of ``query`` as ``(s, n_0, .., n_(k-1))`` (per sample ``(B, s', n_0', ..)``)."""
    graph = request.graph
    plan = planner.build(request)
    ran, results, _ = budget.compute(request, plan)
    batch = ran.batch
    value = {id(w): graph.find(w) for w in query.leaves}
    out = []
    for r, key in zip(query.requests, query.keys(value)):
        t = results[("mixed", key)][0]
        sizes = [graph.values[u].numel if batch is None else batch.numel(graph, u) for u in key]
        lead = (graph.values[0].numel,) if batch is None else (batch.total, batch.numel(graph, 0))
        if request.one_sample:  # one sample: planned whole, laid out per sample as xa.backward does
            lead = (1,) + lead
        if t is None:
            t = torch.zeros(lead + tuple(sizes), dtype=graph.dtype, device=graph.device)
        t = t.reshape(lead + tuple(sizes))
        # the block's positions follow the sorted values; the request's order may differ
        free = list(range(len(key)))
        perm = []
        for w in r:
            p = next(p for p in free if key[p] == value[id(w)])
            free.remove(p)
            perm.append(p)
        t = t.permute(tuple(range(len(lead))) + tuple(len(lead) + p for p in perm))
        out.append(t.to(graph.dtype).contiguous())
    return out[0] if query.single else tuple(out)

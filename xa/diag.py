"""The diagonal of a derivative: ``d^k S / dL_i^k`` for every entry ``i`` of each leaf asked.

Forward, the query's jets keep the rows ``(i,)*j`` of every order (``n`` rows each,
:class:`xa.queries.Pure`). Backward, backprop runs with each leaf's positions tied
(``request.diagonal``, :func:`xa.backprop.build_backward`): a block that holds the leaf
``j`` times keeps only its diagonal, so the terms that write the leaf's block compute
that alone (``einsum('boo,bi,bi->boi')`` for a linear layer's weight: the diagonal of the
output's block times the input squared) while the blocks of intermediate values stay
dense. That is the cost of BackPACK's exact diagonal, per sample or summed, for a
parameter of any size: nothing of ``n^2`` entries is built. Here either plan's results
are laid out ``(*S.shape, *L.shape)`` (per sample, ``L``'s one-sample shape).
"""

from __future__ import annotations

import math

import torch

from . import budget
from . import plan as planner
from .batch import analyze
from .errors import BatchMixingError
from .queries import Pure
from .request import Request


def diagonal(request: Request, query: Pure):
    """The answer to ``query`` (:func:`xa.diagonal`): one tensor per leaf, or the one tensor of a single leaf."""
    graph, k = request.graph, query.order
    plan = planner.build(request)
    ran, results, _ = budget.compute(request, plan)
    batch = ran.batch
    s_shape = graph.source_shape
    out = {}
    for w in query.leaves:
        i = graph.find(w)
        t = results[i][k - 1]
        if batch is None:
            s, n = math.prod(s_shape), graph.values[i].numel
            if t is None:
                t = torch.zeros((s, n), dtype=graph.dtype, device=graph.device)
            elif ran.direction == "forward":  # the jet's rows (i,)*k, in order of i: (n, *S)
                t = t.reshape(n, s).t()
            t = t.reshape(s_shape + _one_sample(request, i, w))
        else:
            d, b = batch.source_dim, batch.total
            rest = s_shape[:d] + s_shape[d + 1:]
            s, n = batch.numel(graph, 0), batch.numel(graph, i)
            if t is None:
                t = torch.zeros((b, s, n), dtype=graph.dtype, device=graph.device)
            elif ran.direction == "forward":  # (n', B, *S')
                t = t.reshape(n, b, s).permute(1, 2, 0)
            t = t.reshape((b,) + rest + batch.shape(graph, i)).movedim(0, d)
        out[id(w)] = t.to(dtype=w.dtype, device=w.device)
    return out[id(query.wrt)] if query.single else tuple(out[id(w)] for w in query.wrt)


def _one_sample(request: Request, i: int, leaf: torch.Tensor) -> tuple:
    """The shape of the leaf's entries of one sample: all of it, or with ``batch_dim`` on one sample
    (planned as the whole graph), the leaf without the dim that holds the sample, if it has one."""
    if request.sample_dim is None:
        return tuple(leaf.shape)
    try:
        layout = analyze(request.graph, request.rules, request.sample_dim)
    except (BatchMixingError, ValueError, IndexError, RuntimeError):  # noqa: BLE001 -- a layout we cannot read
        return tuple(leaf.shape)
    return tuple(layout.shape(request.graph, i))

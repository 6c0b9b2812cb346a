"""``xa.explain``: print the contraction plan before anything runs.

It builds the same request as the call it explains (:mod:`xa.request`) and
takes the same plan (:mod:`xa.plan`, from the cache where the call planned it
before): the graph as captured, a query's rows and its price against the whole
tensor, then the plan itself (``str(plan)``).
"""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

import torch

from . import plan as planner
from . import request as requests
from .jets import count
from .plan import Plan
from .queries import Mixed, Pure


def explain(source: torch.Tensor, order: int = 1, target: Optional[torch.Tensor] = None,
            configurations=None, direction: str = "auto", file: Optional[TextIO] = None,
            batch_dim: Optional[int] = None, query=None) -> Plan:
    """Print the captured graph and the plan of ``xa.backward(source, order, target)``.

    Nothing is computed: the graph is read and planned (or the plan is taken
    from the cache), then described: the nodes with their shapes, per
    backprop step every einsum term with its operand shapes, opt_einsum's
    FLOP count and largest intermediate, then the totals.

    Args:
        source: the tensor ``xa.backward`` would differentiate.
        order: the highest derivative order.
        target: as in :func:`xa.backward`.
        configurations: as in :func:`xa.backward`.
        direction: as in :func:`xa.backward`; ``"auto"`` shows both prices.
        file: where to print (default ``sys.stdout``).
        batch_dim: as in :func:`xa.backward`: the plan per sample, with the
            sample dim of every value and the cost per sample.
        query: a query (:mod:`xa.queries`: ``Laplacian(x)``, ``Partials(x, indices)``,
            ``Operator(x, coefficients)``, ``Biharmonic(x)``, ``Directional(x, v, order)``,
            ``Mixed((A, B))``):
            the plan that answers it (``order`` and ``target`` are the query's), the rows
            it keeps per order, and its FLOPs against building the whole tensor.

    Returns:
        The :class:`~xa.plan.Plan` (``str(plan)`` is what is printed after the graph), for programs: ``plan.flops``,
        ``plan.peak_bytes``, ``plan.prices``, ``plan.direction``,
        ``plan.steps`` (each with its ``terms``: equation, shapes, opt_einsum
        ``info``), ``plan.cached``.

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> out = io.StringIO()
        >>> plan = xa.explain(torch.tanh(x).sum(), order=2, file=out)
        >>> out.getvalue().splitlines()[0]
        'xa plan: order 2, source #0 of shape [], torch.float64, cpu'
        >>> plan.order, plan.flops == min(plan.prices.values())
        (2, True)
    """
    out = file if file is not None else sys.stdout
    w = out.write
    if query is not None:
        request = requests.query(source, query, batch_dim, configurations, None, direction, caller="xa.explain")
    else:
        request = requests.derivatives(source, order, target, configurations, direction, batch_dim=batch_dim,
                                       caller="xa.explain")
    plan = planner.build(request)
    graph = request.graph
    w(f"xa plan: order {plan.order}, source #0 of shape {list(graph.source_shape)}, {graph.dtype}, {graph.device}\n")
    if isinstance(query, Mixed):
        w(_mixed_line(request) + "\n")
    elif isinstance(query, Pure):
        w(_diagonal_line(request, plan) + "\n")
    elif query is not None:
        for line in _query_lines(request, plan):
            w(line + "\n")
    wanted = set(plan.results)
    batch = plan.batch
    folded = {graph.values[c].inputs[slot]: c for c, slots in plan.folds.items() for slot in slots}
    tied = {}
    if plan.direction == "forward":
        for leaf, (items, rows_t) in plan.tied.items():
            for line in _sparsity_lines(request, plan, leaf, items, rows_t):
                w(line + "\n")
            tied.update({i: leaf for i in items.tied})
    if batch is not None:
        w(f"per sample: the source's dim {batch.source_dim} is the sample index b, {batch.total} samples; every "
          f"block carries b once (never b x b), as its first dim (a jet: after its rows)\n")
    w("graph (values in capture order, #0 the source; * = partials requested):\n")
    for v in graph.values:
        kind = "leaf" if v.leaf is not None else "node"
        name = "AccumulateGrad" if v.leaf is not None else v.title
        mark = " *" if v.index in wanted else ""
        ins = ", ".join("const" if i is None else f"#{i}" for i in v.inputs)
        sample = ""
        if batch is not None:
            sample = "  " + batch.describe(graph, v.index)
        if v.index in tied:
            sample += f"  (items of leaf #{tied[v.index]} kept apart)"
        if v.index in folded:
            sample += f"  (folded: #{folded[v.index]} reads its input in place, no copy)"
        w(f"  #{v.index:<3} {kind} {name:<28} {str(list(v.shape)):<14} {('<- ' + ins) if ins else ''}{mark}"
          f"{sample}\n")
    w(str(plan))
    return plan


def _query_lines(request, plan: Plan) -> list:
    """A query's leaf, the rows it keeps per order, and its FLOPs against the whole derivative tensor's."""
    graph, ask, (i,) = request.graph, request.query, request.requested
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    rows = ask.rows(n)
    whole = planner.build(request.replace(query=None, direction="forward"))
    backward = plan.prices.get("backward")
    per = " per sample" if batch is not None else ""
    lines = [f"query: {ask.name} of the source w.r.t. leaf #{i} ({n} entries{per}), order {ask.order}, "
             f"answered by {plan.direction} {'jets of its rows' if plan.direction == 'forward' else 'backprop'}"]
    dirs = f"{rows.m} seeded directions" if rows.seeded else f"the leaf's {rows.m} entries"
    kept = []
    for k, kind in enumerate(rows.kinds, start=1):
        note = f" summed into {rows.collapse} on the fly (collapsed)" if rows.collapse and k == rows.order else ""
        kept.append(f"order {k}: {count(rows.m, kind)} of {math.comb(rows.m + k - 1, k)}{note}")
    lines.append(f"rows kept (sorted multi-indices over {dirs}): " + "; ".join(kept))
    full = min(whole.flops, backward if backward is not None else whole.flops)
    lines.append(f"FLOPs: forward (the query's rows) {plan.prices['forward']:.4g}"
                 + (f", backward (the whole tensor, contracted at the leaf) {backward:.4g}" if backward else "")
                 + f"; the whole derivative tensor by forward jets: {whole.flops:.4g}; "
                 f"this plan: {plan.flops:.4g} ({full / max(plan.flops, 1):.3g}x fewer than the whole tensor's "
                 "cheaper plan)")
    return lines


def _sparsity_lines(request, plan: Plan, leaf: int, items, rows_t) -> list:
    """Block sparsity of a leaf's jets: its items, the values that keep them apart, the rows kept, the FLOPs saved."""
    dense = planner.build(request.replace(sparse=False, direction="forward"))
    n = items.numel * items.items
    kept = "; ".join(f"order {k}: {count(rows_t.m, kind)} per item"
                     + (f" summed into {rows_t.collapse}" if rows_t.collapse and k == rows_t.order else "")
                     for k, kind in enumerate(rows_t.kinds, start=1))
    return [f"block sparsity: leaf #{leaf} is {items.items} items of {items.numel} entries each"
            f"{' per sample' if plan.batch is not None else ''} ({n} in all); {len(items.tied)} values keep its items "
            f"apart (marked below), their jets kept per item over its own entries ({kept}), written into the "
            "leaf's rows where a node mixes items",
            f"FLOPs: this plan {plan.flops:.4g}; the dense plan (every row through every node) {dense.flops:.4g} "
            f"({dense.flops / max(plan.flops, 1):.3g}x)"]


def _mixed_line(request) -> str:
    asked = ", ".join("d^{} S / {}".format(len(k), " ".join(f"d#{u}" for u in k)) for k in request.mixed)
    return (f"query: mixed partials {asked}, answered by backprop; the joint blocks of leaves "
            f"{list(request.requested)} are kept (block (a, b) = d^2 S / d#a d#b)")


def _diagonal_line(request, plan: Plan) -> str:
    prices = ", ".join(f"{d} {f:.4g}" for d, f in sorted(plan.prices.items()))
    how = ("jets of the rows (i,)*j" if plan.direction == "forward" else
           "backprop with each leaf's positions tied (its blocks keep their diagonal only)")
    return (f"query: diagonal d^{request.order} S / dL_i^{request.order} of leaves {list(request.requested)}, "
            f"answered by {plan.direction} {how}; FLOPs {prices}")

"""``xa.explain``: print the contraction plan before anything runs."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import torch

from .api import plan_for
from .attach import size
from .plan import Plan


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
        The :class:`~xa.plan.Plan`, for programs: ``plan.flops``,
        ``plan.peak_bytes``, ``plan.prices``, ``plan.direction``,
        ``plan.steps`` (each with its ``terms``: equation, shapes, opt_einsum
        ``info``), ``plan.cached``.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> plan = xa.explain(torch.tanh(x).sum(), order=2)
    """
    out = file if file is not None else sys.stdout
    w = out.write
    if query is not None:
        from .queries import explain_query
        graph, plan, lines = explain_query(source, query, configurations, direction, batch_dim)
    else:
        graph, plan = plan_for(source, order, target, configurations, direction, batch_dim)
        lines = []
    w(f"xa plan: order {plan.order}, source #0 of shape {list(graph.source_shape)}, {graph.dtype}, {graph.device}\n")
    for line in lines:
        w(line + "\n")
    wanted = set(plan.results)
    batch = plan.batch
    folded = {graph.values[c].inputs[slot]: c for c, slots in plan.folds.items() for slot in slots}
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
        if v.index in folded:
            sample += f"  (folded: #{folded[v.index]} reads its input in place, no copy)"
        w(f"  #{v.index:<3} {kind} {name:<28} {str(list(v.shape)):<14} {('<- ' + ins) if ins else ''}{mark}"
          f"{sample}\n")
    prices = ", ".join(f"{d} {f:.4g}" for d, f in sorted(plan.prices.items()))
    w(f"direction: {plan.direction} (FLOPs of each: {prices})\n")
    if plan.query is not None and plan.direction == "forward":
        w("blocks: jet(L, #v, k) = d^k #v / dL^k along the query's directions, one row per multi-index it "
          "keeps at order k (above; the top order collapsed to its weighted sums), shaped (rows, [b], *#v.shape)\n")
    elif batch is not None and plan.direction == "forward":
        w("blocks: jet(L, #v, k) = d^k #v_b / dL_b^k per sample b, one row per sorted multi-index of L's "
          "entries, shaped (C(n+k-1, k), b, *#v.shape'), n = L.numel()', ' = one sample (a shared value or "
          "leaf: all of it, and no b for a shared value)\n")
    elif batch is not None:
        w("blocks: block (2, 5) = d^2 S_b / d#2_b d#5_b per sample b, shaped (b, *S.shape', *#2.shape', "
          "*#5.shape'), ' = one sample (a shared value: all of it); block (0,) is the source itself\n")
    elif plan.direction == "forward":
        w("blocks: jet(L, #v, k) = d^k #v / dL^k, one row per sorted multi-index i1 <= .. <= ik of L's entries, "
          "shaped (C(n+k-1, k), *#v.shape), n = L.numel()\n")
    else:
        w("blocks: block (2, 5) = d^2 S / d#2 d#5, shaped (*S.shape, *#2.shape, *#5.shape); "
          "block (0,) is the source itself\n")
    w("steps, in execution order; each term adds  coef * einsum(incoming block, local factors)  into its block:\n")
    for step in plan.steps:
        if step.snapshot and not step.terms:
            w(f"step #{step.value} {step.name}: partials kept (retained)\n")
            continue
        w(f"step #{step.value} {step.name}: {len(step.terms)} terms\n")
        for t in step.terms:
            target = _block(t.target)
            if t.info is None:
                w(f"  (wiring only, no operands) -> {target}\n")
                continue
            gathers = t.gathers or (None,) * len(t.sources)
            roles = [f"incoming {_block(key)} {list(shape)}{' read at sub-multi-indices' if g else ''}"
                     for (key, shape), g in zip(t.sources, gathers)]
            roles += [_operand(ref, shape) for ref, shape in zip(t.operands, t.shapes[len(t.sources):])]
            w(f"  {t.equation:<30} -> {target}\n"
              f"      operands: {'; '.join(roles) if roles else 'none'}\n"
              f"      path {t.info.path}, FLOPs {int(t.info.naive_cost):.3g} naive / {t.flops:.3g} optimised, "
              f"largest intermediate {int(t.info.largest_intermediate)} elements\n")
    result = plan.result_elements * plan.itemsize
    if batch is not None:
        w(f"per sample: {plan.flops / batch.size:.4g} FLOPs, results {size(result / batch.size)}\n")
    w(f"total: {plan.flops:.4g} FLOPs; estimated peak {size(plan.peak_bytes)} (blocks, factors and the "
      f"rules' workspace), {size(plan.tape_bytes)} with what autograd keeps for the results' gradient "
      f"(grad mode; create_graph=False or torch.no_grad() keeps nothing); results {size(result)}; "
      f"plan {'from the cache' if plan.cached else 'new'}\n")
    return plan


def _operand(ref, shape) -> str:
    if ref[0] == "onehot":
        return f"the leaf's identity jet at position {ref[3]} of each row {list(shape)}"
    if ref[0] == "seed":
        return f"the query's directions at position {ref[3]} of each row {list(shape)}"
    if ref[0] == "weights":
        return f"the query's weights, summing the top order's rows {list(shape)}"
    slots, _ = ref
    return f"local factor of d^{len(slots)} y / d(input slots {list(slots)}) {list(shape)}"


def _block(key) -> str:
    if key and key[0] == "jet":
        _, leaf, value, k = key
        return f"jet(#{leaf}, #{value}, {k})"
    return f"block {key}"

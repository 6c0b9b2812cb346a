"""``xa.explain``: print the contraction plan before anything runs."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import torch

from .api import plan_for
from .attach import size
from .plan import Plan


def explain(source: torch.Tensor, order: int = 1, target: Optional[torch.Tensor] = None,
            configurations=None, direction: str = "auto", file: Optional[TextIO] = None) -> Plan:
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

    Returns:
        The :class:`~xa.plan.Plan`, for programs: ``plan.flops``,
        ``plan.peak_bytes``, ``plan.prices``, ``plan.direction``,
        ``plan.steps`` (each with its ``terms``: equation, shapes, opt_einsum
        ``info``), ``plan.cached``.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> plan = xa.explain(torch.tanh(x).sum(), order=2)
    """
    graph, plan = plan_for(source, order, target, configurations, direction)
    out = file if file is not None else sys.stdout
    w = out.write
    w(f"xa plan: order {plan.order}, source #0 of shape {list(graph.source_shape)}, {graph.dtype}, {graph.device}\n")
    w("graph (values in capture order, #0 the source; * = partials requested):\n")
    wanted = set(plan.results)
    for v in graph.values:
        kind = "leaf" if v.leaf is not None else "node"
        name = "AccumulateGrad" if v.leaf is not None else v.name
        mark = " *" if v.index in wanted else ""
        ins = ", ".join("const" if i is None else f"#{i}" for i in v.inputs)
        w(f"  #{v.index:<3} {kind} {name:<28} {str(list(v.shape)):<14} {('<- ' + ins) if ins else ''}{mark}\n")
    prices = ", ".join(f"{d} {f:.4g}" for d, f in sorted(plan.prices.items()))
    w(f"direction: {plan.direction} (FLOPs of each: {prices})\n")
    if plan.direction == "forward":
        w("blocks: jet(L, #v, k) = d^k #v / dL^k, shaped (*#v.shape, L.numel() x k)\n")
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
            roles = [f"incoming {_block(key)} {list(shape)}" for key, shape in t.sources]
            roles += [f"local factor of d^{len(slots)} y / d(input slots {list(slots)}) {list(shape)}"
                      for (slots, _), shape in zip(t.operands, t.shapes[len(t.sources):])]
            w(f"  {t.equation:<30} -> {target}\n"
              f"      operands: {'; '.join(roles) if roles else 'none'}\n"
              f"      path {t.info.path}, FLOPs {int(t.info.naive_cost):.3g} naive / {t.flops:.3g} optimised, "
              f"largest intermediate {int(t.info.largest_intermediate)} elements\n")
    result = plan.result_elements * plan.itemsize
    w(f"total: {plan.flops:.4g} FLOPs; estimated peak {size(plan.peak_bytes)} (blocks, factors and the "
      f"rules' workspace); results {size(result)}; plan {'from the cache' if plan.cached else 'new'}\n")
    return plan


def _block(key) -> str:
    if key and key[0] == "jet":
        _, leaf, value, k = key
        return f"jet(#{leaf}, #{value}, {k})"
    return f"block {key}"

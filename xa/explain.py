"""``xa.explain``: print the contraction plan before anything runs."""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

import torch

from .api import plan_for
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
    itemsize = torch.empty((), dtype=graph.dtype).element_size()
    w = out.write
    w(f"xa plan: order {plan.order}, source shape {list(graph.source_shape)}, {graph.dtype}, {graph.device}\n")
    w("graph (values in capture order, #0 the source):\n")
    wanted = set(plan.results)
    for v in graph.values:
        kind = "leaf" if v.leaf is not None else "node"
        name = "AccumulateGrad" if v.leaf is not None else v.name
        mark = " *" if v.index in wanted else ""
        ins = ", ".join("const" if i is None else f"#{i}" for i in v.inputs)
        w(f"  #{v.index:<3} {kind} {name:<28} {str(list(v.shape)):<14} {('<- ' + ins) if ins else ''}{mark}\n")
    w("  (* = partials requested)\n")
    prices = ", ".join(f"{d} {f:.4g} flops" for d, f in sorted(plan.prices.items()))
    w(f"direction: {plan.direction} (priced: {prices})\n")
    for step in plan.steps:
        w(f"step #{step.value} {step.name}: {len(step.terms)} terms\n")
        for t in step.terms:
            if t.info is None:
                w(f"  (identity wiring, no operands) -> block {t.target}\n")
                continue
            w(f"  {t.equation:<34} shapes {[list(x) for x in t.shapes]} -> block {t.target}\n"
              f"      path {t.info.path}  flops {int(t.info.naive_cost):.3g} naive / {t.flops:.3g} optimised, "
              f"largest intermediate {int(t.info.largest_intermediate)}\n")
    result = sum(math.prod(plan.block_shapes[k]) for keys in plan.results.values() for k in keys)
    w(f"total: {plan.flops:.4g} flops, estimated peak {plan.peak_bytes / 2**20:.3g} MiB, "
      f"result {result * itemsize / 2**20:.3g} MiB, plan {'from the cache' if plan.cached else 'new'}\n")
    return plan

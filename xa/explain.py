"""``xa.explain``: print the contraction plan before anything runs."""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

import torch

from .api import plan_for
from .plan import Plan


def explain(source: torch.Tensor, order: int = 1, target: Optional[torch.Tensor] = None,
            configurations=None, file: Optional[TextIO] = None) -> Plan:
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
        file: where to print (default ``sys.stdout``).

    Returns:
        The :class:`~xa.plan.Plan`, for programs (``plan.flops``, ``plan.steps``).

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> plan = xa.explain(torch.tanh(x).sum(), order=2)
    """
    graph, plan = plan_for(source, order, target, configurations)
    out = file if file is not None else sys.stdout
    itemsize = torch.empty((), dtype=graph.dtype).element_size()
    w = out.write
    w(f"xa plan: order {plan.order}, source shape {list(graph.source_shape)}, "
      f"{graph.dtype}, {graph.device}{' (cached)' if plan.cached else ''}\n")
    w("graph:\n")
    for v in graph.values:
        kind = "leaf" if v.leaf is not None else "node"
        ins = ", ".join("const" if i is None else f"#{i}" for i in v.inputs)
        w(f"  #{v.index:<3} {kind} {v.name:<28} {str(list(v.shape)):<16} {('<- ' + ins) if ins else ''}\n")
    total = 0
    peak = 0
    live: dict = {}
    for step in plan.steps:
        w(f"step #{step.value} {step.name}: {len(step.terms)} terms\n")
        for t in step.terms:
            for key in (t.target,):
                live.setdefault(key, math.prod(plan.block_shapes[key]))
            total += t.flops
            big = int(t.info.largest_intermediate) if t.info is not None else 0
            naive = int(t.info.naive_cost) if t.info is not None else 0
            w(f"  {t.equation or '(wiring)':<40} {list(map(list, t.shapes))} -> block {t.target}  "
              f"flops {naive:.3g} naive / {t.flops:.3g} optimised, largest intermediate {big}\n")
        peak = max(peak, sum(live.values()))
        for key in step.retire:
            live.pop(key, None)
    result = sum(math.prod(plan.block_shapes[k]) for keys in plan.results.values() for k in keys)
    w(f"total: {total:.4g} flops, peak blocks {peak * itemsize / 1e6:.3g} MB, "
      f"result {result * itemsize / 1e6:.3g} MB, plan {'from the cache' if plan.cached else 'new'}\n")
    return plan

"""Attach: run a plan within the memory budget, and put the results where users read them.

Results go onto leaves as ``.xgrad`` (a tuple, the k-th entry shaped
``(source.numel(), *(k * (leaf.numel(),)))``, in the leaf's dtype and on its
device) and, for retained intermediate tensors, into the partials a
:class:`~xa.api.Superset` hands out.

When the cheapest plan's estimated peak is over the budget, the other
direction is tried, then backprop over chunks of source rows: the source
index rides through every contraction untouched, so a plan for ``r`` rows
seeded with those rows of the identity gives those rows of every result.
"""

from __future__ import annotations

import torch

from . import execute
from . import plan as planner
from .capture import Graph
from .errors import MemoryBudgetError


def available_memory(device: torch.device) -> float | None:
    """The default budget: 80% of a GPU's free memory, half of what the system has available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def size(nbytes: float) -> str:
    """Bytes in the unit that shows the number: ``512 B``, ``3.1 KiB``, ``208 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def compute(graph: Graph, order: int, rules: dict, requested: tuple, retained: tuple, direction: str,
            budget: float | None) -> tuple:
    """Plan and run within ``budget`` bytes: ``(plan, results, kept)``.

    ``results[i]`` are the blocks of requested value ``i`` for k = 1..order and
    ``kept[i]`` those of retained value ``i`` (``None`` for a block that is zero).
    """
    plan = planner.build(graph, order, rules, requested, retained, direction)
    if budget is None or plan.peak_bytes <= budget:
        return (plan, *_run(plan, graph, rules, retained))
    if direction == "auto":
        for other in ("forward", "backward"):
            if other != plan.direction and other in plan.prices:
                alternative = planner.build(graph, order, rules, requested, retained, other)
                if alternative.peak_bytes <= budget:
                    return (alternative, *_run(alternative, graph, rules, retained))
    if plan.direction == "forward" and direction == "forward":
        raise MemoryBudgetError(
            f"the forward plan needs about {size(plan.peak_bytes)}, over max_memory={size(budget)}; only "
            "direction='backward' (or 'auto') can split the work into chunks of source rows"
        )
    return _run_in_chunks(graph, order, rules, requested, retained, budget, plan)


def _run(plan, graph, rules, retained) -> tuple:
    blocks, kept = execute.run(plan, graph, rules)
    results = {i: [blocks.get(key) for key in keys] for i, keys in plan.results.items()}
    return results, {i: kept.get(i) or results.get(i) for i in retained}


def _run_in_chunks(graph, order, rules, requested, retained, budget, whole):
    """Backprop over chunks of source rows sized to the budget."""
    s = graph.values[0].numel
    itemsize = whole.itemsize
    wanted = list(requested) + [i for i in retained if i not in requested]
    result_bytes = sum(s * graph.values[i].numel ** k for i in wanted for k in range(1, order + 1)) * itemsize

    def need(rows):
        plan = planner.build(graph, order, rules, requested, retained, "backward", rows=rows)
        return plan, result_bytes + plan.peak_bytes

    plan, one_row = need(1)
    if one_row > budget:
        also = ""
        if "forward" in whole.prices:
            forward = planner.build(graph, order, rules, requested, retained, "forward")
            also = f"; the forward plan would need {size(forward.peak_bytes)}"
        raise MemoryBudgetError(
            f"xa.backward at order {order} needs about {size(one_row)} even one source row at a time "
            f"({size(result_bytes)} of results, {size(one_row - result_bytes)} for one row's blocks and factors)"
            f"{also}, over max_memory={size(budget)}. Ways out: a larger max_memory, target= one leaf, "
            "a lower order, or fewer source entries"
        )
    rows = max(1, min(s, int((budget - result_bytes) // max(one_row - result_bytes, 1))))
    plan, total = need(rows)
    while total > budget and rows > 1:
        rows = max(1, rows // 2)
        plan, total = need(rows)
    dtype, device = graph.dtype, graph.device
    results = {i: [torch.zeros((s,) + (graph.values[i].numel,) * k, dtype=dtype, device=device)
                   for k in range(1, order + 1)] for i in wanted}
    init = torch.zeros((rows, s), dtype=dtype, device=device)  # this chunk's rows of the identity
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        init.zero_()
        init[:, r0:r1].diagonal().fill_(1.0)
        blocks, kept = execute.run(plan, graph, rules, {(0,): init.reshape((rows,) + graph.source_shape)})
        for i in wanted:
            got = kept.get(i) or [blocks.get(key) for key in plan.results[i]]
            for k, t in enumerate(got):
                if t is not None:
                    results[i][k][r0:r1] = t.reshape((rows,) + results[i][k].shape[1:])[: r1 - r0]
        del blocks, kept
    return plan, results, {i: results[i] for i in retained}


def flat(graph: Graph, i: int, order: int, tensors) -> tuple:
    """Value ``i``'s blocks in xa's layout ``(s, n, .., n)``; zeros where a block is zero by structure."""
    v = graph.values[i]
    s = graph.values[0].numel
    out = []
    for k, t in enumerate(tensors or [None] * order, start=1):
        shape = (s,) + (v.numel,) * k
        t = torch.zeros(shape, dtype=graph.dtype, device=graph.device) if t is None else t.reshape(shape)
        if v.leaf is not None:
            t = t.to(dtype=v.leaf.dtype, device=v.leaf.device)
        out.append(t)
    return tuple(out)


def attach(graph: Graph, order: int, requested: tuple, retained: tuple, results: dict, kept: dict) -> tuple:
    """Set ``.xgrad`` on the requested leaves: ``(leaves, partials)``, partials keyed by (node, output)."""
    partials = {(graph.values[i].fn, graph.values[i].output): flat(graph, i, order, kept[i]) for i in retained}
    leaves = []
    for i in requested:
        v = graph.values[i]
        if v.leaf is not None:
            v.leaf.xgrad = flat(graph, i, order, results[i])
            leaves.append(v.leaf)
    return leaves, partials

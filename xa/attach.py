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

import time

import torch

from . import execute, jets
from . import plan as planner
from .capture import Graph
from .errors import MemoryBudgetError

_MEMINFO = {"at": -1.0, "bytes": None}  # /proc/meminfo, read at most every MEMINFO_S seconds
MEMINFO_S = 0.5


def available_memory(device: torch.device) -> float | None:
    """The default budget: 80% of a GPU's free memory, half of what the system has available.

    The system's figure is read again after ``MEMINFO_S`` seconds, not on every call of a loop.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    now = time.monotonic()
    if now - _MEMINFO["at"] > MEMINFO_S:
        _MEMINFO.update(at=now, bytes=_meminfo_available())
    found = _MEMINFO["bytes"]
    return None if found is None else 0.5 * found


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
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
            budget: float | None, batch_dim: int | None = None, query=None, seeds: dict | None = None,
            mixed: tuple = ()) -> tuple:
    """Plan and run within ``budget`` bytes: ``(plan, results, kept)``.

    ``results[i]`` are the blocks of requested value ``i`` for k = 1..order and
    ``kept[i]`` those of retained value ``i`` (``None`` for a block that is zero).
    With ``batch_dim``, per-sample blocks; over budget, chunks of samples. A ``query``
    (:class:`xa.queries.Ask`) plans forward jets of its rows; ``seeds`` are its values.
    ``mixed``: joint blocks of requested leaves, ``results[("mixed", M)]`` (backward).
    """
    plan = planner.build(graph, order, rules, requested, retained, direction, batch_dim=batch_dim, query=query,
                         mixed=mixed)
    if budget is None or plan.peak_bytes <= budget:
        tile = _tile(plan, graph)
        if tile:
            return _run_samples(graph, order, rules, requested, retained, plan, tile, True, seeds)
        return (plan, *_run(plan, graph, rules, retained, seeds))
    if direction == "auto":
        for other in ("forward", "backward"):
            if other != plan.direction and other in plan.prices:
                alternative = planner.build(graph, order, rules, requested, retained, other, batch_dim=batch_dim)
                if alternative.peak_bytes <= budget:
                    return (alternative, *_run(alternative, graph, rules, retained))
    if batch_dim is not None:
        return _run_in_samples(graph, order, rules, requested, retained, direction, budget, plan, seeds)
    if query is not None or mixed:
        raise MemoryBudgetError(f"the query needs about {size(plan.peak_bytes)}, over max_memory={size(budget)}; "
                                "with batch_dim= it runs in chunks of samples")
    if plan.direction == "forward" and direction == "forward":
        raise MemoryBudgetError(
            f"the forward plan needs about {size(plan.peak_bytes)}, over max_memory={size(budget)}; only "
            "direction='backward' (or 'auto') can split the work into chunks of source rows"
        )
    return _run_in_chunks(graph, order, rules, requested, retained, budget, plan)


def _found(plan, blocks, keys) -> list:
    """The result blocks of ``keys``, forward jets expanded from their sorted rows (``None`` where zero)."""
    out = []
    for key in keys:
        t = blocks.get(key)  # (not popped: a mixed request of one leaf reads a pure block too)
        if t is not None and key in plan.expand:
            t = jets.expand(t, plan.expand[key])
        out.append(t)
    return out


def _run(plan, graph, rules, retained, seeds=None) -> tuple:
    blocks, kept = execute.run(plan, graph, rules, seeds=seeds)
    results = {i: _found(plan, blocks, keys) for i, keys in plan.results.items()}
    return results, {i: kept.get(i) or results.get(i) for i in retained}


CHUNK_SLACK = 0.9


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
    # Chunks are sized to a tenth under the budget: running chunk after chunk leaves the allocator
    # holding a few small pieces the model does not count (measured: 5 MB over 42 MB of chunk).
    usable = max(CHUNK_SLACK * budget, one_row)
    rows = max(1, min(s, int((usable - result_bytes) // max(one_row - result_bytes, 1))))
    plan, total = need(rows)
    while total > usable and rows > 1:
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


# On a CPU a per-sample plan runs in tiles of samples whose blocks fit in the cache: the
# contractions of a forward jet are a few passes over each block, and a pass over memory
# that stays in the cache is several times faster (about 3x for the PINN of the benchmarks;
# 8 MiB tiles, a few times this machine's 2 MiB of L2 per core, measured best among 4, 8 and 16).
TILE_BYTES = 8 * 2**20
MIN_TILE = 32
# Each tile walks every term in Python again (tens of microseconds each): a tile keeps at least
# this many FLOPs per term, so that a plan of many small terms (order 4 at width 32) is not tiled.
TILE_TERM_FLOPS = 1e6
TILE_FACTOR_BYTES = 64 * 2**20  # a plan whose factors (made once, kept across tiles) are larger is not tiled


def _tile(plan, graph) -> int:
    """The samples of one cache tile, or 0 to run the plan whole (a GPU, a small plan, few samples)."""
    batch = plan.batch
    if batch is None or graph.device.type != "cpu" or plan.peak_bytes <= TILE_BYTES:
        return 0
    factors = sum(step.factor_elements for step in plan.steps) * plan.itemsize
    if factors > TILE_FACTOR_BYTES:  # the factors are kept for every tile: not when they are large
        return 0
    if plan.result_elements * plan.itemsize * 2 > plan.peak_bytes:  # mostly results: a tile saves no pass
        return 0
    terms = sum(len(step.terms) for step in plan.steps)
    tiles = min(plan.peak_bytes / TILE_BYTES, plan.flops / max(terms, 1) / TILE_TERM_FLOPS)
    if tiles < 2:
        return 0
    samples = max(MIN_TILE, int(batch.total / tiles))
    return samples if samples < batch.total // 2 else 0


def _run_in_samples(graph, order, rules, requested, retained, direction, budget, whole, seeds=None):
    """Per-sample plans over chunks of samples sized to the budget: each chunk is a smaller batch."""
    total = whole.batch.total
    directions = [d for d in ("backward", "forward") if d in whole.prices] if direction == "auto" else [direction]
    wanted = list(requested) + [i for i in retained if i not in requested] + _mixed_keys(whole)

    def need(samples):
        best = None
        for d in directions:
            plan = _sample_plan(graph, order, rules, requested, retained, d, whole, samples)
            cost = plan.peak_bytes + _result_bytes(plan, wanted, total)
            if best is None or cost < best[1]:
                best = (plan, cost)
        return best

    plan, one = need(1)
    if one > budget:
        raise MemoryBudgetError(
            f"xa.backward at order {order} needs about {size(one)} even one sample at a time "
            f"({size(_result_bytes(plan, wanted, total))} of results for all {total} samples), over "
            f"max_memory={size(budget)}. Ways out: a larger max_memory, target= one leaf, a lower order, "
            "or fewer samples"
        )
    # cost(samples) is about fixed + samples * per: the factors are built for every sample once.
    per = max(need(min(2, total))[1] - one, 1) if total > 1 else 1
    samples = max(1, min(total, int((budget - (one - per)) // per)))
    plan, cost = need(samples)
    while cost > budget and samples > 1:
        samples = max(1, samples // 2)
        plan, cost = need(samples)
    return _run_samples(graph, order, rules, requested, retained, plan, samples, False, seeds)


def _sample_plan(graph, order, rules, requested, retained, direction, whole, samples):
    return planner.build(graph, order, rules, requested, retained, direction, batch_dim=whole.batch.source_dim,
                         samples=samples, query=whole.query, mixed=whole.mixed)


def _result_bytes(plan, wanted, total) -> int:
    return sum(plan.result_numel(key) for key in _keys(plan, wanted)) // plan.batch.size * total * plan.itemsize


def _run_samples(graph, order, rules, requested, retained, plan, samples, keep_factors, seeds=None):
    """Run ``plan``'s request over chunks of ``samples`` samples and put the chunks' results together.

    ``keep_factors``: the rules' factors are made once and every chunk reads its samples
    of them (cache tiles); otherwise each chunk asks the rules again (a memory budget).
    """
    total = plan.batch.total
    wanted = list(requested) + [i for i in retained if i not in requested] + _mixed_keys(plan)
    main = plan = _sample_plan(graph, order, rules, requested, retained, plan.direction, plan, samples)
    factors: dict | None = {} if keep_factors else None
    results: dict = {}
    for first in range(0, total, samples):
        count = min(samples, total - first)
        if count != plan.batch.size:  # the last, smaller chunk
            plan = _sample_plan(graph, order, rules, requested, retained, plan.direction, plan, count)
        blocks, kept = execute.run(plan, graph, rules, first=first, factors=factors, seeds=seeds)
        for i in wanted:
            got = kept.get(i) or _found(plan, blocks, plan.results[i])
            slots = results.setdefault(i, [None] * order)
            # a query's jets keep their rows first, (rows, samples, ..); every other block is (samples, ..)
            axis = 1 if plan.query is not None else 0
            for k, t in enumerate(got):
                if t is None:
                    continue
                if slots[k] is None:
                    shape = t.shape[:axis] + (total,) + t.shape[axis + 1:]
                    slots[k] = torch.empty(shape, dtype=t.dtype, device=t.device)
                slots[k].narrow(axis, first, count).copy_(t)
        del blocks, kept
    return main, results, {i: results[i] for i in retained}


def _mixed_keys(plan) -> list:
    return [("mixed", m) for m in plan.mixed]


def _keys(plan, wanted) -> list:
    return [key for i in wanted if i in plan.results for key in plan.results[i]]


def flat(graph: Graph, i: int, order: int, tensors, batch=None) -> tuple:
    """Value ``i``'s blocks in xa's layout ``(s, n, .., n)``; zeros where a block is zero by structure.

    Per sample (``batch``): ``(B, s', n', .., n')``, ``'`` counting one sample of a batched value.
    """
    v = graph.values[i]
    s = graph.values[0].numel
    lead, n = (s,), v.numel
    if batch is not None:
        lead, n = (batch.total, batch.numel(graph, 0)), batch.numel(graph, i)
    out = []
    for k, t in enumerate(tensors or [None] * order, start=1):
        shape = lead + (n,) * k
        t = torch.zeros(shape, dtype=graph.dtype, device=graph.device) if t is None else t.reshape(shape)
        if v.leaf is not None:
            t = t.to(dtype=v.leaf.dtype, device=v.leaf.device)
        out.append(t)
    return tuple(out)


def attach(graph: Graph, order: int, requested: tuple, retained: tuple, results: dict, kept: dict,
           batch=None) -> tuple:
    """Set ``.xgrad`` on the requested leaves: ``(leaves, partials)``, partials keyed by (node, output)."""
    partials = {(graph.values[i].fn, graph.values[i].output): flat(graph, i, order, kept[i], batch)
                for i in retained}
    leaves = []
    for i in requested:
        v = graph.values[i]
        if v.leaf is not None:
            v.leaf.xgrad = flat(graph, i, order, results[i], batch)
            leaves.append(v.leaf)
    return leaves, partials

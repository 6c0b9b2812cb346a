"""The memory budget: run a plan within it, whole, in chunks, or in cache tiles.

When the chosen plan's estimated need (:meth:`xa.plan.Plan.need_bytes`: its
peak without autograd, its tape with) is over the budget, the other direction
is tried, then backprop over chunks of source rows -- the source index rides
through every contraction untouched, so a plan for ``r`` rows seeded with
those rows of the identity gives those rows of every result -- or, per
sample, the same plan over chunks of samples. Under autograd each chunk runs
as a non-reentrant checkpoint, so one chunk's tape is alive at a time. On a
CPU a per-sample plan that fits may still run in tiles of samples that fit
the cache.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.checkpoint import checkpoint

from . import execute, jets
from . import plan as planner
from .errors import MemoryBudgetError
from .plan import size
from .request import Request

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


def of(request: Request) -> float | None:
    """The request's budget in bytes: the user's ``max_memory``, or a share of what the device has free."""
    if request.max_memory is not None:
        return request.max_memory
    return available_memory(request.graph.device)


def compute(request: Request, plan: planner.Plan, seeds: dict | None = None) -> tuple:
    """Run ``plan`` (the plan of ``request``) within the request's budget: ``(plan, results, kept)``.

    ``results[i]`` are the blocks of requested value ``i`` for k = 1..order and
    ``kept[i]`` those of retained value ``i`` (``None`` for a block that is zero);
    per sample, per-sample blocks, over budget in chunks of samples; a mixed
    request's joint blocks are ``results[("mixed", key)]``. The plan returned is
    the one that ran (the other direction, or a chunk's). ``seeds`` are a query's values.
    """
    budget = of(request)
    request = _as_planned(request, plan)
    if budget is None or plan.need_bytes() <= budget:
        tile = _tile(plan, request.graph)
        if tile:
            return _run_samples(request, plan, tile, True, seeds, budget)
        return (plan, *_run(request, plan, seeds, budget))
    if request.direction == "auto":
        for other in ("forward", "backward"):
            if other != plan.direction and other in plan.prices:
                alternative = planner.build(request.replace(direction=other))
                if alternative.need_bytes() <= budget:
                    return (alternative, *_run(request, alternative, budget=budget))
    if request.batch_dim is not None:
        return _run_in_samples(request, budget, plan, seeds)
    if request.query is not None or request.mixed:
        raise MemoryBudgetError(f"{request.caller} needs about {size(plan.need_bytes())}{_taped()}, over "
                                f"max_memory={size(budget)}; with batch_dim= it runs in chunks of samples")
    if plan.direction == "forward" and request.direction == "forward":
        raise MemoryBudgetError(
            f"{request.caller}: the forward plan needs about {size(plan.need_bytes())}{_taped()}, over "
            f"max_memory={size(budget)}; only direction='backward' (or 'auto') can split the work into chunks of "
            "source rows"
        )
    return _run_in_chunks(request, budget, plan)


def _as_planned(request: Request, plan: planner.Plan) -> Request:
    """A query's request fixed to the direction its plan took: the chunks plan that again, and only that."""
    if request.query is None:
        return request
    if plan.direction == "backward":
        return request.replace(direction="backward", query=None)
    return request.replace(direction="forward")


def _taped() -> str:
    return ", with what autograd keeps for the gradient" if torch.is_grad_enabled() else ""


def _no_tape() -> str:
    return ("; if no gradient of the results is needed, create_graph=False (or torch.no_grad()) needs far less"
            if torch.is_grad_enabled() else "")


def _checkpointed(run):
    """``run()`` for one chunk; under autograd as a checkpoint, so that chunks stay within the budget.

    The chunk's work is recorded without keeping what its gradient reads, and done again when the
    backward reaches it: one chunk's tape is alive at a time, as one chunk's blocks are without autograd.
    The saved tensors it reads are held by the captured graph, so the user's backward may free its own.
    """
    if not torch.is_grad_enabled():
        return run()
    return checkpoint(run, use_reentrant=False)


def _found(plan, blocks, keys) -> list:
    """The result blocks of ``keys``, forward jets expanded from their sorted rows (``None`` where zero)."""
    out = []
    for key in keys:
        t = blocks.get(key)  # (not popped: a mixed request of one leaf reads a pure block too)
        if t is not None and key in plan.expand:
            t = jets.expand(t, plan.expand[key])
        out.append(t)
    return out


def _run(request: Request, plan, seeds=None, budget=None) -> tuple:
    blocks, kept = execute.run(plan, request.graph, request.rules, seeds=seeds, budget=budget)
    results = {i: _found(plan, blocks, keys) for i, keys in plan.results.items()}
    return results, {i: kept.get(i) or results.get(i) for i in request.retained}


CHUNK_SLACK = 0.9


def _run_in_chunks(request: Request, budget: float, whole):
    """Backprop over chunks of source rows sized to the budget."""
    graph, rules, order, retained = request.graph, request.rules, request.order, request.retained
    s = graph.values[0].numel
    itemsize = whole.itemsize
    wanted = request.wanted
    # a diagonal's blocks hold the leaf's entries once (xa.diag)
    shapes = {i: [(graph.values[i].numel,) * (1 if i in request.diagonal else k) for k in range(1, order + 1)]
              for i in wanted}
    result_bytes = sum(s * math.prod(shape) for i in wanted for shape in shapes[i]) * itemsize

    def need(rows):
        plan = planner.build(request.replace(direction="backward", rows=rows))
        return plan, result_bytes + plan.need_bytes()

    plan, one_row = need(1)
    if one_row > budget:
        also = ""
        if "forward" in whole.prices and not request.diagonal:
            forward = planner.build(request.replace(direction="forward"))
            also = f"; the forward plan would need {size(forward.need_bytes())}"
        raise MemoryBudgetError(
            f"{request.caller} at order {order} needs about {size(one_row)} even one source row at a time "
            f"({size(result_bytes)} of results, {size(one_row - result_bytes)} for one row's blocks and factors"
            f"{_taped()}){also}, over max_memory={size(budget)}. Ways out: a larger max_memory, target= one leaf, "
            f"a lower order, or fewer source entries{_no_tape()}"
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
    chunks: dict = {i: [_Chunks(0, s) for _ in range(order)] for i in wanted}
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        init = torch.zeros((rows, s), dtype=dtype, device=device)  # this chunk's rows of the identity
        init[:, r0:r1].diagonal().fill_(1.0)
        seed = init.reshape((rows,) + graph.source_shape)
        # the run pops the blocks it is given: each run (a checkpoint's again in the backward) gets its own dict
        blocks, kept = _checkpointed(lambda seed=seed: execute.run(plan, graph, rules, {(0,): seed}, budget=budget))
        for i in wanted:
            got = kept.get(i) or [blocks.get(key) for key in plan.results[i]]
            for k, t in enumerate(got):
                if t is None:
                    t = torch.zeros((r1 - r0,) + shapes[i][k], dtype=dtype, device=device)
                chunks[i][k].add(t.reshape((rows,) + shapes[i][k])[: r1 - r0])
        del blocks, kept
    results = {i: [c.result() for c in chunks[i]] for i in wanted}
    return plan, results, {i: results[i] for i in retained}


class _Chunks:
    """One result put together from its chunks along ``axis`` (``total`` entries there).

    Without autograd each chunk is copied into one tensor made at the first (no second copy of
    the result); under autograd the chunks are kept and concatenated at the end, which it records.
    """

    def __init__(self, axis: int, total: int):
        self.axis, self.total, self.parts, self.whole, self.at = axis, total, [], None, 0

    def add(self, t: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self.parts.append(t)
            return
        if self.whole is None:
            shape = t.shape[:self.axis] + (self.total,) + t.shape[self.axis + 1:]
            self.whole = torch.empty(shape, dtype=t.dtype, device=t.device)
        self.whole.narrow(self.axis, self.at, t.shape[self.axis]).copy_(t)
        self.at += t.shape[self.axis]

    def result(self):
        if self.whole is not None:
            return self.whole
        if not self.parts:
            return None
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, self.axis)


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
    if torch.is_grad_enabled():
        # recorded, each tile's reads of the shared factors come back in the backward as a zero-filled
        # copy of the whole factor, and the backward revisits every block anyway: no tiles
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


def _run_in_samples(request: Request, budget: float, whole, seeds=None):
    """Per-sample plans over chunks of samples sized to the budget: each chunk is a smaller batch.

    Each chunk's factors are built from its slices of what torch saved (``sliced``, :func:`xa.batch.cut`),
    so a chunk's plan counts its own factors; those of a node that cannot be cut are all samples' (narrowed).
    """
    graph, total, order = request.graph, whole.batch.total, request.order
    directions = ([d for d in ("backward", "forward") if d in whole.prices] if request.direction == "auto"
                  else [request.direction])
    wanted = request.wanted + _mixed_keys(whole)
    # under autograd each chunk's results are kept and put together at the end (torch.cat): twice the results;
    # and the backward holds the gradients of the saved tensors the chunks read, of all samples
    record = torch.is_grad_enabled()
    copies = 2 if record else 1

    def fixed(plan):
        results = copies * _result_bytes(plan, wanted, total)
        return results, execute.gradient_bytes(plan, graph) if record else 0

    def need(samples):
        best = None
        for d in directions:
            plan = _sample_plan(request, d, samples, sliced=True)
            cost = plan.need_bytes() + sum(fixed(plan))
            if best is None or cost < best[1]:
                best = (plan, cost)
        return best

    plan, one = need(1)
    if one > budget:
        results, grads = fixed(plan)
        backward = f", {size(grads)} for the gradients of what torch saved in the backward" if record else ""
        raise MemoryBudgetError(
            f"{request.caller} at order {order} needs about {size(one)} even one sample at a time "
            f"({size(results)} of results for all {total} samples{backward}, {size(one - results - grads)} for one "
            f"sample's blocks and factors{_taped()}), over max_memory={size(budget)}. Ways out: a larger "
            f"max_memory, target= one leaf, a lower order, or fewer samples{_no_tape()}"
        )
    # cost(samples) is about fixed + samples * per: the factors are built for every sample once.
    per = max(need(min(2, total))[1] - one, 1) if total > 1 else 1
    samples = max(1, min(total, int((budget - (one - per)) // per)))
    plan, cost = need(samples)
    while cost > budget and samples > 1:
        samples = max(1, samples // 2)
        plan, cost = need(samples)
    return _run_samples(request, plan, samples, False, seeds, budget)


def _sample_plan(request: Request, direction: str, samples: int, sliced: bool = False):
    chunk = request.replace(direction=direction)
    return planner.build(chunk.sliced_chunk(samples) if sliced else chunk.replace(samples=samples))


def _result_bytes(plan, wanted, total) -> int:
    return sum(plan.result_numel(key) for key in _keys(plan, wanted)) // plan.batch.size * total * plan.itemsize


def _run_samples(request: Request, plan, samples, keep_factors, seeds=None, budget=None):
    """Run ``plan``'s request over chunks of ``samples`` samples and put the chunks' results together.

    ``keep_factors``: the rules' factors are made once and every chunk reads its samples
    of them (cache tiles); otherwise each chunk asks the rules again (a memory budget).
    Every chunk, the last smaller one too, runs in the first chunk's plan's arena (:mod:`xa.arena`).
    """
    graph, rules, order = request.graph, request.rules, request.order
    total = plan.batch.total
    wanted = request.wanted + _mixed_keys(plan)
    sliced = not keep_factors  # budget chunks build their factors from their slices; cache tiles share them
    main = plan = _sample_plan(request, plan.direction, samples, sliced)
    factors: dict | None = {} if keep_factors else None
    results: dict = {}
    # a query's jets keep their rows first, (rows, samples, ..); every other block is (samples, ..)
    axis = 1 if plan.query is not None else 0
    parts: dict = {i: [_Chunks(axis, total) for _ in range(order)] for i in wanted}
    # the chunks' slices of the saved tensors, each split once under autograd
    slices = execute.Slices([min(samples, total - first) for first in range(0, total, samples)]) if sliced else None
    for first in range(0, total, samples):
        count = min(samples, total - first)
        if count != plan.batch.size:  # the last, smaller chunk
            plan = _sample_plan(request, plan.direction, count, sliced)
        if keep_factors:  # cache tiles: the whole plan fits, its tape included
            blocks, kept = execute.run(plan, graph, rules, first=first, factors=factors, seeds=seeds,
                                       arena=main.arena, budget=budget)
        else:  # budget chunks: under autograd each chunk is run again in the backward, one at a time
            blocks, kept = _checkpointed(lambda plan=plan, first=first: execute.run(
                plan, graph, rules, first=first, seeds=seeds, slices=slices, arena=main.arena, budget=budget))
        for i in wanted:
            got = kept.get(i) or _found(plan, blocks, plan.results[i])
            for k, t in enumerate(got):
                if t is not None:
                    parts[i][k].add(t)
        del blocks, kept
    for i in wanted:
        results[i] = [c.result() for c in parts[i]]
    return main, results, {i: results[i] for i in request.retained}


def _mixed_keys(plan) -> list:
    return [("mixed", m) for m in plan.mixed]


def _keys(plan, wanted) -> list:
    return [key for i in wanted if i in plan.results for key in plan.results[i]]



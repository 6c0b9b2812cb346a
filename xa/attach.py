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
import warnings
import weakref

import torch
from torch.utils.checkpoint import checkpoint

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
            mixed: tuple = (), caller: str = "xa.backward") -> tuple:
    """Plan and run within ``budget`` bytes: ``(plan, results, kept)``.

    ``results[i]`` are the blocks of requested value ``i`` for k = 1..order and
    ``kept[i]`` those of retained value ``i`` (``None`` for a block that is zero).
    With ``batch_dim``, per-sample blocks; over budget, chunks of samples. A ``query``
    (:class:`xa.queries.Ask`) plans forward jets of its rows; ``seeds`` are its values.
    ``mixed``: joint blocks of requested leaves, ``results[("mixed", M)]`` (backward).
    ``caller``: the function the user called, for the messages (``"xa.laplacian"``).
    """
    plan = planner.build(graph, order, rules, requested, retained, direction, batch_dim=batch_dim, query=query,
                         mixed=mixed)
    if budget is None or plan.need_bytes() <= budget:
        tile = _tile(plan, graph)
        if tile:
            return _run_samples(graph, order, rules, requested, retained, plan, tile, True, seeds)
        return (plan, *_run(plan, graph, rules, retained, seeds))
    if direction == "auto":
        for other in ("forward", "backward"):
            if other != plan.direction and other in plan.prices:
                alternative = planner.build(graph, order, rules, requested, retained, other, batch_dim=batch_dim)
                if alternative.need_bytes() <= budget:
                    return (alternative, *_run(alternative, graph, rules, retained))
    if batch_dim is not None:
        return _run_in_samples(graph, order, rules, requested, retained, direction, budget, plan, seeds, caller)
    if query is not None or mixed:
        raise MemoryBudgetError(f"{caller} needs about {size(plan.need_bytes())}{_taped()}, over "
                                f"max_memory={size(budget)}; with batch_dim= it runs in chunks of samples")
    if plan.direction == "forward" and direction == "forward":
        raise MemoryBudgetError(
            f"{caller}: the forward plan needs about {size(plan.need_bytes())}{_taped()}, over "
            f"max_memory={size(budget)}; only direction='backward' (or 'auto') can split the work into chunks of "
            "source rows"
        )
    return _run_in_chunks(graph, order, rules, requested, retained, budget, plan, caller)


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


def _run(plan, graph, rules, retained, seeds=None) -> tuple:
    blocks, kept = execute.run(plan, graph, rules, seeds=seeds)
    results = {i: _found(plan, blocks, keys) for i, keys in plan.results.items()}
    return results, {i: kept.get(i) or results.get(i) for i in retained}


CHUNK_SLACK = 0.9


def _run_in_chunks(graph, order, rules, requested, retained, budget, whole, caller="xa.backward"):
    """Backprop over chunks of source rows sized to the budget."""
    s = graph.values[0].numel
    itemsize = whole.itemsize
    wanted = list(requested) + [i for i in retained if i not in requested]
    result_bytes = sum(s * graph.values[i].numel ** k for i in wanted for k in range(1, order + 1)) * itemsize

    def need(rows):
        plan = planner.build(graph, order, rules, requested, retained, "backward", rows=rows)
        return plan, result_bytes + plan.need_bytes()

    plan, one_row = need(1)
    if one_row > budget:
        also = ""
        if "forward" in whole.prices:
            forward = planner.build(graph, order, rules, requested, retained, "forward")
            also = f"; the forward plan would need {size(forward.need_bytes())}"
        raise MemoryBudgetError(
            f"{caller} at order {order} needs about {size(one_row)} even one source row at a time "
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
    shapes = {i: [(graph.values[i].numel,) * k for k in range(1, order + 1)] for i in wanted}
    chunks: dict = {i: [_Chunks(0, s) for _ in range(order)] for i in wanted}
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        init = torch.zeros((rows, s), dtype=dtype, device=device)  # this chunk's rows of the identity
        init[:, r0:r1].diagonal().fill_(1.0)
        seed = init.reshape((rows,) + graph.source_shape)
        # the run pops the blocks it is given: each run (a checkpoint's again in the backward) gets its own dict
        blocks, kept = _checkpointed(lambda seed=seed: execute.run(plan, graph, rules, {(0,): seed}))
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


def _run_in_samples(graph, order, rules, requested, retained, direction, budget, whole, seeds=None,
                    caller="xa.backward"):
    """Per-sample plans over chunks of samples sized to the budget: each chunk is a smaller batch.

    Each chunk's factors are built from its slices of what torch saved (``sliced``, :func:`xa.batch.cut`),
    so a chunk's plan counts its own factors; those of a node that cannot be cut are all samples' (narrowed).
    """
    total = whole.batch.total
    directions = [d for d in ("backward", "forward") if d in whole.prices] if direction == "auto" else [direction]
    wanted = list(requested) + [i for i in retained if i not in requested] + _mixed_keys(whole)
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
            plan = _sample_plan(graph, order, rules, requested, retained, d, whole, samples, sliced=True)
            cost = plan.need_bytes() + sum(fixed(plan))
            if best is None or cost < best[1]:
                best = (plan, cost)
        return best

    plan, one = need(1)
    if one > budget:
        results, grads = fixed(plan)
        backward = f", {size(grads)} for the gradients of what torch saved in the backward" if record else ""
        raise MemoryBudgetError(
            f"{caller} at order {order} needs about {size(one)} even one sample at a time "
            f"({size(results)} of results for all {total} samples{backward}, {size(one - results - grads)} for one "
            f"sample's blocks and factors{_taped()}), over max_memory={size(budget)}. Ways out: a larger "
            f"max_memory, target= one leaf, a lower order, or fewer samples{_no_tape()}"
        )
    # cost(samples) is about fixed + samples * per: the results and the backward's gradients of all samples, the
    # shared factors and those of nodes that cannot be cut are fixed; the rest (blocks, sliced factors) per sample
    per = max(need(min(2, total))[1] - one, 1) if total > 1 else 1
    samples = max(1, min(total, int((budget - (one - per)) // per)))
    plan, cost = need(samples)
    while cost > budget and samples > 1:
        samples = max(1, samples // 2)
        plan, cost = need(samples)
    return _run_samples(graph, order, rules, requested, retained, plan, samples, False, seeds)


def _sample_plan(graph, order, rules, requested, retained, direction, whole, samples, sliced=False):
    return planner.build(graph, order, rules, requested, retained, direction, batch_dim=whole.batch.source_dim,
                         samples=samples, query=whole.query, mixed=whole.mixed, sliced=sliced)


def _result_bytes(plan, wanted, total) -> int:
    return sum(plan.result_numel(key) for key in _keys(plan, wanted)) // plan.batch.size * total * plan.itemsize


def _run_samples(graph, order, rules, requested, retained, plan, samples, keep_factors, seeds=None):
    """Run ``plan``'s request over chunks of ``samples`` samples and put the chunks' results together.

    ``keep_factors``: the rules' factors are made once and every chunk reads its samples
    of them (cache tiles); otherwise each chunk asks the rules again (a memory budget).
    """
    total = plan.batch.total
    wanted = list(requested) + [i for i in retained if i not in requested] + _mixed_keys(plan)
    sliced = not keep_factors  # budget chunks build their factors from their slices; cache tiles share them
    main = plan = _sample_plan(graph, order, rules, requested, retained, plan.direction, plan, samples, sliced)
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
            plan = _sample_plan(graph, order, rules, requested, retained, plan.direction, plan, count, sliced)
        if keep_factors:  # cache tiles: the whole plan fits, its tape included
            blocks, kept = execute.run(plan, graph, rules, first=first, factors=factors, seeds=seeds)
        else:  # budget chunks: under autograd each chunk is run again in the backward, one at a time
            blocks, kept = _checkpointed(lambda plan=plan, first=first: execute.run(plan, graph, rules, first=first,
                                                                                    seeds=seeds, slices=slices))
        for i in wanted:
            got = kept.get(i) or _found(plan, blocks, plan.results[i])
            for k, t in enumerate(got):
                if t is not None:
                    parts[i][k].add(t)
        del blocks, kept
    for i in wanted:
        results[i] = [c.result() for c in parts[i]]
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


# ``leaf.xgrad`` is a property of every torch tensor; xa keeps the values here, by the tensor's id,
# beside a weak reference to it, so that they go when the tensor does.
#
# Results that carry a gradient hang on a graph that holds the leaf itself (the leaf's node, and
# what torch saved of it), and torch keeps a tensor's Python object alive while its graph holds it:
# a leaf and its recorded .xgrad keep each other alive until .xgrad is deleted -- the reference
# cycle torch warns of for ``.grad`` with ``create_graph=True``. :func:`clear` ends every one.
_XGRAD: dict = {}


def _get_xgrad(tensor):
    entry = _XGRAD.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        raise AttributeError("'Tensor' object has no attribute 'xgrad' (xa.backward sets it on the leaves "
                             "that require grad and that the source depends on)")
    return entry[1]


def _set_xgrad(tensor, value) -> None:
    key = id(tensor)
    _XGRAD[key] = (weakref.ref(tensor, lambda _, key=key: _XGRAD.pop(key, None)), value)


def _del_xgrad(tensor) -> None:
    _get_xgrad(tensor)
    del _XGRAD[id(tensor)]


torch.Tensor.xgrad = property(_get_xgrad, _set_xgrad, _del_xgrad,
                              doc="The derivatives xa.backward computed for this leaf: a tuple, one tensor per order.")


def clear() -> int:
    """Take ``.xgrad`` off every tensor xa set it on; returns how many. See :func:`xa.clear_partials`."""
    n = len(_XGRAD)
    _XGRAD.clear()
    return n


_WARNED = {"cycle": False}
CYCLES_BEFORE_WARNING = 8  # recorded .xgrad held on that many tensors that are not parameters: a loop, likely


def _warn_cycles() -> None:
    """Once per process, when recorded ``.xgrad`` pile up on tensors that are not parameters (a loop over
    fresh points that keeps every step's graph alive): say why, and the ways out."""
    if _WARNED["cycle"]:
        return
    held = sum(1 for ref, value in _XGRAD.values()  # (a user may have set .xgrad to anything, None included)
               if not isinstance(ref(), torch.nn.Parameter) and isinstance(value, tuple)
               and any(isinstance(t, torch.Tensor) and t.requires_grad for t in value))
    if held < CYCLES_BEFORE_WARNING:
        return
    _WARNED["cycle"] = True
    warnings.warn(
        f"xa holds a recorded .xgrad (create_graph follows grad mode, so it can be trained on) on {held} tensors "
        "that are not parameters. Each one's graph holds its tensor, so the two keep each other alive until "
        ".xgrad is deleted: in a loop over fresh tensors every step's graph stays in memory. Pass "
        "create_graph=False (or run under torch.no_grad()) when no gradient of .xgrad is needed, or free it "
        "with Superset.remove_partials(), del x.xgrad or xa.clear_partials().",
        stacklevel=5,  # the caller of xa.backward
    )


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
    if torch.is_grad_enabled():
        _warn_cycles()
    return leaves, partials

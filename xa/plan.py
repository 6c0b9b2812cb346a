"""Plan: the program of one request, priced, cached, and its peak memory modelled.

A plan is built from shapes and structure alone -- the graph's signature
(node names, shapes, wiring, saved shapes and saved numbers), the rule
objects that describe its nodes, the order and the request -- and all of
that is its cache key. Values are read only at execution: the factors'
operands and coefficients come from the rules again, and a factor whose
structure differs from the one planned is an error (:mod:`xa.terms`). So a
cached plan makes a call faster, never different.

``direction="auto"`` builds both programs, backprop (:mod:`xa.backprop`)
and forward jets (:mod:`xa.jets`), prices each with opt_einsum's FLOP
counts, and keeps the cheaper.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from . import arena
from .backprop import build_backward
from .batch import Batching, analyze
from .capture import Graph
from .fold import fold
from .jets import build_forward
from .request import Request


@dataclass
class Plan:
    """The program of one request.

    ``steps`` run in order; each step's ``terms`` add into blocks keyed by
    the multiset of values they differentiate by (``(5, 5)``: d^2 S / dv5^2;
    ``("jet", leaf, v, k)``: d^k v / dleaf^k in the forward direction).
    ``results`` maps each requested value to the keys of its blocks, k = 1..order.
    """

    order: int
    steps: list
    block_shapes: dict
    results: dict
    retained: tuple
    direction: str = "backward"
    prices: dict = field(default_factory=dict)  # direction -> total FLOPs
    peak_elements: int = 0  # the most block and scratch entries alive at once
    itemsize: int = 8  # bytes per entry, from the graph's dtype
    cached: bool = False  # this call found the plan in the cache (a copy says so; the cached one never does)
    batch: Batching | None = None  # the sample layout of a per-sample plan (batch_dim=)
    expand: dict = field(default_factory=dict)  # forward: result key -> how to expand its sorted rows (xa.jets)
    folds: dict = field(default_factory=dict)  # consumer -> {slot: permutation read through} (xa.fold)
    query: Any = None  # a query's structure (xa.jets.Ask): the rows it keeps per order
    mixed: tuple = ()  # joint blocks of leaves kept too (xa.mixed)
    tied: dict = field(default_factory=dict)  # forward: leaf -> (its items, the rows kept per item) (xa.sparsity)
    # where a run without autograd keeps its large buffers (xa.arena), and the memory that holds them:
    # shared by the cached plan and its copies, so it lives as long as the plan stays in the cache
    layout: Any = None
    arena: Any = None

    @property
    def flops(self) -> int:
        """Total optimised FLOPs of every term, as opt_einsum counts them."""
        return sum(t.flops for s in self.steps for t in s.terms)

    @property
    def peak_bytes(self) -> int:
        """The estimated peak memory of executing the plan without autograd, in bytes."""
        return self.peak_elements * self.itemsize

    @property
    def tape_bytes(self) -> int:
        """The estimated memory of executing the plan under autograd, in bytes: what the tape keeps.

        Nothing is freed until the results' backward runs: every block, every factor and every
        term's result and intermediate stay (an upper bound: torch saves only what a gradient reads).
        """
        kept = sum(math.prod(shape) for shape in self.block_shapes.values())
        workspace = 0
        for step in self.steps:
            kept += step.factor_elements
            workspace = max(workspace, step.workspace)
            for term in step.terms:
                kept += math.prod(term.result_shape)
                if term.info is not None and len(term.info.path) > 1:
                    kept += int(term.info.largest_intermediate)
        expanded = sum(self.result_numel(k) for k in self.expand)
        return (kept + workspace + expanded) * self.itemsize

    def need_bytes(self) -> int:
        """The memory a run needs now: :attr:`tape_bytes` under grad mode, else :attr:`peak_bytes`."""
        return self.tape_bytes if torch.is_grad_enabled() else self.peak_bytes

    def result_numel(self, key) -> int:
        """Entries of one result as handed out (a forward jet expanded to every ordering of its rows)."""
        n = math.prod(self.block_shapes[key])
        if key in self.expand:
            size, k = self.expand[key]
            n = n // self.block_shapes[key][0] * size ** k
        return n

    @property
    def result_elements(self) -> int:
        """Entries of every result."""
        return sum(self.result_numel(k) for keys in self.results.values() for k in keys)

    def __str__(self) -> str:
        """The plan as :func:`xa.explain` prints it after the graph: blocks, steps and terms, totals."""
        return "".join(_describe(self))


def size(nbytes: float) -> str:
    """Bytes in the unit that shows the number: ``512 B``, ``3.1 KiB``, ``208 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def _describe(plan: Plan):
    """The lines of ``str(plan)``: what a block is, each step's terms (opt_einsum's costs), the totals."""
    batch = plan.batch
    prices = ", ".join(f"{d} {f:.4g}" for d, f in sorted(plan.prices.items()))
    yield f"direction: {plan.direction} (FLOPs of each: {prices})\n"
    if plan.query is not None and plan.direction == "forward":
        yield ("blocks: jet(L, #v, k) = d^k #v / dL^k along the query's directions, one row per multi-index it "
               "keeps at order k (the top order collapsed to its weighted sums), shaped (rows, [b], *#v.shape)\n")
    elif batch is not None and plan.direction == "forward":
        yield ("blocks: jet(L, #v, k) = d^k #v_b / dL_b^k per sample b, one row per sorted multi-index of L's "
               "entries, shaped (C(n+k-1, k), b, *#v.shape'), n = L.numel()', ' = one sample (a shared value or "
               "leaf: all of it, and no b for a shared value)\n")
    elif batch is not None:
        yield ("blocks: block (2, 5) = d^2 S_b / d#2_b d#5_b per sample b, shaped (b, *S.shape', *#2.shape', "
               "*#5.shape'), ' = one sample (a shared value: all of it); block (0,) is the source itself\n")
    elif plan.direction == "forward":
        yield ("blocks: jet(L, #v, k) = d^k #v / dL^k, one row per sorted multi-index i1 <= .. <= ik of L's "
               "entries, shaped (C(n+k-1, k), *#v.shape), n = L.numel()\n")
    else:
        yield ("blocks: block (2, 5) = d^2 S / d#2 d#5, shaped (*S.shape, *#2.shape, *#5.shape); "
               "block (0,) is the source itself\n")
    yield "steps, in execution order; each term adds  coef * einsum(incoming block, local factors)  into its block:\n"
    for step in plan.steps:
        if step.snapshot and not step.terms:
            yield f"step #{step.value} {step.name}: partials kept (retained)\n"
            continue
        yield f"step #{step.value} {step.name}: {len(step.terms)} terms\n"
        for t in step.terms:
            target = _block(t.target)
            if t.info is None:
                yield f"  (wiring only, no operands) -> {target}\n"
                continue
            gathers = t.gathers or (None,) * len(t.sources)
            roles = [f"incoming {_block(key)} {list(shape)}{' read at sub-multi-indices' if g else ''}"
                     for (key, shape), g in zip(t.sources, gathers)]
            roles += [_operand(ref, shape) for ref, shape in zip(t.operands, t.shapes[len(t.sources):])]
            yield (f"  {t.equation:<30} -> {target}\n"
                   f"      operands: {'; '.join(roles) if roles else 'none'}\n"
                   f"      path {t.info.path}, FLOPs {int(t.info.naive_cost):.3g} naive / {t.flops:.3g} optimised, "
                   f"largest intermediate {int(t.info.largest_intermediate)} elements\n")
    result = plan.result_elements * plan.itemsize
    if batch is not None:
        yield f"per sample: {plan.flops / batch.size:.4g} FLOPs, results {size(result / batch.size)}\n"
    yield (f"total: {plan.flops:.4g} FLOPs; estimated peak {size(plan.peak_bytes)} (blocks, factors and the "
           f"rules' workspace), {size(plan.tape_bytes)} with what autograd keeps for the results' gradient "
           f"(grad mode; create_graph=False or torch.no_grad() keeps nothing); results {size(result)}; "
           f"plan {'from the cache' if plan.cached else 'new'}\n")


def _operand(ref, shape) -> str:
    if ref[0] == "onehot":
        return f"the leaf's identity jet at position {ref[3]} of each row {list(shape)}"
    if ref[0] == "seed":
        return f"the query's directions at position {ref[3]} of each row {list(shape)}"
    if ref[0] == "sample_seed":
        return f"each sample's own directions at position {ref[3]} of each row {list(shape)}"
    if ref[0] == "weights":
        return f"the query's weights, summing the top order's rows {list(shape)}"
    if ref[0] == "items":
        return f"the one-hot placing each item's rows among the leaf's rows {list(shape)}"
    if ref[0] in ("item_weights", "item_weights_joint"):
        return f"the query's weights of each item's rows, summing the top order's rows {list(shape)}"
    slots, _ = ref
    return f"local factor of d^{len(slots)} y / d(input slots {list(slots)}) {list(shape)}"


def _block(key) -> str:
    if key and key[0] == "jet":
        _, leaf, value, k = key
        return f"jet(#{leaf}, #{value}, {k})"
    if key and key[0] == "tied":
        _, leaf, value, k = key
        return f"jet per item(#{leaf}, #{value}, {k})"
    return f"block {key}"


_PLANS: "OrderedDict[Request, Plan]" = OrderedDict()
_CACHE_SIZE = 256


def build(request: Request) -> Plan:
    """The plan of ``request``, from the cache when an equal request was planned before.

    ``direction="auto"`` builds both directions and keeps the cheaper. A query's plan
    is forward jets of its rows, or, where cheaper (or asked for), backprop of the
    whole derivative tensor to be contracted at the leaf: ``plan.prices`` holds both
    (the backward one with that contraction). Everything the plan is built from is
    compared in ``request``, which is the cache's key (:attr:`Request.key`, without the
    graph's tensors); values are read at execution.
    """
    key = request.key
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return dataclasses.replace(plan, cached=True)
    plan = _query_plan(request) if request.query is not None else _build(request)
    _PLANS[key] = plan
    if len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _query_plan(request: Request) -> Plan:
    forward = _build(request.replace(direction="forward"))
    prices = {"forward": forward.flops}
    chosen = forward
    if request.direction in ("auto", "backward"):
        backward = _build(request.replace(direction="backward", query=None))
        prices["backward"] = backward.flops + backward.result_elements  # the contraction at the leaf
        if request.direction == "backward" or prices["backward"] < prices["forward"]:
            chosen = backward
    return dataclasses.replace(chosen, prices=prices)


def _build(request: Request) -> Plan:
    graph, rules, direction = request.graph, request.rules, request.direction
    requested, retained, mixed = request.requested, request.retained, request.mixed
    forward_ok = (request.rows is None and not retained and not mixed
                  and all(graph.values[i].leaf is not None for i in requested)
                  and (request.query is not None or not request.diagonal))  # a diagonal's forward is its query
    if direction == "forward" and not forward_ok:
        raise ValueError("direction='forward' computes partials of leaves only; partials of intermediate "
                         "tensors (target= or retain_partials) need direction='backward' or 'auto'")
    batch = None
    candidates = {}
    # Rules run on CPU stand-ins while planning; a tensor a rule makes without naming a device
    # must be on the CPU too, whatever torch.set_default_device says.
    with torch.device("cpu"):
        graph, folds = fold(graph, rules, set(requested) | set(retained))
        if request.batch_dim is not None:
            batch = _analysis(graph, rules, request.batch_dim, (request.signature, request.rule_key), folds)
            if request.samples is not None:
                batch = batch.chunk(request.samples, request.sliced)
        if direction in ("auto", "backward") and request.query is None:
            steps, shapes, results = build_backward(graph, request.order, rules, requested, retained, request.rows,
                                                    batch, mixed, request.diagonal)
            candidates["backward"] = Plan(request.order, steps, shapes, results, tuple(retained),
                                          direction="backward")
        if forward_ok and direction in ("auto", "forward"):
            steps, shapes, results, expansions, tied = build_forward(graph, request.order, rules, requested, batch,
                                                                     request.query, request.sparse)
            candidates["forward"] = Plan(request.order, steps, shapes, results, (), direction="forward",
                                         expand=expansions, tied=tied)
    prices = {d: p.flops for d, p in candidates.items()}
    plan = candidates[min(prices, key=lambda d: (prices[d], d != "backward"))]
    plan.prices = prices
    plan.batch = batch
    plan.folds = folds
    plan.query = request.query
    plan.mixed = mixed
    plan.itemsize = torch.empty((), dtype=graph.dtype, device="meta").element_size()
    _mark_aliases(plan)
    plan.layout = arena.layout(plan, sum(plan.result_numel(k) for k in plan.expand))
    plan.arena = arena.Arena()
    # an arena is held whole while the plan runs (and between its calls): its bytes and what else is alive
    plan.peak_elements = max(peak(plan), plan.layout.peak) if plan.layout.slots else peak(plan)
    return plan


_ANALYSES: "OrderedDict[tuple, Batching]" = OrderedDict()


def _analysis(graph: Graph, rules: dict, batch_dim: int, head: tuple, folds: dict) -> Batching:
    """The sample layout (:func:`xa.batch.analyze`), once per graph structure, rules and folds: every plan
    of a call's chunks reads it, and it asks every rule for all samples' first-order factors."""
    key = (head, tuple(sorted((c, tuple(sorted(spec.items()))) for c, spec in folds.items())), batch_dim)
    batch = _ANALYSES.get(key)
    if batch is None:
        batch = _ANALYSES[key] = analyze(graph, rules, batch_dim)
        if len(_ANALYSES) > _CACHE_SIZE:
            _ANALYSES.popitem(last=False)
    else:
        _ANALYSES.move_to_end(key)
    return batch


def _mark_aliases(plan: Plan) -> None:
    """Mark the terms that may hand their source block on as their target (a view, a reshape): no copy.

    Only a block this step retires, that no later term of the step reads, in a step
    whose blocks are not kept for the user (a retained snapshot must never change).
    """
    for step in plan.steps:
        if step.snapshot:
            continue
        retired = set(step.retire)
        for n, term in enumerate(step.terms):
            if len(term.sources) != 1 or term.operands or (term.gathers and term.gathers[0] is not None):
                continue
            key = term.sources[0][0]
            if key in retired and all(k != key for later in step.terms[n + 1:] for k, _ in later.sources):
                term.alias = True


def peak(plan: Plan) -> int:
    """Entries alive at the worst moment of execution: blocks, the step's factors, one term's scratch.

    Follows the executor: a target block is allocated at its first term and
    lives until its step retires it (results until the end). An einsum term
    holds its result, and with a path of several steps opt_einsum's largest
    intermediate beside it; a first term that covers its block whole
    becomes the block. A broadcast product holds only the
    product of its smaller operands. A step's factors are all alive while
    it runs, with what their rules allocate to build them.
    """
    live = {key: math.prod(shape) for key, shape in plan.block_shapes.items() if key == (0,)}
    current = sum(live.values())
    peak = current
    for step in plan.steps:
        factors = step.factor_elements + step.workspace
        gathered: set = set()  # the step's reads at sub-multi-indices live until it ends (shared by its terms)
        for term in step.terms:
            result = math.prod(term.result_shape)
            inter = int(term.info.largest_intermediate) if term.info is not None else 0
            first = term.target not in live
            if first:
                live[term.target] = math.prod(plan.block_shapes[term.target])
                current += live[term.target]
            for (_, shape), g in zip(term.sources, term.gathers or ()):
                if g is not None and g[3] not in gathered:
                    gathered.add(g[3])
                    factors += math.prod(shape)
            # a path of several pairwise steps holds its last intermediate while it writes the result
            multi = term.info is not None and len(term.info.path) > 1
            if term.broadcast is not None:
                scratch = term.broadcast_scratch
            elif first and term.full:
                scratch = inter if inter > result or multi else 0
            else:
                scratch = result + inter if multi else max(result, inter)
            peak = max(peak, current + factors + scratch)
        for key in step.retire:
            current -= live.pop(key, 0)
    # forward results are expanded to every ordering of their rows at the end
    expanded = sum(plan.result_numel(k) for k in plan.expand)
    return max(peak, current + expanded)

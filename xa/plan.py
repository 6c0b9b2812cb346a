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

from .backprop import build_backward
from .batch import Batching, analyze
from .capture import Graph
from .fold import fold
from .jets import build_forward


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
    query: Any = None  # a query's structure (xa.queries.Ask): the rows it keeps per order
    mixed: tuple = ()  # joint blocks of leaves kept too (xa.mixed)

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


_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()
_CACHE_SIZE = 256
DIRECTIONS = ("auto", "backward", "forward")


def build(graph: Graph, order: int, rules: dict, requested: tuple, retained: tuple,
          direction: str = "auto", rows: int | None = None, batch_dim: int | None = None,
          samples: int | None = None, query=None, mixed: tuple = (), sliced: bool = False) -> Plan:
    """The plan for ``graph`` at ``order``, from the cache when its key was seen before.

    Args:
        graph: the captured graph.
        order: the highest derivative order.
        rules: node name -> rule (or ``None``) for every node of the graph,
            as :meth:`Graph.rules` resolves them; the rule objects are in the key.
        requested: value indices whose pure partials are wanted.
        retained: intermediate values whose partials are kept.
        direction: ``"backward"``, ``"forward"`` or ``"auto"`` (price both, keep the cheaper).
        rows: plan a backward pass over a chunk of that many source rows.
        batch_dim: the source's sample dim: per-sample derivatives (:mod:`xa.batch`).
        samples: with ``batch_dim``, plan for a chunk of that many samples.
        query: a query's structure (:class:`xa.queries.Ask`), forward jets only (:mod:`xa.queries`).
        mixed: joint blocks of requested leaves to keep too, backward only (:func:`xa.mixed`).
        sliced: with ``samples``, build the factors of the nodes that can be cut from the chunk's slices
            of what torch saved (:func:`xa.batch.cut`), not from all samples' (then narrowed).
    """
    key = (graph.signature(), tuple(sorted(rules.items(), key=lambda item: item[0])),
           order, requested, retained, direction, rows, batch_dim, samples, query, mixed)
    if sliced and samples is not None:  # which saved tensor is which value decides how the nodes are cut
        key += (True, tuple(tuple(sorted(p.items())) for p in graph.provenance()))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return dataclasses.replace(plan, cached=True)
    forward_ok = (rows is None and not retained and not mixed
                  and all(graph.values[i].leaf is not None for i in requested))
    if direction == "forward" and not forward_ok:
        raise ValueError("direction='forward' computes partials of leaves only; partials of intermediate "
                         "tensors (target= or retain_partials) need direction='backward' or 'auto'")
    batch = None
    candidates = {}
    # Rules run on CPU stand-ins while planning; a tensor a rule makes without naming a device
    # must be on the CPU too, whatever torch.set_default_device says.
    with torch.device("cpu"):
        graph, folds = fold(graph, rules, set(requested) | set(retained))
        if batch_dim is not None:
            batch = _analysis(graph, rules, batch_dim, key[:2], folds)
            if samples is not None:
                batch = batch.chunk(samples, sliced)
        if direction in ("auto", "backward") and query is None:
            steps, shapes, results = build_backward(graph, order, rules, requested, retained, rows, batch, mixed)
            candidates["backward"] = Plan(order, steps, shapes, results, tuple(retained), direction="backward")
        if forward_ok and direction in ("auto", "forward"):
            steps, shapes, results, expansions = build_forward(graph, order, rules, requested, batch, query)
            candidates["forward"] = Plan(order, steps, shapes, results, (), direction="forward", expand=expansions)
    prices = {d: p.flops for d, p in candidates.items()}
    plan = candidates[min(prices, key=lambda d: (prices[d], d != "backward"))]
    plan.prices = prices
    plan.batch = batch
    plan.folds = folds
    plan.query = query
    plan.mixed = mixed
    plan.itemsize = torch.empty((), dtype=graph.dtype, device="meta").element_size()
    _mark_aliases(plan)
    plan.peak_elements = peak(plan)
    _PLANS[key] = plan
    if len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
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

"""Plan: turn a captured graph into a program of einsum contractions.

The mathematics (see DESIGN.md, section 4). Backprop keeps, for the
current frontier of the graph, the joint partial blocks
``D[M] = d^k S / du_1 ... du_k`` over multisets ``M = {u_1 .. u_k}`` of
frontier values, each a dense tensor ``(*S.shape, *u_1.shape, ...)``,
symmetric under swapping two positions that hold the same value.

Processing ``y = f(x_1 .. x_m)`` (all of ``y``'s consumers done) replaces
every block holding ``y`` p times and other values ``V`` by its
multivariate Faa di Bruno expansion. For a target multiset ``M'``
(``q >= p`` positions reached through ``f``'s input slots, plus ``V``),
the chain rule for ``S(z) = G(f(slots(z)), V(z))`` sums over

1. which positions of ``M'`` are the ``V`` positions of ``D[M]`` (a value
   that is both in ``V`` and an input of ``f`` -- fan-out -- gets every
   choice),
2. which input slot each remaining position goes through (``x * x`` has
   the same value in two slots),
3. every set partition of those positions into ``p`` blocks, block ``B``
   contributing the rule's local derivative ``d^|B| y / dx_(slots of B)``.

Every term is written out (no grouping by multiplicity), so each block is
exactly symmetric by construction and no symmetrisation pass is needed.
A target block is kept only if some requested value (a leaf, the target,
a retained tensor) is an ancestor of every value in it; for a chain this
leaves exactly the pure blocks ``D[x^k]``.

A term is one einsum over the source block and the factors' operands.
Its output may repeat a label (an elementwise derivative written into a
dense block: a diagonal) or name a label no operand has (a sum's
broadcast); both are handled by adding the einsum's result into an
``as_strided`` view of the target block, so neither is ever materialised.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import combinations, combinations_with_replacement, product
from typing import Any

import opt_einsum as oe
import torch

from .capture import Graph
from .errors import RuleError
from .factor import Factor


def set_partitions(items: tuple, k: int):
    """Every partition of ``items`` into exactly ``k`` non-empty blocks (lists, in order)."""
    if k == 0:
        if not items:
            yield []
        return
    if len(items) < k:
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest, k - 1):
        yield [[first]] + part
    for part in set_partitions(rest, k):
        for b in range(len(part)):
            yield part[:b] + [[first] + part[b]] + part[b + 1:]


@dataclass
class Term:
    """One contraction: ``target_view += coef * einsum(blocks read, factor operands)``."""

    sources: tuple  # ((block key, shape to view it as), ...)
    operands: tuple  # ((slots, operand index), ...) into the step's factors
    target: tuple
    equation: str
    shapes: tuple
    view_sizes: tuple
    view_strides: tuple
    result_shape: tuple
    coef: float
    full: bool = False  # the result covers the whole target, in its order: it can become the block
    # When no label is summed the term is a broadcast product: each operand's
    # (permutation, view shape) lining it up with the target view's labels,
    # and the size of the product of all but its largest operand.
    broadcast: Any = None
    broadcast_scratch: int = 0
    info: Any = None
    expr: Any = None

    @property
    def flops(self) -> int:
        return int(self.info.opt_cost) if self.info is not None else 0


@dataclass
class Step:
    """Processing one node: its terms, then the blocks that die with it."""

    value: int
    name: str
    terms: list = field(default_factory=list)
    retire: list = field(default_factory=list)
    snapshot: bool = False


@dataclass
class Plan:
    order: int
    steps: list
    block_shapes: dict
    results: dict  # value index -> keys of its blocks for k = 1..order
    retained: tuple
    direction: str = "backward"
    prices: dict = field(default_factory=dict)  # direction -> total FLOPs
    peak_elements: int = 0  # the most block and scratch entries alive at once
    itemsize: int = 8  # bytes per entry, from the graph's dtype
    cached: bool = False

    @property
    def flops(self) -> int:
        """Total optimised FLOPs of every term, as opt_einsum counts them."""
        return sum(t.flops for s in self.steps for t in s.terms)

    @property
    def peak_bytes(self) -> int:
        """The estimated peak memory of executing the plan."""
        return self.peak_elements * self.itemsize


_PATHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()
_CACHE_SIZE = 256
path_searches = 0  # how many times opt_einsum was asked for a path (tests read it)


def _contraction(equation: str, shapes: tuple) -> tuple:
    global path_searches
    key = (equation, shapes)
    hit = _PATHS.get(key)
    if hit is None:
        path_searches += 1
        path, info = oe.contract_path(equation, *shapes, shapes=True, optimize="auto")
        hit = (info, oe.contract_expression(equation, *shapes, optimize=path))
        _PATHS[key] = hit
        if len(_PATHS) > 4 * _CACHE_SIZE:
            _PATHS.popitem(last=False)
    return hit


def _peak(plan: Plan) -> int:
    """Entries alive at the worst moment of execution: blocks, the step's factors, one term's scratch.

    Follows the executor: a target block is allocated at its first term and
    lives until its step retires it (results until the end). An einsum term
    holds its result or opt_einsum's largest intermediate, whichever is
    larger (the last intermediate is the result); a first term that covers
    its block whole becomes the block. A broadcast product holds only the
    product of its smaller operands.
    """
    live = {key: math.prod(shape) for key, shape in plan.block_shapes.items() if key == (0,)}
    current = sum(live.values())
    peak = current
    for step in plan.steps:
        factor_sizes: dict = {}
        for term in step.terms:
            for ref, shape in zip(term.operands, term.shapes[len(term.sources):]):
                factor_sizes[ref] = math.prod(shape)
        factors = sum(factor_sizes.values())
        for term in step.terms:
            result = math.prod(term.result_shape)
            inter = int(term.info.largest_intermediate) if term.info is not None else 0
            first = term.target not in live
            if first:
                live[term.target] = math.prod(plan.block_shapes[term.target])
                current += live[term.target]
            if term.broadcast is not None:
                scratch = term.broadcast_scratch
            elif first and term.full:
                scratch = inter if inter > result else 0
            else:
                scratch = max(result, inter)
            peak = max(peak, current + factors + scratch)
        for key in step.retire:
            current -= live.pop(key, 0)
    return peak


class _TermLabels:
    """Label ids of one term; factor-local labels are shifted into a fresh range."""

    def __init__(self):
        self.sizes: list = []

    def new(self, size: int) -> int:
        self.sizes.append(int(size))
        return len(self.sizes) - 1

    def adopt(self, factor: Factor, slots: tuple) -> tuple:
        """Shift ``factor``'s labels in; returns the shift and its operands as ``((slots, k), labels)``."""
        base = len(self.sizes)
        self.sizes.extend(factor.sizes)
        shift = {i: base + i for i in range(len(factor.sizes))}
        operands = [((slots, k), tuple(shift[i] for i in labels)) for k, (_, labels) in enumerate(factor.operands)]
        return shift, operands


def _check_factor(factor: Factor, graph: Graph, y: int, slots: tuple, inputs: tuple) -> None:
    v = graph.values[y]
    where = f"the rule for {v.name} (slots {slots})"
    if not isinstance(factor, Factor):
        raise RuleError(f"{where} returned {type(factor).__name__}, expected xa.Factor or None")
    if len(factor.ins) != len(slots):
        raise RuleError(f"{where} returned {len(factor.ins)} input ports, expected {len(slots)}")
    numel = math.prod(v.shape)
    if math.prod(factor.sizes[i] for i in factor.out) != numel:
        raise RuleError(f"{where}: output port covers {math.prod(factor.sizes[i] for i in factor.out)} "
                        f"entries, the node's output has {numel}")
    for port, s in zip(factor.ins, slots):
        n = graph.values[inputs[s]].numel
        if math.prod(factor.sizes[i] for i in port) != n:
            raise RuleError(f"{where}: port of slot {s} covers {math.prod(factor.sizes[i] for i in port)} "
                            f"entries, the input has {n}")
    for tensor, labels in factor.operands:
        if tuple(tensor.shape) != tuple(factor.sizes[i] for i in labels):
            raise RuleError(f"{where}: operand of shape {tuple(tensor.shape)} labelled with sizes "
                            f"{tuple(factor.sizes[i] for i in labels)}")


class _Factors:
    """A node's local derivatives, asked of its rule once per slot tuple and checked."""

    def __init__(self, graph, y, rule, ctx, inputs):
        self.graph, self.y, self.rule, self.ctx, self.inputs = graph, y, rule, ctx, inputs
        self.cache: dict = {}

    def __call__(self, slots):
        if slots not in self.cache:
            f = self.rule(self.ctx, slots)
            if f is not None:
                _check_factor(f, self.graph, self.y, slots, self.inputs)
            self.cache[slots] = f
        return self.cache[slots]


def _ancestry(graph: Graph, requested: set) -> list:
    """For each value, the requested values it reaches (itself included)."""
    reach: list = [frozenset()] * len(graph.values)
    for i in reversed(graph.order):
        v = graph.values[i]
        acc = {i} if i in requested else set()
        for j in v.inputs:
            if j is not None:
                acc |= reach[j]
        reach[i] = frozenset(acc)
    return reach


DIRECTIONS = ("auto", "backward", "forward")


def build(graph: Graph, order: int, requested: tuple, retained: tuple, overrides: dict,
          direction: str = "auto", rows: int | None = None) -> Plan:
    """The plan for ``graph`` at ``order``, from the cache when its signature was seen before.

    ``direction`` is ``"backward"`` (backprop of joint blocks from the source),
    ``"forward"`` (jets from each requested leaf) or ``"auto"``: both are
    priced with opt_einsum's FLOP counts and the cheaper is kept. Partials
    of intermediate tensors need the backward direction. ``rows`` plans a
    backward pass over a chunk of that many source rows, whose one-hot
    block ``(rows, *source.shape)`` is given at execution.
    """
    key = (graph.signature(), order, requested, retained, direction, rows,
           tuple(sorted((k, id(r)) for k, r in overrides.items())))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        plan.cached = True
        return plan
    from .forward import build_forward, flops

    forward_ok = rows is None and not retained and all(graph.values[i].leaf is not None for i in requested)
    if direction == "forward" and not forward_ok:
        raise ValueError("direction='forward' computes partials of leaves only; partials of intermediate "
                         "tensors (target= or retain_partials) need direction='backward' or 'auto'")
    prices = {}
    plan = None
    if direction in ("auto", "backward"):
        plan = _build(graph, order, set(requested) | set(retained), requested, retained, overrides, rows)
        prices["backward"] = plan.flops
    if forward_ok and direction in ("auto", "forward"):
        steps, shapes, results = build_forward(graph, order, requested, overrides)
        prices["forward"] = flops(steps)
        if plan is None or prices["forward"] < prices["backward"]:
            plan = Plan(order, steps, shapes, results, (), direction="forward")
    plan.prices = prices
    plan.peak_elements = _peak(plan)
    plan.itemsize = torch.empty((), dtype=graph.dtype).element_size()
    _PLANS[key] = plan
    if len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _build(graph, order, requested, results_for, retained, overrides, rows) -> Plan:
    N = order
    reach = _ancestry(graph, requested)
    s_shape = graph.source_shape if rows is None else (rows,)
    s_numel = math.prod(s_shape)

    def keep(m):
        common = reach[m[0]]
        for u in m[1:]:
            common = common & reach[u]
        return bool(common)

    def block_shape(m):
        return s_shape + tuple(d for u in m for d in graph.values[u].shape)

    live = {(0,): None}  # block keys; without rows, the source's own block is the identity
    shapes = {} if rows is None else {(0,): (rows,) + graph.source_shape}
    steps = []
    for y in graph.order:
        v = graph.values[y]
        holding = [m for m in live if y in m]
        if not holding:
            continue
        snapshot = y in retained
        if v.leaf is not None or not (reach[y] - {y}):
            if snapshot:
                steps.append(Step(y, v.name, snapshot=True))
            continue
        rule = graph.rule(y, overrides)
        ctx = graph.ctx(y, meta=True)
        inputs = tuple(i if i is not None and reach[i] else None for i in v.inputs)
        factor = _Factors(graph, y, rule, ctx, inputs)
        step = Step(y, v.name, snapshot=snapshot)
        for m in holding:
            for term in _expand(graph, m, y, inputs, N, keep, factor, s_numel, rows is None):
                if term.target not in live:
                    live[term.target] = True
                    shapes[term.target] = block_shape(term.target)
                step.terms.append(term)
        for m in holding:
            del live[m]
        step.retire = [m for m in holding if m != (0,) or rows is not None]
        steps.append(step)

    results = {i: [(i,) * k for k in range(1, N + 1)] for i in results_for}
    for keys in results.values():
        for k in keys:
            shapes.setdefault(k, block_shape(k))
    return Plan(order, steps, shapes, results, tuple(retained))


def _expand(graph, m, y, inputs, N, keep, factor, s_numel, identity):
    p = m.count(y)
    V = tuple(u for u in m if u != y)
    nodes = sorted({i for i in inputs if i is not None})
    slots_of = {z: [s for s, i in enumerate(inputs) if i == z] for z in nodes}
    for q in range(p, N - len(V) + 1):
        for through in combinations_with_replacement(nodes, q):
            target = tuple(sorted(V + through))
            if not keep(target):
                continue
            groups: dict = {}
            for pos, z in enumerate(target):
                groups.setdefault(z, []).append(pos)
            vchoices = [combinations(groups[z], V.count(z)) for z in groups]
            for vpick in product(*vchoices):
                vpos = {z: list(c) for z, c in zip(groups, vpick)}
                taken = {pos for c in vpick for pos in c}
                rest = [pos for pos in range(len(target)) if pos not in taken]
                for slots in product(*(slots_of[target[pos]] for pos in rest)):
                    for part in set_partitions(tuple(range(len(rest))), p):
                        blocks = []
                        for members in part:
                            members = sorted(members, key=lambda t: slots[t])
                            f = factor(tuple(slots[t] for t in members))
                            if f is None:
                                break
                            blocks.append((f, [rest[t] for t in members], tuple(slots[t] for t in members)))
                        else:
                            yield _term(graph, m, y, V, vpos, target, blocks, s_numel, identity)


def _term(graph, m, y, V, vpos, target, blocks, s_numel, identity) -> Term:
    lab = _TermLabels()
    out_of_pos: dict = {}
    y_ports, operands = [], []
    coef = 1.0
    for f, positions, slots in blocks:
        shift, f_operands = lab.adopt(f, slots)
        y_ports.append(tuple(shift[i] for i in f.out))
        for pos, port in zip(positions, f.ins):
            out_of_pos[pos] = tuple(shift[i] for i in port)
        operands.extend(f_operands)
        coef *= f.coef
    sources = []
    if identity and m == (0,):  # the source's own block is the identity: its labels are the y port's
        a = y_ports[0]
    else:
        a = (lab.new(s_numel),)
        d_labels = list(a)
        yi = 0
        vi: dict = {}
        for u in m:
            if u == y:
                d_labels.extend(y_ports[yi])
                yi += 1
            else:
                label = lab.new(graph.values[u].numel)
                d_labels.append(label)
                pos = vpos[u][vi.get(u, 0)]
                vi[u] = vi.get(u, 0) + 1
                out_of_pos[pos] = (label,)
        sources.append((m, tuple(d_labels)))
    out = list(a)
    for pos in range(len(target)):
        out.extend(out_of_pos[pos])
    return compile_term(lab, sources, operands, out, target, coef)


def compile_term(lab, sources, operands, out, target, coef) -> Term:
    """The einsum and the strided view that add one term into its target block.

    Args:
        lab: the term's labels (their sizes).
        sources: ``(block key, labels)`` of the blocks read, each reshaped so
            that it has one dim per label.
        operands: ``((slots, k), labels)`` of the factors' operands.
        out: the labels of the target block, in its row-major order;
            repeats walk a diagonal, labels no operand has are broadcast.
    """
    sizes = lab.sizes
    operand_labels = [labels for _, labels in sources] + [labels for _, labels in operands]
    # Row-major strides of the target block seen through the output labels;
    # a label repeated in the output walks the diagonal (strides add up).
    strides = [0] * len(out)
    acc = 1
    for t in range(len(out) - 1, -1, -1):
        strides[t] = acc
        acc *= sizes[out[t]]
    unique, stride_of = [], {}
    for label, st in zip(out, strides):
        if label not in stride_of:
            unique.append(label)
            stride_of[label] = 0
        stride_of[label] += st
    present = {label for labels in operand_labels for label in labels}
    kept = [label for label in unique if label in present]
    symbols: dict = {}

    def sym(label):
        if label not in symbols:
            symbols[label] = oe.get_symbol(len(symbols))
        return symbols[label]

    equation = ",".join("".join(sym(i) for i in labels) for labels in operand_labels)
    equation += "->" + "".join(sym(i) for i in kept)
    op_shapes = tuple(tuple(sizes[i] for i in labels) for labels in operand_labels)
    term = Term(
        sources=tuple((key, tuple(sizes[i] for i in labels)) for key, labels in sources),
        operands=tuple(ref for ref, _ in operands),
        target=target,
        equation=equation,
        shapes=op_shapes,
        view_sizes=tuple(sizes[i] for i in unique),
        view_strides=tuple(stride_of[i] for i in unique),
        result_shape=tuple(sizes[i] if i in present else 1 for i in unique),
        coef=coef,
        full=len(unique) == len(out) and len(kept) == len(unique),
    )
    if operand_labels and all(len(set(ls)) == len(ls) and set(ls) <= set(unique) for ls in operand_labels):
        where = {label: n for n, label in enumerate(unique)}
        term.broadcast = tuple(
            (tuple(sorted(range(len(ls)), key=lambda d, ls=ls: where[ls[d]])),
             tuple(sizes[u] if u in ls else 1 for u in unique))
            for ls in operand_labels
        )
        by_size = sorted(operand_labels, key=lambda ls: math.prod(sizes[u] for u in ls))[:-1]
        small = {u for ls in by_size for u in ls}
        term.broadcast_scratch = math.prod(sizes[u] for u in small) if by_size else 0
    if operand_labels:
        term.info, term.expr = _contraction(equation, op_shapes)
    return term

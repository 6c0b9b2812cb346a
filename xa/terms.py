"""Terms: one einsum each, the unit both directions build their programs from.

A term adds ``coef * einsum(blocks read, factor operands)`` into its target
block. Its output labels may repeat a label (an elementwise derivative
written into a dense block: a diagonal) or name a label that no operand
has (a sum's broadcast); both are handled by adding the einsum's result
into an ``as_strided`` view of the target block, so neither is ever
materialised.

A term holds only what planning may depend on: labels, shapes, the
opt_einsum path. Every value -- the factors' operands *and* their
coefficients -- is read from the rule again at execution
(:class:`NodeFactors`), and the factor's structure is checked against the
one the plan was built from, so a cached plan can never bake in a number.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
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
    """One contraction: ``target_view += coef * einsum(blocks read, factor operands)``.

    ``coef`` is the product of the coefficients of the factors named in
    ``factors`` (one entry per factor, repeats allowed), read at execution.
    """

    sources: tuple  # ((block key, shape to view it as), ...): the incoming blocks
    operands: tuple  # ((slots, operand index), ...) into the step's factors
    factors: tuple  # the slots of every factor the term multiplies, for their coefficients
    target: tuple
    equation: str
    shapes: tuple
    view_sizes: tuple
    view_strides: tuple
    result_shape: tuple
    full: bool = False  # the result covers the whole target, in its order: it can become the block
    # The target seen with one dim per output label: (its sizes, and for each the index of its
    # distinct label in view_sizes); a repeated label is a diagonal. Out-of-place adds read it.
    out_sizes: tuple = ()
    out_places: tuple = ()
    # When no label is summed the term is a broadcast product: for each operand, smallest first,
    # (its position, the permutation lining it up with the target view's labels or None,
    # its view shape), and the size of the product of all but its largest operand.
    broadcast: Any = None
    broadcast_scratch: int = 0
    info: Any = None
    expr: Any = None
    # Per-sample plans (xa.batch): per factor operand, the shape to read it as (its labels split
    # so that the sample dim is one of them) and the axes that carry the sample label, or None.
    views: Any = None
    # Forward jets (xa.jets): per source, None or (axis, rows before, index spec) -- the
    # source is read at each target row's sub-multi-index, one index_select.
    gathers: Any = None
    # A relabelling of one block that dies with this step and that no later term of the step
    # reads: its target may be that block itself, not a copy (set by the planner).
    alias: bool = False

    @property
    def flops(self) -> int:
        return int(self.info.opt_cost) if self.info is not None else 0


@dataclass
class Step:
    """Processing one node: its terms, then the blocks that die with it.

    ``structure`` maps each slot tuple the terms use to the fingerprint of
    the factor the plan was built from; execution checks the rule gives the
    same one.
    """

    value: int
    name: str
    terms: list = field(default_factory=list)
    retire: list = field(default_factory=list)
    snapshot: bool = False
    structure: dict = field(default_factory=dict)
    workspace: int = 0  # entries the rules allocate for a while to build one factor (the largest)
    factor_elements: int = 0  # entries of every factor operand the step reads, as the rules build them
    # a sliced chunk of samples (xa.batch.cut): the slot tuples whose factors the rule builds from the
    # chunk's slices of what torch saved, and how the node is cut (the others: all samples', narrowed)
    sliced: frozenset = frozenset()
    cut: Any = None


_PATHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PATH_CACHE_SIZE = 1024
path_searches = 0  # how many times opt_einsum was asked for a path (tests read it)


def contraction(equation: str, shapes: tuple) -> tuple:
    """``(PathInfo, a callable running opt_einsum's path step by step, :class:`_Path`)``, cached."""
    global path_searches
    key = (equation, shapes)
    hit = _PATHS.get(key)
    if hit is None:
        path_searches += 1
        path, info = oe.contract_path(equation, *shapes, shapes=True, optimize="auto")
        hit = (info, _Path(oe.contract_expression(equation, *shapes, optimize=path), equation, shapes))
        _PATHS[key] = hit
        if len(_PATHS) > _PATH_CACHE_SIZE:
            _PATHS.popitem(last=False)
    return hit


class _Tensordot:
    """A two-operand contraction whose output is one operand's free labels then the other's (each in any order).

    Run as ``torch.tensordot`` does -- each operand permuted to ``(free, summed)`` and ``(summed, free)``
    (a copy where that moves labels), one ``mm`` -- with each operand's free labels put in the output's
    order first, so that the result is contiguous in it; opt_einsum multiplies the operands the other way
    round and hands back a transposed view (a linear layer's jet would come out ``(c, a, b)`` in memory, and
    every later pass over it would stride), and ``torch.einsum`` permutes its result. The ``mm`` can write
    into a buffer (``out``), and the copies too (``copies``).
    """

    def __init__(self, dims: tuple, free: tuple, swap: bool):
        self.dims, self.free, self.swap = dims, free, swap

    def __call__(self, a, b, backend=None, out=None, copies=(None, None)):
        x, y = (b, a) if self.swap else (a, b)
        dx, dy = self.dims
        if all(x.shape[d] == 1 for d in dx):  # sums only labels of size one (a jet's single row): a product
            fx, fy = self.free
            x, y = x.permute(fx + dx), y.permute(fy + dy)
            if dx:
                x, y = x.squeeze(tuple(range(len(fx), x.dim()))), y.squeeze(tuple(range(len(fy), y.dim())))
            return torch.mul(x.reshape(x.shape + (1,) * y.dim()), y, out=out)
        x, y = self.lined(x, y)
        inner = math.prod(x.shape[x.dim() - len(dx):])
        shape = x.shape[:x.dim() - len(dx)] + y.shape[len(dy):]
        a, b = _matrix(x, (-1, inner), copies[0]), _matrix(y, (inner, -1), copies[1])
        if out is None:
            return torch.mm(a, b).reshape(shape)
        torch.mm(a, b, out=out.view(a.shape[0], b.shape[1]))
        return out

    def lined(self, x, y) -> tuple:
        """The operands (in call order after the swap) permuted to ``(free, summed)`` and ``(summed, free)``."""
        (dx, dy), (fx, fy) = self.dims, self.free
        return x.permute(fx + dx), y.permute(dy + fy)

    def copies(self, a: tuple, b: tuple) -> tuple:
        """Entries of each operand (shapes ``a``, ``b``) the call copies to line it up, 0 where a view does."""
        x, y = (b, a) if self.swap else (a, b)
        if all(x[d] == 1 for d in self.dims[0]):
            return 0, 0
        px, py = self.lined(torch.empty(x, device="meta"), torch.empty(y, device="meta"))
        return tuple(0 if _moves_nothing(t) else t.numel() for t in (px, py))

    @classmethod
    def of(cls, equation: str):
        inputs, out = equation.split("->")
        parts = inputs.split(",")
        if len(parts) != 2:
            return None
        a, b = parts
        shared = [c for c in a if c in b]
        if any(len(set(t)) != len(t) for t in (a, b, out)) or any(c in out for c in shared):
            return None
        free_a, free_b = [c for c in a if c not in b], [c for c in b if c not in a]
        if sorted(free_a + free_b) != sorted(out):
            return None
        for x, y, swap in ((a, b, False), (b, a, True)):
            head, tail = out[:len(x) - len(shared)], out[len(x) - len(shared):]
            if set(head) == set(c for c in x if c not in y) and set(tail) == set(c for c in y if c not in x):
                return cls(([x.index(c) for c in shared], [y.index(c) for c in shared]),
                           ([x.index(c) for c in head], [y.index(c) for c in tail]), swap)
        return None


def _matrix(t, shape, into=None):
    """``t.reshape(shape)``: a view where its strides allow one, else a copy (into ``into`` where given)."""
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape) if into is None else into.view(t.shape).copy_(t).view(shape)


def _moves_nothing(t) -> bool:
    """Whether a permuted view keeps the row-major order of its dims larger than one (a view, no copy)."""
    kept = [st for n, st in zip(t.shape, t.stride()) if n > 1]
    return all(a > b for a, b in zip(kept, kept[1:]))


class _Broadcast:
    """A product of two operands that sums no label: a broadcast multiply of two views."""

    def __init__(self, a: str, b: str, out: str):
        self.views = [self._align(labels, out) for labels in (a, b)]

    @staticmethod
    def _align(labels: str, out: str) -> tuple:
        perm = tuple(sorted(range(len(labels)), key=lambda d: out.index(labels[d])))
        return perm, tuple(c in labels for c in out)

    def __call__(self, a, b, backend=None, out=None):
        (pa, ka), (pb, kb) = self.views
        return torch.mul(self._view(a, pa, ka), self._view(b, pb, kb), out=out)

    @staticmethod
    def _view(t, perm, kept):
        t = t.permute(perm)
        sizes = iter(t.shape)
        return t.reshape([next(sizes) if k else 1 for k in kept])


class _SmallSum:
    """A product of two operands summing labels both have, with a label of both kept, no larger than an operand.

    ``torch.einsum('rx,rx->x')`` (the sum of a jet's squared rows, over each entry ``x``) runs as a
    batched matmul of ``(1, r) @ (r, 1)`` per entry, many times slower than the broadcast product with the
    summed labels leading (into ``copies[0]`` where given) and one ``sum`` over them.
    """

    def __init__(self, a: str, b: str, out: str, sizes: dict):
        summed = "".join(c for c in dict.fromkeys(a + b) if c not in out)
        self.views = [_Broadcast._align(labels, summed + out) for labels in (a, b)]
        self.dims = tuple(range(len(summed)))
        self.product = tuple(sizes[c] for c in summed + out)

    @classmethod
    def of(cls, equation: str, sizes: dict):
        inputs, out = equation.split("->")
        parts = inputs.split(",")
        if len(parts) != 2 or any(len(set(t)) != len(t) for t in (*parts, out)):
            return None
        a, b = parts
        summed = [c for c in dict.fromkeys(a + b) if c not in out]
        if not summed or not set(out) <= set(a) | set(b) or not any(c in a and c in b for c in out):
            return None
        if any(c not in a or c not in b for c in summed):
            return None
        if math.prod(sizes[c] for c in summed + list(out)) > max(math.prod(sizes[c] for c in t) for t in (a, b)):
            return None  # a product larger than either operand: more memory than the batched matmul needs
        return cls(a, b, out, sizes)

    def __call__(self, a, b, backend=None, out=None, copies=(None, None)):
        (pa, ka), (pb, kb) = self.views
        into = None if copies[0] is None else copies[0].view(self.product)
        product = torch.mul(_Broadcast._view(a, pa, ka), _Broadcast._view(b, pb, kb), out=into)
        return torch.sum(product, dim=self.dims, out=out)

    def copies(self, a: tuple, b: tuple) -> tuple:
        """Entries of the product summed (the step's scratch), as a tensordot's copies."""
        return math.prod(self.product), 0


class _Diagonal:
    """A step that reads an operand on a diagonal (a repeated label): the diagonal's view, then the step without it.

    ``torch.einsum('ad,abcc->abcd')`` (a tied leaf's block: the diagonal of the output's block times the
    input squared) runs as a batched matmul of a dimension of one, several times slower than the
    broadcast product of the diagonal's view that the same numbers come from.
    """

    def __init__(self, reads: list, inner):
        self.reads, self.inner = reads, inner

    def __call__(self, *operands, backend=None, **out):
        """``out`` (``out=``, ``copies=``) goes to the step without the diagonal (:class:`_Path`)."""
        return self.inner(*[op if eq is None else torch.einsum(eq, op) for eq, op in zip(self.reads, operands)],
                          **out)

    def shapes(self, *shapes) -> list:
        """The operands' shapes once their diagonals are read."""
        out = []
        for eq, shape in zip(self.reads, shapes):
            if eq is None:
                out.append(shape)
                continue
            src, dst = eq.split("->")
            size = dict(zip(src, shape))
            out.append(tuple(size[c] for c in dst))
        return out


def _step(equation: str, sizes: dict):
    """One pairwise step of a path, as the fastest torch call that computes it (``sizes``: each label's)."""
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) == 2 and len(set(out)) == len(out) and any(len(set(p)) != len(p) for p in parts):
        once = ["".join(dict.fromkeys(p)) for p in parts]  # each operand's diagonal: a view
        return _Diagonal([None if a == p else f"{p}->{a}" for p, a in zip(parts, once)],
                         _step(f"{once[0]},{once[1]}->{out}", sizes))
    if len(parts) == 2:
        tensordot = _Tensordot.of(equation)
        if tensordot is not None:
            return tensordot
        a, b = parts
        if all(len(set(t)) == len(t) for t in (a, b, out)) and set(a) | set(b) == set(out):
            return _Broadcast(a, b, out)
        small = _SmallSum.of(equation, sizes)
        if small is not None:
            return small
    return lambda *operands: torch.einsum(equation, *operands)


class _Path:
    """opt_einsum's pairwise path run with torch, each step by :func:`_step`.

    opt_einsum hands a product that sums no label to ``torch.einsum``, which
    batches it through ``bmm`` (four times slower than ``*`` on a jet), and
    multiplies a linear layer's operands the other way round (a transposed
    result that every later pass strides over).

    ``shapes[i]`` is the output shape of step ``i`` and ``writes[i]`` whether that step
    can compute into a buffer it is given (``outs``: a tensor of that many entries, or
    None, per step; :mod:`xa.arena` lays them out): a tensordot or a product can, a
    generic ``torch.einsum`` cannot, and allocates its own.
    """

    def __init__(self, expr, equation: str, shapes: tuple):
        sizes = {c: n for labels, shape in zip(equation.split("->")[0].split(","), shapes)
                 for c, n in zip(labels, shape)}
        self.steps, self.shapes, self.writes, self.copies = [], [], [], []
        stack = list(shapes)
        for inds, _, eq, *_ in expr.contraction_list:
            step = _step(eq, sizes)
            self.steps.append((tuple(inds), step))
            self.shapes.append(tuple(sizes[c] for c in eq.split("->")[1]))
            core = step.inner if isinstance(step, _Diagonal) else step
            self.writes.append(isinstance(core, (_Tensordot, _Broadcast, _SmallSum)))
            ins = [stack.pop(x) for x in inds]
            if core is not step:
                ins = step.shapes(*ins)
            self.copies.append(core.copies(*ins) if isinstance(core, (_Tensordot, _SmallSum)) else (0, 0))
            stack.append(self.shapes[-1])

    def __call__(self, *operands, backend=None, outs=None, copies=None):
        """``outs[i]``: where step ``i`` writes its result; ``copies[i]``: where a tensordot lines its operands up.

        Given ``outs`` (a run without autograd), a step that can write into a buffer always does, into a new
        one where ``outs[i]`` is None: the same kernels on the same layouts, in an arena or not, so the same
        numbers bit for bit.
        """
        operands = list(operands)
        for n, (inds, step) in enumerate(self.steps):
            out = None if outs is None else outs[n]
            args = [operands.pop(x) for x in inds]
            if out is None and outs is not None and self.writes[n]:
                out = torch.empty(math.prod(self.shapes[n]), dtype=args[0].dtype, device=args[0].device)
            kw = {} if out is None else {"out": out.view(self.shapes[n])}
            if copies is not None and isinstance(step.inner if isinstance(step, _Diagonal) else step,
                                                 (_Tensordot, _SmallSum)):
                kw["copies"] = copies[n]
            operands.append(step(*args, **kw))
        return operands[0]


class TermLabels:
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


def structure(factor: Factor) -> tuple:
    """Everything about a factor that a plan is built from: ports, label sizes, operand labels."""
    return (factor.out, factor.ins, factor.sizes, tuple(labels for _, labels in factor.operands))


def _check_factor(factor: Factor, graph: Graph, y: int, slots: tuple, inputs: tuple) -> None:
    v = graph.values[y]
    where = f"the rule for {v.title} (slots {slots})"
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


class PlanFactors:
    """A node's local derivatives while planning: asked of its rule once per slot tuple, and checked."""

    def __init__(self, graph, y, rule, ctx, inputs):
        self.graph, self.y, self.rule, self.ctx, self.inputs = graph, y, rule, ctx, inputs
        self.cache: dict = {}
        # per-sample plans (xa.batch.BatchFactors): slots -> (built?, factor) from the chunk's slices
        # (kept in self.sliced), or for all samples from stand-ins of a few
        self.slicer, self.scaler, self.cut, self.sliced = None, None, None, {}

    def __call__(self, slots):
        if slots in self.sliced:
            return self.sliced[slots]
        if slots not in self.cache and self.slicer is not None:
            ok, f = self.slicer(slots)
            if ok:
                self.sliced[slots] = f
                return f
        if slots not in self.cache:
            ok, f = self.scaler(slots) if self.scaler is not None else (False, None)
            if not ok:
                f = self.rule(self.ctx, slots)
            if f is not None:
                _check_factor(f, self.graph, self.y, slots, self.inputs)
            self.cache[slots] = f
        return self.cache[slots]

    def finish(self, step: Step) -> Step:
        """Record on ``step`` what execution must find again (each factor's structure) and the rules' workspace."""
        used = {slots for t in step.terms for slots in t.factors}
        got = {slots: self.sliced[slots] if slots in self.sliced else self.cache[slots] for slots in used}
        step.structure = {slots: structure(got[slots]) for slots in used}
        step.workspace = max((got[slots].workspace for slots in used), default=0)
        step.factor_elements = sum(t.numel() for slots in used for t, _ in got[slots].operands)
        step.sliced = frozenset(slots for slots in used if slots in self.sliced)
        step.cut = self.cut if step.sliced else None
        # the hooks are bound methods of an xa.batch.BatchFactors that holds this: no cycle keeps the factors
        self.slicer = self.scaler = None
        return step


class NodeFactors:
    """A node's local derivatives while executing: the rule's real values, in the plan's structure."""

    def __init__(self, step: Step, rule, ctx, sliced_ctx=None):
        self.step, self.rule, self.ctx, self.sliced_ctx = step, rule, ctx, sliced_ctx
        self.cache: dict = {}

    def __getitem__(self, slots) -> Factor:
        f = self.cache.get(slots)
        if f is None:
            f = self.rule(self.sliced_ctx if slots in self.step.sliced else self.ctx, slots)
            if not isinstance(f, Factor) or structure(f) != self.step.structure[slots]:
                got = "None (zero)" if f is None else "another structure"
                raise RuleError(
                    f"the rule for {self.step.name} (slots {slots}) gave {got} at execution, not the factor the "
                    "plan was built from: a rule may compute with values, never choose its ports, labels or "
                    "zeros by them (use saved shapes and Python numbers torch saved, which are in the plan's key)"
                )
            self.cache[slots] = f
        return f

    def coef(self, term: Term) -> float:
        c = 1.0
        for slots in term.factors:
            c *= self[slots].coef
        return c


def compile_term(lab, sources, operands, factors, out, target, unit_sums: bool = False, keep: tuple = ()) -> Term:
    """The einsum and the strided view that add one term into its target block.

    Args:
        lab: the term's labels (their sizes).
        sources: ``(block key, labels)`` of the blocks read, each reshaped so
            that it has one dim per label.
        operands: ``((slots, k), labels)`` of the factors' operands.
        factors: the slots of each factor multiplied, for its coefficient.
        out: the labels of the target block, in its row-major order;
            repeats walk a diagonal, labels no operand has are broadcast.
        target: the key of the block the term adds into.
        unit_sums: drop the labels of size one that the term sums (``F.linear`` on a
            vector sums over ``addmm``'s row of one), so that a term that sums nothing
            else is a broadcast product written straight into its block; every operand
            is then read through ``term.shapes``. Labels in ``keep`` stay (a jet's rows,
            which a gather reads along).
    """
    sizes = lab.sizes
    if unit_sums:
        unit = {i for _, labels in list(sources) + list(operands) for i in labels
                if sizes[i] == 1 and i not in out and i not in keep}
        if unit:
            sources = [(key, tuple(i for i in labels if i not in unit)) for key, labels in sources]
            operands = [(ref, tuple(i for i in labels if i not in unit)) for ref, labels in operands]
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
        factors=tuple(factors),
        target=target,
        equation=equation,
        shapes=op_shapes,
        view_sizes=tuple(sizes[i] for i in unique),
        view_strides=tuple(stride_of[i] for i in unique),
        result_shape=tuple(sizes[i] if i in present else 1 for i in unique),
        full=len(unique) == len(out) and len(kept) == len(unique),
        out_sizes=tuple(sizes[i] for i in out),
        out_places=tuple(unique.index(i) for i in out),
    )
    if operand_labels and all(len(set(ls)) == len(ls) and set(ls) <= set(unique) for ls in operand_labels):
        where = {label: n for n, label in enumerate(unique)}
        lined = []
        for n, ls in enumerate(operand_labels):
            perm = tuple(sorted(range(len(ls)), key=lambda d, ls=ls: where[ls[d]]))
            lined.append((n, None if perm == tuple(range(len(ls))) else perm,
                          tuple(sizes[u] if u in ls else 1 for u in unique)))
        # smallest first, as execution multiplies them (stable: the planned order decides ties)
        term.broadcast = tuple(sorted(lined, key=lambda t: math.prod(t[2])))
        by_size = sorted(operand_labels, key=lambda ls: math.prod(sizes[u] for u in ls))[:-1]
        small = {u for ls in by_size for u in ls}
        term.broadcast_scratch = math.prod(sizes[u] for u in small) if by_size else 0
    if operand_labels:
        term.info, term.expr = contraction(equation, op_shapes)
    return term

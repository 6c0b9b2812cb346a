"""Per-sample derivatives: the source's sample dimension as one label tied through every factor.

With ``batch_dim=d``, sample ``b`` of the source is ``S.select(d, b)``, and
the derivatives wanted are those of each sample by itself: ``d^k S_b / dX_b^k``
for a value ``X`` that carries the sample dimension (*batched*), and
``d^k S_b / dW^k`` for one that does not (*shared*: weights, biases and what
is computed from them alone). Every block then has one sample label ``b``
of size ``B`` in front, ``(B, s', u_1', ...)``, never ``B x B``, so cost
grows linearly in ``B``.

Where each value keeps its samples follows from the first-order factors
alone (:func:`analyze`), from the source down: a factor carries the sample
label when its output port's sample label is tied to one label of an input
port; that input is batched where the label sits (a digit of its flattened
index: usually a dim, or part of one).
Otherwise the input is shared by this consumer. A value that two
consumers see differently (``x - x.mean(0)``: per sample through the
subtraction, shared through the mean) couples samples, and so does a
factor whose dense operand links the output's sample label to an
untied input's dim in the same place (softmax or batch norm over the
batch): both are a :class:`~xa.errors.BatchMixingError` before anything
runs.

A rule's ports may merge dims into one label (layer norm's rows, a view);
:func:`split_port` splits such a label so that the sample dim has a label
of its own, or joins several labels that together hold the samples (a grid
of points). Either is a reshape of every operand that carries them, so a
plan records the operand shapes and execution only reshapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .capture import Cut, Graph
from .errors import BatchMixingError
from .factor import Factor, join, port_labels, split_at


@dataclass(frozen=True)
class Batching:
    """The sample layout of one request.

    A value's sample index is one digit of its flattened index: ``at[v]`` is
    the product of the sizes before it (for a sample dim ``e``,
    ``prod(shape[:e])``), so ``flat = (i * B + b) * post + j``. Usually that is
    a dim of its own; inside ``nn.Linear`` on a ``(T, B, F)`` input torch
    merges it with ``T`` into one dim of ``T * B`` rows, and it is a digit of that dim.

    Args:
        source_dim: the source's sample dim.
        total: ``B``, the number of samples.
        at: per value, where its sample digit is (see above), or ``None`` for a shared value.
        size: the samples one plan covers at a time (``total``, or a chunk of them).
    """

    source_dim: int
    total: int
    at: tuple
    size: int
    # values every path from which to the source has a zero first derivative (x in floor(x) * y):
    # constants for differentiation, left out of every plan (their sample dim cannot be known)
    dead: frozenset = frozenset()
    # a chunk (size < total) whose nodes' factors are built from the chunk's slices of what torch saved
    # (:func:`cut`) where they can be; otherwise every chunk reads its samples of all samples' factors
    sliced: bool = False

    def chunk(self, size: int, sliced: bool = False) -> "Batching":
        return replace(self, size=size, sliced=sliced and size < self.total)

    def numel(self, graph: Graph, i: int) -> int:
        """Entries of value ``i`` per sample (all of them for a shared value)."""
        n = graph.values[i].numel
        return n // self.total if self.at[i] is not None else n

    def dim(self, graph: Graph, i: int):
        """Value ``i``'s sample dim, or ``None`` (shared, or a digit inside a dim)."""
        if self.at[i] is None:
            return None
        acc = 1
        for d, n in enumerate(graph.values[i].shape):
            if acc == self.at[i] and n == self.total:
                return d
            acc *= n
        return None

    def shape(self, graph: Graph, i: int) -> tuple:
        """Value ``i``'s shape per sample: its sample dim left out (flattened if it is a digit inside a dim)."""
        shape = graph.values[i].shape
        if self.at[i] is None:
            return shape
        d = self.dim(graph, i)
        return shape[:d] + shape[d + 1:] if d is not None else (self.numel(graph, i),)

    def describe(self, graph: Graph, i: int) -> str:
        if self.at[i] is None:
            return "shared"
        d = self.dim(graph, i)
        return f"sample dim {d}" if d is not None else f"sample digit after {self.at[i]} entries"


def split_port(factor: Factor, port: tuple, pre: int, size: int, where: str):
    """``(factor', label)``: the factor with one label for the sample digit on ``port``, and that label.

    ``port`` is ``("out",)`` or ``("ins", t)``; the digit has ``size``
    values after ``pre`` entries (see :class:`Batching`). A label of the port
    that covers it together with neighbouring dims is split into pieces (a
    reshape of every operand that carries it).
    """
    for boundary in (pre, pre * size):
        factor = split_at(factor, port, boundary, where)
    labels = port_labels(factor, port)
    if size == 1:  # a chunk of one sample: a label of size one where the sample dim is
        acc = 1
        for label in labels:
            if acc == pre and factor.sizes[label] == 1:
                return factor, label
            acc *= factor.sizes[label]
        raise BatchMixingError(f"{where}: no label of size one for the sample of a one-sample chunk")
    acc, inside = 1, []
    for label in labels:
        if pre <= acc and acc * factor.sizes[label] <= pre * size and factor.sizes[label] > 1:
            inside.append(label)
        acc *= factor.sizes[label]
    if len(inside) > 1:  # the samples laid out over several dims (a grid of points): one label for them
        factor = join(factor, tuple(inside), where)
        return factor, len(factor.sizes) - 1
    if len(inside) != 1:
        raise BatchMixingError(f"{where}: the sample dim does not line up with the dims of this node")
    return factor, inside[0]


def operand_views(factor: Factor, adopted: list, label) -> list:
    """Per operand of ``factor`` (adopted into a term as ``adopted``): its shape, and the axes holding ``label``."""
    return [(tuple(t.shape), tuple(a for a, lb in enumerate(labels) if lb == label))
            for (t, _), (_, labels) in zip(factor.operands, adopted)]


def position(labels: tuple, sizes: tuple, label: int) -> int:
    """The product of the sizes before ``label`` on a port: where its digit sits."""
    pre = 1
    for lb in labels:
        if lb == label:
            break
        pre *= sizes[lb]
    return pre


UNSET = object()


def analyze(graph: Graph, rules: dict, source_dim: int) -> Batching:
    """The sample dim of every value, from the first-order factors, from the source down.

    Raises:
        BatchMixingError: a node couples samples, naming it and where it sits.
    """
    total = graph.source_shape[source_dim]
    dims = [UNSET] * len(graph.values)
    seen_by: list = [None] * len(graph.values)
    dims[0] = math.prod(graph.source_shape[:source_dim])
    seen_by[0] = "the source"
    for y in graph.order:
        v = graph.values[y]
        if v.leaf is not None or dims[y] is UNSET:
            continue
        rule = graph.rule(y, rules)
        ctx = graph.ctx(y, planning=True)
        here = f"{v.title} at {v.where(graph)}"
        # a large node is asked on stand-ins of a few samples, its inputs' sample dims guessed from their
        # shapes; where the factor says otherwise, it is asked again on all samples
        stand_in = None if dims[y] is None else standin(graph, y, rule, total, dims)
        for t, x in enumerate(v.inputs):
            if x is None:
                continue
            f = e = UNSET
            if stand_in is not None:
                ok, g = stand_in((t,))
                try:
                    if ok and g is None:
                        f = None
                    elif ok and _tie(g, t, graph, x, v, dims[y], total, here) == stand_in.expected(t):
                        f, e = g, stand_in.expected(t)
                except BatchMixingError:  # perhaps only on stand-ins: asked again on all samples
                    pass
            if f is UNSET:
                f = rule(ctx, (t,))
                e = None if f is None else _tie(f, t, graph, x, v, dims[y], total, here)
            if f is None:
                continue
            _merge(graph, dims, seen_by, x, e, here)
    dead = frozenset(i for i, d in enumerate(dims) if d is UNSET and graph.values[i].leaf is None)
    return Batching(source_dim, total, tuple(None if d is UNSET else d for d in dims), total, dead)


def _tie(f: Factor, t: int, graph: Graph, x: int, v, pre, total: int, here: str):
    """Where input ``t`` (value ``x``) of ``v`` carries the samples by its first-order factor ``f``: ``None``
    for shared; ``pre``, the output's sample digit, ``None`` for a shared output."""
    if pre is None:
        return None
    f, p = split_port(f, ("out",), pre, total, here)
    if p in f.ins[0]:
        return position(f.ins[0], f.sizes, p)
    _check_untied(f, p, graph.values[x], v, pre, total, here, t)
    return None


def _check_untied(f: Factor, p: int, x, y, pre: int, total: int, here: str, t: int) -> None:
    """An input the sample label does not reach is shared, unless it is shaped like the output and
    the factor links the entries in its sample place to the output's sample label (softmax over the batch)."""
    if x.numel != y.numel:
        return
    try:
        _, q = split_port(f, ("ins", 0), pre, total, here)
    except BatchMixingError:
        return
    # Coupling: one operand holds the output's sample label, the input's entries in the same place and
    # a label the two ports share (softmax's features, batch norm's channels, attention's heads). A
    # shared weight that happens to have B rows (x @ W, W of shape (B, O)) is linked to p only through
    # the other input's saved value, which carries none of the output's other labels.
    tied = (set(f.out) & set(f.ins[0])) - {p, q}
    for _, labels in f.operands:
        if p in labels and q in labels and tied & set(labels):
            raise BatchMixingError(
                f"{here} couples samples: output sample b depends on other samples' entries of its input {t} "
                f"(shape {list(x.shape)}): a softmax, normalization or attention over the batch; "
                "per-sample derivatives need each sample computed from its own entries"
            )


def _merge(graph, dims, seen_by, x, e, here) -> None:
    if dims[x] is UNSET:
        dims[x], seen_by[x] = e, here
        return
    if dims[x] == e:
        return
    xv = graph.values[x]
    what = "a leaf" if xv.leaf is not None else f"the output of {xv.title}"

    def how(d):
        return "as one value shared by all samples" if d is None else "per sample"

    why = ("a node couples samples (a sum, mean or max over the batch, x - x.mean(0), a value computed from "
           "all samples)")
    if "(fallback" in f"{seen_by[x]} {here}":
        why = ("a node xa differentiates through the generic fallback has one dense factor over all samples, "
               "so per-sample derivatives cannot pass through it; without batch_dim= (or with a rule of its own, "
               "xa.extend.register) it works")
    raise BatchMixingError(
        f"{what} of shape {list(xv.shape)} reaches the source {how(dims[x])} through {seen_by[x]}, and "
        f"{how(e)} through {here}: {why}"
    )


def cut(graph: Graph, batch: Batching, y: int, rule) -> Cut | None:
    """How node ``y`` is seen on a chunk of ``batch.size`` samples, or ``None`` where that cannot be known.

    Its factors can then be built by its rule from the chunk's slices of what torch saved, instead of
    from all samples' and narrowed. Each saved tensor is located in the graph (:meth:`Graph.provenance`)
    and sliced along that value's sample dim; one that is no value of the graph (a constant, an index
    tensor) could carry the sample or not, so the node is not cut. Neither is one whose samples are a digit
    inside a dim, nor a custom Function (its rule may read tensors off its ctx), nor a generic fallback.
    """
    if not _cuttable(graph.values[y], rule):
        return None
    try:
        out, ins, saved = _layout(graph, y, batch.total, batch.at, False, batch.dead)
    except LookupError:
        return None
    return Cut(out, ins, saved, batch.size)


def _cuttable(v, rule) -> bool:
    """Whether a node's rule can be asked on a chunk of samples: not a leaf, not a custom Function (its rule
    may read tensors off its ctx), not the generic fallback (it reads the leaves)."""
    return (v.leaf is None and not v.attrs and "tensors" not in v.saved
            and getattr(rule, "fallback", None) is None)


def _dim_at(shape: tuple, pre: int, total: int):
    """The dim of ``shape`` that holds ``total`` samples after ``pre`` entries, or ``None`` (a digit inside one)."""
    acc = 1
    for d, n in enumerate(shape):
        if acc == pre and n == total:
            return d
        acc *= n
    return None


def _layout(graph: Graph, y: int, total: int, known, guess: bool, dead=frozenset()) -> tuple:
    """``(out, ins, saved)``: the sample dim of node ``y``'s output, of each input slot and of each saved tensor.

    ``known[j]`` is value ``j``'s sample digit (:class:`Batching`'s ``at``; ``UNSET`` while analysing).
    A value not known, or a saved tensor that is no value of the graph, is placed by its shape where
    ``guess``: its one dim of ``total`` entries, or none (planning stand-ins, checked after); otherwise,
    and where a shape has several such dims, ``LookupError``.
    """
    v = graph.values[y]
    provenance = graph.provenance()[y]

    def by_shape(shape):
        if not guess:
            raise LookupError("not known")
        found = [d for d, n in enumerate(shape) if n == total]
        if len(found) > 1:
            raise LookupError("several dims of the samples' size")
        return found[0] if found else None

    def of_value(j):
        pre = known[j]
        if pre is UNSET or j in dead:
            if guess:
                return by_shape(graph.values[j].shape)
            # not planned (a permutation folded into its consumer): whole if every input of it is shared
            through = graph.values[j].inputs
            if j in dead and through and all(i is not None and i not in dead and known[i] is None for i in through):
                return None
            raise LookupError("not planned")
        if pre is None:
            return None
        d = _dim_at(graph.values[j].shape, pre, total)
        if d is None:
            raise LookupError("a digit inside a dim")
        return d

    def of_saved(t, j):
        if not hasattr(t, "dim"):  # a number, a flag, None
            return None
        if j is None:  # no value of the graph: a constant, an index tensor
            return None if t.dim() == 0 else by_shape(tuple(t.shape))
        return of_value(j)

    out = of_value(y)
    if out is None:
        raise LookupError("a shared output")
    folds = getattr(graph, "folds", {}).get(y, {})
    ins = []
    for slot, x in enumerate(v.inputs):
        d = None if x is None else of_value(x)
        if d is not None and slot in folds:  # (a folded slot sees the permutation of x, not x)
            raise LookupError("a folded slot")
        ins.append(d)
    saved = {}
    for name, item in v.saved.items():
        where = provenance.get(name)
        if isinstance(item, tuple):
            dims = tuple(of_saved(t, j) for t, j in zip(item, where or (None,) * len(item)))
            if any(d is not None for d in dims):
                saved[name] = dims
        else:
            d = of_saved(item, where)
            if d is not None:
                saved[name] = d
    return out, tuple(ins), saved


# Planning on stand-ins: a node whose tensors hold all samples' entries is asked, while planning, on
# zeros of a few samples (two counts, so that a structure that depends on the count is caught), and its
# factor's labels that hold the samples are scaled to all of them (operands as meta tensors: only their
# shapes are planned on). Planning a large batch then allocates next to nothing; the factors are
# built for all samples only at execution, where the plan's structure is checked as always.
STANDINS = (5, 7)
STANDIN_BYTES = 2**20  # a node whose output and saved tensors are all smaller is planned on all samples


def standin(graph: Graph, y: int, rule, total: int, known, dead=frozenset()):
    """A :class:`StandIn` for node ``y``, or ``None`` (small, or where its samples are cannot be told)."""
    v = graph.values[y]
    if total <= STANDINS[-1] or not _cuttable(v, rule):
        return None
    largest = max([v.numel * graph.dtype.itemsize] + [t.numel() * t.element_size() for item in v.saved.values()
                                          for t in (item if isinstance(item, tuple) else (item,))
                                          if isinstance(t, torch.Tensor)])
    if largest < STANDIN_BYTES:
        return None
    try:
        out, ins, saved = _layout(graph, y, total, known, True, dead)
    except LookupError:
        return None
    return StandIn(graph, y, rule, total, out, ins, saved)


class StandIn:
    """A node's factors for all samples, planned from its rule asked on a few samples (see ``STANDINS``).

    ``stand_in(slots)`` is ``(True, factor or None)``, the factor at the scale of all samples with meta
    operands, or ``(False, None)`` where the stand-ins disagree or anything fails: then plan on all samples.
    """

    def __init__(self, graph: Graph, y: int, rule, total: int, out: int, ins: tuple, saved: dict):
        self.rule, self.total, self.ins = rule, total, ins
        self.full = graph.ctx(y, planning=True)  # (its shapes only)
        self.ctxs = [graph.ctx(y, planning=True, cut=Cut(out, ins, saved, c)) for c in STANDINS]
        self.out_pre = math.prod(self.full.out_shape[:out])
        self.in_pre = tuple(None if d is None else math.prod(self.full.in_shapes[s][:d]) for s, d in enumerate(ins))

    def expected(self, slot: int):
        """Where input ``slot`` carries the samples as the stand-ins were cut (``None``: whole)."""
        return self.in_pre[slot]

    def __call__(self, slots: tuple) -> tuple:
        try:
            made, numels = [], []
            for c, ctx in zip(STANDINS, self.ctxs):
                g = self.rule(ctx, slots)
                made.append(None if g is None else self._scaled(g, c, slots))
                numels.append(0 if g is None else sum(t.numel() for t, _ in g.operands))
            if made[0] is None or made[1] is None:
                return (made[0] is None and made[1] is None), None
            f, f2 = made
            if (f.out, f.ins, f.sizes, [lb for _, lb in f.operands]) != (f2.out, f2.ins, f2.sizes,
                                                                         [lb for _, lb in f2.operands]):
                return False, None
            numel = lambda labels: math.prod(f.sizes[i] for i in labels)  # noqa: E731
            if numel(f.out) != math.prod(self.full.out_shape) or any(
                    numel(port) != math.prod(self.full.in_shapes[s]) for port, s in zip(f.ins, slots)):
                return False, None
            # the rules' workspace for all samples: on a line through the two counts, or grown as the
            # operands grew (a dense derivative over the samples' entries grows faster), whichever is more
            (c1, c2), (w1, w2) = STANDINS, (f.workspace, f2.workspace)
            line = -(-(w1 * (c2 - self.total) + w2 * (self.total - c1)) // (c2 - c1))
            grown = -(-w2 * sum(t.numel() for t, _ in f.operands) // max(numels[1], 1))
            return True, replace(f, workspace=int(max(w1, w2, line, grown)))
        except Exception:  # noqa: BLE001 -- any failure here means: plan this factor on all samples
            return False, None

    def _scaled(self, g: Factor, c: int, slots: tuple) -> Factor:
        """``g`` (on ``c`` samples) with the labels that hold the samples grown to all of them."""
        ports = [(g.out, self.out_pre)] + [(port, self.in_pre[s]) for port, s in zip(g.ins, slots)
                                           if self.in_pre[s] is not None]
        grown: dict = {}
        for labels, pre in ports:
            acc = 1
            for lb in labels:
                n = g.sizes[lb]
                if acc <= pre and pre * c <= acc * n:  # this label holds the samples' digit
                    if pre % acc or (acc * n) % (pre * c) or grown.setdefault(lb, n // c * self.total) != \
                            n // c * self.total:
                        raise ValueError("the samples straddle labels")
                    break
                acc *= n
            else:
                raise ValueError("no label holds the samples")
        for t, labels in g.operands:
            if tuple(t.shape) != tuple(g.sizes[i] for i in labels):
                raise ValueError("an operand does not match its labels")
        sizes = tuple(grown.get(i, n) for i, n in enumerate(g.sizes))
        operands = tuple((torch.empty([sizes[i] for i in labels], dtype=t.dtype, device="meta"), labels)
                         for t, labels in g.operands)
        return replace(g, sizes=sizes, operands=operands)


class BatchFactors:
    """A node's factors with the sample label found on every port, for building terms.

    ``get(slots)`` returns ``(factor, y_label, in_labels)``: the factor with
    its labels split so that the sample dim of each batched port is one
    label, the output's sample label (``None`` for a shared output) and,
    per input port, the sample label if that input is batched.

    In a sliced chunk (``batch.sliced``) of a node that can be :func:`cut`, the rule is
    asked on the chunk's slices first (``factors.slicer``); slots where that fails in any way
    (a rule that reads something else, a label of the sample it merges) take all samples' factors.
    """

    def __init__(self, graph: Graph, batch: Batching, y: int, inputs: tuple, factors):
        self.graph, self.batch, self.y, self.inputs, self.factors = graph, batch, y, inputs, factors
        self.cache: dict = {}
        if batch.sliced:
            c = cut(graph, batch, y, factors.rule)
            if c is not None:
                self.ctx = graph.ctx(y, planning=True, cut=c)
                factors.cut, factors.slicer = c, self._slice
        self.stand_in = None if batch.at[y] is None else standin(graph, y, factors.rule, batch.total, batch.at,
                                                                  batch.dead)
        if self.stand_in is not None:
            factors.scaler = self._scale

    def _scale(self, slots) -> tuple:
        """``(True, factor)`` for all samples planned on stand-ins (split and checked), or ``(False, None)``."""
        ok, f = self.stand_in(slots)
        if ok and f is not None:
            try:
                self.cache[slots] = self._split(f, slots, self.batch.total)
            except Exception:  # noqa: BLE001 -- it does not keep the samples where the analysis found them
                return False, None
        return ok, f

    def _slice(self, slots) -> tuple:
        """``(True, factor)`` built from the chunk's slices (split and checked), or ``(False, None)``."""
        try:
            f = self.factors.rule(self.ctx, slots)
            if f is not None:
                _check_chunk(f, self.ctx, slots)
                self.cache[slots] = self._split(f, slots, self.batch.size)
        except Exception:  # noqa: BLE001 -- any failure here means: build this factor from all samples instead
            return False, None
        return True, f

    def get(self, slots):
        hit = self.cache.get(slots)
        if hit is not None:
            return hit
        f = self.factors(slots)
        hit = self.cache.get(slots)  # built from the chunk's slices
        if hit is None:
            hit = self.cache[slots] = self._split(f, slots, self.batch.total)
        return hit

    def _split(self, f, slots, total):
        graph, batch, y = self.graph, self.batch, self.y
        v = graph.values[y]
        here = f"{v.title} at {v.where(graph)}"
        p = None
        if batch.at[y] is not None:
            f, p = split_port(f, ("out",), batch.at[y], total, here)
        ins = []
        for pos, s in enumerate(slots):
            e = batch.at[self.inputs[s]]
            if e is None:
                if p is not None and p in f.ins[pos]:
                    raise BatchMixingError(f"{here}: its derivative of order {len(slots)} ties the sample dim to "
                                           f"input {s}, which its first derivative leaves shared")
                ins.append(None)
                continue
            if p is None or p not in f.ins[pos] or position(f.ins[pos], f.sizes, p) != e:
                raise BatchMixingError(f"{here}: its derivative of order {len(slots)} does not keep the sample "
                                       f"dim of input {s} tied to its output's (it couples samples)")
            ins.append(p)
        return f, p, tuple(ins)


def _check_chunk(f: Factor, ctx, slots: tuple) -> None:
    """A factor built on a chunk's slices covers the chunk's shapes, each operand labelled by its sizes."""
    def numel(labels):
        return math.prod(f.sizes[i] for i in labels)

    if len(f.ins) != len(slots) or numel(f.out) != math.prod(ctx.out_shape):
        raise BatchMixingError("the output port does not cover the chunk")
    for port, s in zip(f.ins, slots):
        if ctx.in_shapes[s] is None or numel(port) != math.prod(ctx.in_shapes[s]):
            raise BatchMixingError("an input port does not cover the chunk")
    for tensor, labels in f.operands:
        if tuple(tensor.shape) != tuple(f.sizes[i] for i in labels):
            raise BatchMixingError("an operand does not match its labels")

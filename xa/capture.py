"""Capture: read torch's autograd graph once, without changing it.

The walk starts at ``source.grad_fn`` and records, per value (a node's
output), the node's name, its output shape, which values feed each of its
input slots (``None`` for inputs that do not require grad), and every
attribute torch saved on it (``_saved_self``, ``_saved_result``, ``dim``,
...). Leaves are ``AccumulateGrad`` nodes. Reading a saved tensor is also
where torch tells us that the graph was freed or modified in place, so
those errors surface here, before anything is planned or computed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import GraphFreedError, GraphModifiedError, SourceError, UnsupportedOperatorError
from .registry import supported

LEAF = "torch::autograd::AccumulateGrad"
NOT_IMPLEMENTED = "torch::autograd::NotImplemented"  # what torch records for an op it cannot differentiate


@dataclass
class Value:
    """One tensor of the graph: the output of a node, or a leaf."""

    index: int
    fn: Any
    name: str
    shape: tuple
    inputs: tuple = ()
    saved: dict = field(default_factory=dict)
    leaf: Optional[torch.Tensor] = None
    parent: Optional[int] = None
    # Which output of a node with several (split, unbind): each used output is
    # a value of its own, a function of the node's inputs processed like any other.
    output: int = 0
    # A torch.autograd.Function's own ctx attributes (ctx.p = ...), which its rule may read.
    attrs: dict = field(default_factory=dict)
    # A piece of a composite node (xa.composite): what it is, for messages ("SoftmaxBackward0 (exp)").
    label: str = ""

    @property
    def title(self) -> str:
        """The node's name as messages show it: a composite's piece says whose and what it is."""
        return self.label or self.name

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def where(self, graph: "Graph") -> str:
        """The chain of nodes from the source down to this one."""
        chain, v = [], self
        while v is not None:
            chain.append(f"{v.title}{list(v.shape)}")
            v = graph.values[v.parent] if v.parent is not None else None
        return " <- ".join(reversed(chain))


class NodeCtx:
    """What a rule sees of one node: shapes, saved attributes, dtype, device.

    While planning (``ctx.planning``), saved tensors are zeros of the saved
    shape and dtype on the CPU, so a plan can depend on shapes alone, and
    ``device`` is the CPU; a rule computes with them as with the real ones
    and never branches on their values. A rule whose operand is costly to
    build (a dense fused derivative) returns a ``meta`` tensor of its shape
    instead while planning. While executing, they are the tensors torch saved.
    """

    def __init__(self, value: Value, graph: "Graph", planning: bool, cut: Optional["Cut"] = None, first: int = 0,
                 slices=None):
        self.name = value.name
        self.planning = planning
        self._device = graph.device
        self.out_shape = value.shape
        self.in_shapes = tuple(None if i is None else graph.values[i].shape for i in value.inputs)
        # a chunk of samples (xa.batch.cut): the output, the inputs and the saved tensors that carry the
        # sample are seen narrowed to samples first .. first + count - 1 along their sample dims
        self._cut, self._first, self._slices = cut, first, slices
        if cut is not None:
            self.out_shape = _narrowed(self.out_shape, cut.out, cut.count)
            self.in_shapes = tuple(None if s is None else _narrowed(s, d, cut.count)
                                   for s, d in zip(self.in_shapes, cut.ins))
        self.dtype = graph.dtype
        self.device = torch.device("cpu") if planning else graph.device
        self._saved = value.saved
        self.node = value.fn  # torch's node itself: a custom Function's ctx attributes live here
        # the leaf tensor feeding each input slot, or None (the generic fallback reads a leaf's point there)
        self.leaves = tuple(None if i is None else graph.values[i].leaf for i in value.inputs)
        self.output = value.output  # which of the node's outputs this value is
        self._memo: dict = {}
        self.outs = None  # where ctx.out finds memory: set by xa.execute for a run with an arena

    def saved(self, name: str) -> Any:
        """The saved attribute ``_saved_<name>`` (tensor, number, tuple or None).

        For a ``torch.autograd.Function``, ``saved("tensors")`` is what its
        forward passed to ``ctx.save_for_backward``.
        """
        value = self._saved[name]
        dims = None if self._cut is None else self._cut.saved.get(name)
        if isinstance(value, tuple):
            return tuple(self._take(v, None if dims is None else dims[k]) for k, v in enumerate(value))
        return self._take(value, dims)

    def _take(self, value, dim=None):
        if not isinstance(value, torch.Tensor):
            return value
        if self.planning:
            shape = value.shape if dim is None else _narrowed(value.shape, dim, self._cut.count)
            return torch.zeros(shape, dtype=value.dtype)
        if dim is not None:  # this chunk's samples: a view, so that a recorded run differentiates the saved tensor
            if self._slices is not None:
                value = self._slices(value, dim, self._first, self._cut.count)
            else:
                value = value.narrow(dim, self._first, self._cut.count)
        # torch saves a Python number operand (2 * x on a GPU) as a 0-d CPU tensor
        value = value if value.device == self._device else value.to(self._device)
        if value.dim() == 0 and not value.requires_grad:
            # a Python number is saved as a "wrapped number" tensor, which does not take part in type
            # promotion: b ** -1 of one would be float32 (x / math.sqrt(6) off by 1e-8 in float64)
            value = value.clone()
        return value

    def memo(self, key, build) -> Any:
        """``build()``, computed once per node and call and shared by the rule's calls for each slot tuple
        (a value several orders are written in: SiLU's sigmoid). ``key`` names it within the node."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def out(self, key, shape, dtype=None) -> torch.Tensor | None:
        """Memory for the rule to write a factor into (``out=``), or None: let torch allocate it.

        While a cached plan runs without autograd, the plan's own memory for this node and ``key`` (hashable:
        the order, a name), the same at every call, so a warm call makes no large factor anew; while
        planning, where autograd records, and for a factor under 128 kB, None.
        """
        if self.outs is None:
            return None
        return self.outs(key, tuple(shape), self.dtype if dtype is None else dtype)

    def has(self, name: str) -> bool:
        return self._saved.get(name) is not None


@dataclass
class Cut:
    """A node seen on a chunk of ``count`` samples (:func:`xa.batch.cut`): the sample dim of its output,
    of each input slot and of each saved tensor (``{name: dim}``, a tuple of dims for a tuple), ``None`` for
    one that is whole (shared by the samples, or a number)."""

    out: int
    ins: tuple
    saved: dict
    count: int


def _narrowed(shape: tuple, dim: Optional[int], count: int) -> tuple:
    return tuple(shape) if dim is None else tuple(shape[:dim]) + (count,) + tuple(shape[dim + 1:])


_SAVED_NAMES: dict = {}  # node class -> its _saved_* attribute names (fixed per class; dir() is slow)


def _saved_names(fn) -> tuple:
    kind = type(fn)
    names = _SAVED_NAMES.get(kind)
    if names is None:
        names = _SAVED_NAMES[kind] = tuple(a for a in dir(fn) if a.startswith("_saved_"))
    return names


def _read_saved(fn, where) -> dict:
    """Every ``_saved_*`` attribute of ``fn``; ``where()`` names its place for error messages."""
    saved = {}
    for attr in _saved_names(fn):
        try:
            item = getattr(fn, attr)
        except RuntimeError as err:
            msg = str(err)
            if "second time" in msg or "freed" in msg:
                raise GraphFreedError(
                    f"the saved tensors of {fn.name()} ({where()}) were freed by an earlier "
                    "backward(); run the forward pass again, or call .backward(retain_graph=True) "
                    "before xa.backward"
                ) from None
            if "inplace" in msg:
                raise GraphModifiedError(
                    f"a tensor saved by {fn.name()} ({where()}) was modified in place after the "
                    f"forward pass: {msg.splitlines()[0]}"
                ) from None
            raise
        if isinstance(item, list):
            item = tuple(item)
        saved[attr[len("_saved_"):]] = item
    if is_custom(fn):
        # a torch.autograd.Function: what its forward passed to ctx.save_for_backward
        try:
            saved["tensors"] = tuple(fn.saved_tensors)
        except RuntimeError as err:
            raise GraphFreedError(f"the saved tensors of {fn.name()} ({where()}) are gone: {err}") from None
    return saved


def is_custom(fn) -> bool:
    """A node of a ``torch.autograd.Function``."""
    return hasattr(fn, "saved_tensors") and hasattr(fn, "_raw_saved_tensors")


def _signature_of(item):
    """What a plan may assume about one saved item: a tensor's shape and dtype, a number's value."""
    if isinstance(item, torch.Tensor):
        return ("tensor", tuple(item.shape), item.dtype)
    if isinstance(item, (tuple, list)):
        return tuple(_signature_of(x) for x in item)
    if isinstance(item, dict):
        return tuple(sorted((str(k), _signature_of(x)) for k, x in item.items()))
    try:
        hash(item)
    except TypeError:
        return ("object", type(item).__qualname__)
    return item


class Graph:
    """The captured graph of ``source``: values in capture order, index 0 the source."""

    def __init__(self, source: torch.Tensor):
        if not isinstance(source, torch.Tensor):
            raise TypeError(f"source must be a torch.Tensor, got {type(source).__name__}")
        if source.grad_fn is None:
            why = "a leaf" if source.requires_grad else "a tensor that does not require grad"
            raise SourceError(
                f"source has no grad_fn: it is {why}; xa.backward needs the result of a computation "
                "on tensors with requires_grad=True"
            )
        self.source_shape = tuple(source.shape)
        self.dtype = source.dtype
        self.device = source.device
        self.values: list[Value] = []
        index: dict[tuple, int] = {}

        def visit(fn, output_nr: int, parent: Optional[int]) -> int:
            key = (fn, output_nr)
            if key in index:
                return index[key]
            name = fn.name()
            if name == LEAF:
                shape, dtype = tuple(fn.variable.shape), fn.variable.dtype
            else:
                meta = fn._input_metadata[output_nr]
                shape, dtype = tuple(meta.shape), meta.dtype
            v = Value(len(self.values), fn, name, shape, parent=parent, output=output_nr)
            if name == LEAF:
                v.leaf = fn.variable
            if dtype.is_complex:  # the rules are real: refused before anything is planned
                self.values.append(v)
                raise UnsupportedOperatorError(
                    f"{name} gives a complex tensor ({dtype}, at {v.where(self)}): xa takes derivatives of real "
                    "tensors only; work with real and imaginary parts (torch.view_as_real) or a real formula")
            index[key] = v.index
            self.values.append(v)
            return v.index

        visit(source.grad_fn, source.output_nr, None)
        # Iterative walk: each value's inputs are visited once, in slot order.
        todo = [0]
        while todo:
            v = self.values[todo.pop()]
            if v.leaf is not None:
                continue
            v.saved = _read_saved(v.fn, lambda v=v: v.where(self))
            if is_custom(v.fn):
                v.attrs = dict(vars(v.fn))
            inputs = []
            for fn, output_nr in v.fn.next_functions:
                if fn is None:
                    inputs.append(None)
                    continue
                known = (fn, output_nr) in index
                i = visit(fn, output_nr, v.index)
                inputs.append(i)
                if not known:
                    todo.append(i)
            v.inputs = tuple(inputs)
        self.order = self._reverse_topological()

    def _reverse_topological(self) -> list[int]:
        """Value indices with every consumer before the values it reads."""
        post, seen = [], set()
        stack = [(0, False)]
        while stack:
            i, done = stack.pop()
            if done:
                post.append(i)
                continue
            if i in seen:
                continue
            seen.add(i)
            stack.append((i, True))
            for j in self.values[i].inputs:
                if j is not None and j not in seen:
                    stack.append((j, False))
        return post[::-1]

    @property
    def leaves(self) -> list[Value]:
        return [v for v in self.values if v.leaf is not None]

    def find(self, tensor: torch.Tensor) -> Optional[int]:
        """The index of ``tensor`` in the graph (a leaf or a node's output), if it is there."""
        for v in self.values:
            if v.leaf is not None:
                if v.leaf is tensor:
                    return v.index
            elif v.fn is not None and tensor.grad_fn is v.fn and tensor.output_nr == v.output:
                return v.index
        return None

    def rule(self, i: int, rules: dict):
        """The rule that describes value ``i``; a typed error where there is none."""
        v = self.values[i]
        rule = rules.get(v.name)
        if v.name == NOT_IMPLEMENTED:
            raise UnsupportedOperatorError(
                f"torch recorded no derivative for the operation at {v.where(self)} (output shape {list(v.shape)}): "
                f"torch {torch.__version__} cannot differentiate it either, so its own .backward() fails there too "
                "(narrow_copy on torch 2.11 is one such; x.narrow(...) is differentiable)"
            )
        if rule is None:
            names = supported()
            close = difflib.get_close_matches(v.name, names, n=3, cutoff=0.6)
            hint = f" Closest supported: {', '.join(close)}." if close else ""
            raise UnsupportedOperatorError(
                f"no rule for torch node {v.name} (output shape {list(v.shape)}), reached as "
                f"{v.where(self)}.{hint} xa.supported() lists the {len(names)} supported nodes; "
                "xa.extend.register adds a rule of your own"
            )
        if v.output != 0 and not getattr(rule, "multi_output", False):
            raise UnsupportedOperatorError(
                f"{v.name} at {v.where(self)} is read through its output {v.output}, and its rule only "
                "describes output 0 (a rule for several outputs sets rule.multi_output = True and reads ctx.output)"
            )
        return rule

    def forget_signature(self) -> None:
        """Drop what was read off the values once: they were changed (composites expanded, labels)."""
        self.__dict__.pop("_signature", None)
        self.__dict__.pop("_provenance", None)

    def ctx(self, i: int, planning: bool, cut: Optional[Cut] = None, first: int = 0, slices=None) -> NodeCtx:
        """What value ``i``'s rule sees; with ``cut``, ``cut.count`` samples from ``first`` (:func:`xa.batch.cut`),
        taken by ``slices(tensor, dim, first, count)`` where given (:class:`xa.execute.Slices`), else narrowed."""
        return NodeCtx(self.values[i], self, planning, cut, first, slices)

    def provenance(self) -> list:
        """Per value, which value of the graph each saved tensor is: ``{name: index}``, a tuple for a tuple.

        ``None`` for one that is not a value of the graph (a constant, an integer index, a tensor a
        composite computed) or whose shape is not the value's. Found by the tensor's node and output
        (an unpacked saved tensor carries its ``grad_fn``) or, for a leaf, by identity.
        """
        cached = self.__dict__.get("_provenance")
        if cached is not None:
            return cached
        by_node, by_leaf = {}, {}
        for v in self.values:
            if v.leaf is not None:
                by_leaf[id(v.leaf)] = v.index
            elif v.fn is not None:
                by_node.setdefault((v.fn, v.output), v.index)

        def source(t):
            if not isinstance(t, torch.Tensor):
                return None
            if t.grad_fn is not None:
                i = by_node.get((t.grad_fn, t.output_nr))
            else:
                i = by_leaf.get(id(t))
                i = i if i is not None and self.values[i].leaf is t else None
            return i if i is not None and tuple(t.shape) == self.values[i].shape else None

        self._provenance = [
            {name: tuple(source(t) for t in item) if isinstance(item, tuple) else source(item)
             for name, item in v.saved.items()}
            for v in self.values
        ]
        return self._provenance

    def signature(self) -> tuple:
        """Everything a plan depends on from the graph: names, shapes, wiring, saved shapes and numbers.

        A custom Function's ctx attributes are in it too: its rule may read them. Computed once:
        the graph is a snapshot taken at capture.
        """
        cached = self.__dict__.get("_signature")
        if cached is not None:
            return cached
        self._signature = (
            self.dtype,
            str(self.device),
            tuple(
                (v.name, v.output, v.shape, v.inputs, v.leaf is not None,
                 tuple(sorted((k, _signature_of(x)) for k, x in v.saved.items())),
                 _signature_of(v.attrs) if v.attrs else (), v.label)
                for v in self.values
            ),
        )
        return self._signature

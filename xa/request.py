"""The request: one call's question, built once by the public function and handed down.

A :class:`Request` says what is asked (the order, the values whose partials
are wanted, a query's structure, mixed blocks), of which graph (captured once,
its rules resolved once) and how (direction, sample dim, budget, whether the
results are recorded for a gradient). It is immutable; everything a plan is
built from is in its comparison, so the request is the plan cache's key
(:mod:`xa.plan`), and the chunks of a budgeted run are the same request with
``rows`` or ``samples`` set. What only executes (the graph's tensors, the
budget, the caller's name for messages) is carried beside it, out of the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from . import checks, sparsity
from .capture import Graph
from .errors import TargetError
from .jets import Ask
from .queries import Mixed, Pure, Query
from .resolve import resolve


@dataclass(frozen=True)
class Request:
    """What one call asks of one captured graph.

    Compared (the plan's key): ``signature`` (the graph's, after rule resolution),
    ``rule_key`` (the rule objects by node name), ``order``, ``requested`` (values
    whose pure partials are wanted), ``retained`` (intermediate values whose
    partials are kept), ``direction``, ``batch_dim`` (the sample dim planned with:
    ``None`` for one sample, which is planned as no batch), ``query`` (an
    :class:`~xa.jets.Ask`), ``mixed`` (joint blocks: sorted value indices), ``diagonal`` (leaves whose
    positions in every backward block are tied: only the diagonal ``d^k S / dL_i^k`` is kept, :mod:`xa.diag`),
    ``rows`` / ``samples`` (a chunk of source rows or of samples), ``sliced`` (the chunk's factors
    built from its slices of what torch saved, :func:`xa.batch.cut`) with ``provenance`` (which value
    of the graph each saved tensor is, which decides how a node is cut), ``sparse`` (forward jets may keep
    a leaf's items apart, :mod:`xa.sparsity`; ``xa.sparsity.ENABLED`` when the request is made).

    Carried, not compared: ``graph``, ``rules``, ``caller`` (``"xa.laplacian"``, for
    messages), ``max_memory`` (the user's budget, ``None`` for the default),
    ``record`` (whether autograd records the run), ``sample_dim`` (the user's
    ``batch_dim``, for the layout of the results).
    """

    signature: tuple
    rule_key: tuple
    order: int
    requested: tuple
    retained: tuple = ()
    direction: str = "auto"
    batch_dim: Optional[int] = None
    query: Optional[Ask] = None
    mixed: tuple = ()
    diagonal: tuple = ()
    rows: Optional[int] = None
    samples: Optional[int] = None
    sliced: bool = False
    provenance: tuple = ()
    sparse: bool = True
    graph: Graph = field(default=None, compare=False, repr=False)
    rules: dict = field(default_factory=dict, compare=False, repr=False)
    caller: str = field(default="xa.backward", compare=False)
    max_memory: Optional[float] = field(default=None, compare=False)
    record: bool = field(default=False, compare=False)
    sample_dim: Optional[int] = field(default=None, compare=False)

    def replace(self, **changes) -> "Request":
        """The same request with some fields changed (a chunk, the other direction)."""
        return dataclasses.replace(self, **changes)

    def sliced_chunk(self, samples: int) -> "Request":
        """A chunk of ``samples`` samples whose factors are built from its slices of what torch saved."""
        provenance = tuple(tuple(sorted(p.items())) for p in self.graph.provenance())
        return dataclasses.replace(self, samples=samples, sliced=True, provenance=provenance)

    @property
    def key(self) -> "Request":
        """The request as the plan cache keeps it: equal to it, holding no tensor (not the graph)."""
        return dataclasses.replace(self, graph=None, rules={})

    @property
    def one_sample(self) -> bool:
        """Per sample, with one sample: planned as the whole graph, laid out per sample."""
        return self.sample_dim is not None and self.batch_dim is None

    @property
    def wanted(self) -> list:
        """The values whose results a run hands back: requested, then the other retained ones."""
        return list(self.requested) + [i for i in self.retained if i not in self.requested]


class _How(NamedTuple):
    """The checked arguments every request takes, before anything is captured."""

    direction: str
    sample_dim: Optional[int]
    overrides: dict
    max_memory: Optional[float]
    record: bool


def _checked(source, direction, batch_dim, configurations, max_memory, create_graph) -> _How:
    return _How(checks.direction(direction), checks.batch_dim(batch_dim, checks.source(source)),
                checks.configurations(configurations), checks.max_memory(max_memory),
                checks.create_graph(create_graph))


def _make(graph: Graph, rules: dict, caller: str, how: _How, order: int, requested: tuple, retained: tuple = (),
          direction: Optional[str] = None, query: Optional[Ask] = None, mixed: tuple = (),
          diagonal: tuple = ()) -> Request:
    sample_dim = how.sample_dim
    # one sample: its derivatives are those of the whole graph (laid out (1, s, n, ...) by attach)
    planned = None if sample_dim is None or graph.source_shape[sample_dim] == 1 else sample_dim
    return Request(graph.signature(), tuple(sorted(rules.items(), key=lambda item: item[0])), order,
                   tuple(requested), tuple(retained), direction or how.direction, planned, query, tuple(mixed),
                   diagonal=tuple(diagonal), sparse=sparsity.ENABLED,
                   graph=graph, rules=rules, caller=caller, max_memory=how.max_memory, record=how.record,
                   sample_dim=sample_dim)


def _asked(graph: Graph, target, retain: Sequence) -> tuple:
    """``(requested, retained)`` value indices: every leaf (or ``target``), the retained tensors."""
    retained = []
    for t in retain:
        i = graph.find(t)
        if i is None:
            raise TargetError(f"a retained tensor of shape {list(t.shape)} is not in the graph of the source")
        retained.append(i)
    if target is None:
        requested = [v.index for v in graph.leaves]
    else:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        i = graph.find(target)
        if i is None:
            raise TargetError(
                f"the source does not depend on target (a tensor of shape {list(target.shape)}, "
                f"{'a leaf' if target.grad_fn is None else target.grad_fn.name()})"
            )
        requested = [i]
        if graph.values[i].leaf is None and i not in retained:
            retained.append(i)
    return tuple(sorted(requested)), tuple(sorted(set(retained)))


def derivatives(source: torch.Tensor, order, target=None, configurations=None, direction="auto",
                max_memory=None, batch_dim=None, create_graph=None, retain: Sequence = (),
                caller: str = "xa.backward") -> Request:
    """The request of :func:`xa.backward`: whole derivative tensors of leaves and retained tensors."""
    order = checks.order(order)
    how = _checked(source, direction, batch_dim, configurations, max_memory, create_graph)
    graph = Graph(source)
    rules = resolve(graph, how.overrides, order)
    requested, retained = _asked(graph, target, retain)
    return _make(graph, rules, caller, how, order, requested, retained)


def _leaf(graph: Graph, wrt, caller: str) -> int:
    if not isinstance(wrt, torch.Tensor):
        raise TypeError(f"{caller}: wrt must be a torch.Tensor, got {type(wrt).__name__}")
    i = graph.find(wrt)
    if i is None or graph.values[i].leaf is None:
        why = "is not a leaf of the source's graph" if i is None else "is an intermediate tensor, not a leaf"
        raise TargetError(f"{caller}: wrt (shape {list(wrt.shape)}) {why}; a query is taken w.r.t. a leaf "
                          "that requires grad and that the source depends on")
    return i


def query(source: torch.Tensor, asked: Query, batch_dim=None, configurations=None, max_memory=None,
          direction="auto", create_graph=None, caller: Optional[str] = None) -> Request:
    """The request of a query (:mod:`xa.queries`) w.r.t. one leaf, or of mixed partials across leaves."""
    if not isinstance(asked, Query):
        raise TypeError(f"query must be one of xa.queries' queries (Laplacian, Partials, Operator, Biharmonic, "
                        f"Directional, Mixed, Pure), got {type(asked).__name__}")
    how = _checked(source, direction, batch_dim, configurations, max_memory, create_graph)
    graph = Graph(source)
    rules = resolve(graph, how.overrides)
    if isinstance(asked, Mixed):
        caller = caller or "xa.mixed"
        keys = asked.keys({id(w): _leaf(graph, w, caller) for w in asked.leaves})
        leaves = tuple(sorted({i for key in keys for i in key}))
        return _make(graph, rules, caller, how, max(len(k) for k in keys), leaves, direction="backward",
                     mixed=tuple(sorted(set(keys))))
    if isinstance(asked, Pure):  # the diagonal: jets of its rows, or backprop with each leaf's positions tied
        caller = caller or "xa.diagonal"
        leaves = tuple(sorted({_leaf(graph, w, caller) for w in asked.leaves}))
        return _make(graph, rules, caller, how, asked.order, leaves, query=asked.ask(), diagonal=leaves)
    ask = asked.ask()
    caller = caller or "xa." + {"operator": "differential_operator"}.get(ask.name, ask.name)
    i = _leaf(graph, asked.wrt, caller)
    return _make(graph, rules, caller, how, ask.order, (i,), query=ask)

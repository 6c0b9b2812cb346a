"""The public surface: ``xa.backward`` and ``xa.Superset``; argument checks, then capture, plan, run, attach."""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterable, Optional, Union

import torch

from . import attach
from . import plan as planner
from .batch import Batching
from .capture import Graph
from .errors import TargetError


def _check_order(order) -> int:
    if isinstance(order, bool) or not hasattr(type(order), "__index__"):
        raise TypeError(f"order must be a positive int, got {type(order).__name__} {order!r}")
    order = operator.index(order)
    if order < 1:
        raise ValueError(f"order must be a positive int, got {order}")
    return order


def _budget(max_memory, device: torch.device) -> Optional[float]:
    """The byte budget: the user's, or a safe share of what the device has free."""
    if max_memory is None:
        return attach.available_memory(device)
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)):
        raise TypeError(f"max_memory must be a number of bytes or None, got {type(max_memory).__name__}")
    if not max_memory > 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    return float(max_memory)


def _check_direction(direction) -> str:
    if direction not in planner.DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, planner.DIRECTIONS))}, got {direction!r}")
    return direction


def _check_batch_dim(batch_dim, source: torch.Tensor) -> Optional[int]:
    """The source's sample dim, wrapped into ``range(source.dim())``; ``None`` for none."""
    if batch_dim is None:
        return None
    if isinstance(batch_dim, bool) or not hasattr(type(batch_dim), "__index__"):
        raise TypeError(f"batch_dim must be an int (a dim of the source) or None, got {type(batch_dim).__name__}")
    d = operator.index(batch_dim)
    ndim = source.dim()
    if ndim == 0:
        raise IndexError(f"batch_dim={d}: the source is 0-d, it has no sample dim; per-sample derivatives need "
                         "a source with one entry per sample (a loss with reduction='none', not its mean)")
    if not -ndim <= d < ndim:
        raise IndexError(f"batch_dim={d} is out of range for a source of shape {list(source.shape)} "
                         f"(expected a dim in [{-ndim}, {ndim - 1}])")
    return d % ndim


def _samples(graph: Graph, batch_dim: Optional[int]):
    """``(batch_dim to plan with, layout for the results)``: one sample is planned as no batch at all."""
    if batch_dim is None:
        return None, None
    if graph.source_shape[batch_dim] == 1:
        # One sample: its derivatives are those of the whole graph, laid out (1, s, n, ...).
        return None, Batching(batch_dim, 1, (None,) * len(graph.values), 1)
    return batch_dim, "plan"


def _recording(create_graph) -> bool:
    """Whether the results join torch's graph: ``create_graph``, or by default whether grad mode is on."""
    if create_graph is None:
        return torch.is_grad_enabled()
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True, False or None (follow grad mode), got "
                        f"{type(create_graph).__name__}")
    return create_graph


def _overrides(configurations) -> dict:
    """Rules swapped in for one call: a mapping, or an iterable of mappings, node name -> rule."""
    if configurations is None:
        return {}
    if isinstance(configurations, dict):
        configurations = [configurations]
    merged: dict = {}
    try:
        items = list(configurations)
    except TypeError:
        raise TypeError("configurations must be a dict of node name -> rule, or a list of such dicts") from None
    for conf in items:
        if not isinstance(conf, dict):
            raise TypeError(f"each configuration must be a dict of node name -> rule, got {type(conf).__name__}")
        for name, rule in conf.items():
            if not isinstance(name, str) or not callable(rule):
                raise TypeError(f"configuration entry {name!r}: expected a node name and a callable rule")
            merged[name] = rule
    return merged


def _as_tensors(tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.grad_fn is None:
            raise ValueError(f"tensors[{i}] has no grad_fn: partials of leaves are set as .xgrad, "
                             "retain_partials is for intermediate tensors")
    return out


class Superset:
    """The derivatives of one source tensor, up to some order.

    ``xa.backward`` builds one and returns it; build one yourself to keep the
    partials of intermediate tensors.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> h = torch.tanh(x)
        >>> s = (h * h).sum()
        >>> sup = xa.Superset.construct(s)
        >>> sup.retain_partials(h)
        >>> sup.backward(order=2)
        >>> [p.shape for p in sup.operator_partials(h)]
        [torch.Size([1, 3]), torch.Size([1, 3, 3])]
    """

    def __init__(self, source: torch.Tensor):
        if not isinstance(source, torch.Tensor):
            raise TypeError(f"source must be a torch.Tensor, got {type(source).__name__}")
        if source.grad_fn is None:
            Graph(source)  # raises the descriptive SourceError
        self.source = source
        self._retain: list = []
        self._partials: dict = {}
        self._leaves: list = []
        self.plan: Optional[planner.Plan] = None

    @classmethod
    def construct(cls, source: torch.Tensor) -> "Superset":
        """A Superset for ``source`` (any tensor with a ``grad_fn``, scalar or not)."""
        return cls(source)

    def retain_partials(self, tensors: Union[torch.Tensor, Iterable[torch.Tensor]]) -> "Superset":
        """Keep ``d^k source / dT^k`` of these intermediate tensors at the next ``backward``."""
        for t in _as_tensors(tensors):
            if not any(t is r for r in self._retain):
                self._retain.append(t)
        return self

    def clear_retentions(self) -> "Superset":
        """Forget the tensors given to :meth:`retain_partials`, and their partials."""
        self._retain.clear()
        self._partials.clear()
        return self

    def _request(self, graph: Graph, target) -> tuple[tuple, tuple]:
        retained = []
        for t in self._retain:
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

    def backward(self, order: int, target: Optional[torch.Tensor] = None, configurations=None,
                 direction: str = "auto", max_memory: Optional[int] = None,
                 batch_dim: Optional[int] = None, create_graph: Optional[bool] = None) -> "Superset":
        """Compute the derivatives of the source up to ``order`` and attach them.

        Args:
            order: the highest order, a positive int.
            target: only this tensor (a leaf, or an intermediate tensor, whose
                partials are then read with :meth:`operator_partials`).
            configurations: rules swapped in for this call, ``{node name: rule}``.
            direction: ``"auto"`` (price both, take the cheaper), ``"backward"``
                or ``"forward"``; see :func:`xa.backward`.
            max_memory: the budget in bytes; see :func:`xa.backward`.
            batch_dim: the source's sample dim, for per-sample derivatives; see :func:`xa.backward`.
            create_graph: whether the results carry a gradient; see :func:`xa.backward`.

        Returns:
            ``self``. Each leaf ``L`` reached gets ``L.xgrad``: a tuple whose
            ``k-1``-th entry has shape ``(source.numel(), *(k * (L.numel(),)))``.
        """
        order = _check_order(order)
        direction = _check_direction(direction)
        batch_dim = _check_batch_dim(batch_dim, self.source)
        overrides = _overrides(configurations)
        graph = Graph(self.source)
        requested, retained = self._request(graph, target)
        budget = _budget(max_memory, graph.device)
        rules = graph.rules(overrides, order)
        planned, layout = _samples(graph, batch_dim)
        with torch.set_grad_enabled(_recording(create_graph)):
            plan, results, kept = attach.compute(graph, order, rules, requested, retained, direction, budget,
                                                 planned)
            if layout == "plan":
                layout = dataclasses.replace(plan.batch, size=plan.batch.total)
            self.plan = plan
            self._leaves, self._partials = attach.attach(graph, order, requested, retained, results, kept, layout)
        return self

    def operator_partials(self, tensor: torch.Tensor) -> tuple:
        """``(d source/dT, ..., d^order source/dT^order)`` of a retained intermediate ``T``.

        Each has shape ``(source.numel(), *(k * (T.numel(),)))``; per sample
        (``batch_dim=``), ``(B, s', *(k * (n',)))`` as for ``.xgrad``.

        Raises:
            KeyError: ``tensor`` was not retained, or ``backward`` has not run.
        """
        if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
            hit = self._partials.get((tensor.grad_fn, tensor.output_nr))
            if hit is not None:
                return hit
        raise KeyError("no partials for this tensor: pass it to retain_partials() (or as target=) "
                       "before backward()")

    def remove_partials(self) -> "Superset":
        """Take ``.xgrad`` off the leaves this Superset set it on."""
        for leaf in self._leaves:
            if hasattr(leaf, "xgrad"):
                del leaf.xgrad
        self._leaves = []
        return self


def backward(source: torch.Tensor, order: int, target: Optional[torch.Tensor] = None,
             configurations=None, direction: str = "auto", max_memory: Optional[int] = None,
             batch_dim: Optional[int] = None, create_graph: Optional[bool] = None) -> Superset:
    """Exact derivatives of ``source`` of every order up to ``order``.

    Every leaf with ``requires_grad=True`` that ``source`` depends on gets
    ``.xgrad``, a tuple of ``order`` tensors; the k-th has shape
    ``(source.numel(), *(k * (leaf.numel(),)))`` and holds
    ``d^k source.flatten()[a] / dleaf.flatten()[i1] ... dleaf.flatten()[ik]``,
    in the leaf's dtype and on its device. torch's graph is left as it was:
    ``source.backward()`` still works afterwards.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        order: the highest derivative order, a positive int.
        target: compute only for this tensor (a leaf, or an intermediate
            tensor whose partials are then in the returned Superset).
        configurations: rules swapped in for this call, ``{node name: rule}``.
        direction: ``"backward"`` contracts from the source down (blocks of
            ``source.numel() * n_v^k``), ``"forward"`` pushes jets up from each
            leaf (``n_v * leaf.numel()^k``); ``"auto"`` prices both with
            opt_einsum's cost model and runs the cheaper.
        max_memory: bytes the computation may use, results included. By
            default half of the memory the system has available (on a GPU,
            80% of its free memory). A plan whose estimated peak is over
            budget runs backward over chunks of source rows; if even one row
            does not fit, :class:`xa.MemoryBudgetError` is raised before
            anything is allocated. Per sample, the chunks are chunks of samples.
        batch_dim: the source's sample dim (e.g. ``0`` for ``u`` of shape
            ``(B, 1)`` from collocation points ``X`` of shape ``(B, 3)``): each
            sample's own derivatives, ``B = source.shape[batch_dim]``,
            ``s' = source.numel() // B``. A leaf the sample dim reaches
            (``X``) gets ``xgrad[k-1]`` of shape ``(B, s', *(k * (n',)))``,
            ``n' = X.numel() // B``: ``d^k S_b / dX_b^k``, what ``torch.func.vmap``
            of nested ``jacrev`` gives. A leaf it does not reach (a weight
            ``W``) is shared: ``(B, s', *(k * (W.numel(),)))``, each sample's
            derivatives w.r.t. all of ``W``. A node that couples samples (a
            sum, softmax or batch norm over the batch) raises
            :class:`xa.BatchMixingError` before anything runs.
        create_graph: whether the results are differentiable, as in
            ``torch.autograd.grad``. By default (``None``) they are whenever grad
            mode is on: ``.xgrad`` are functions of the network's parameters and
            of the leaves, so a loss built from them trains (``loss.backward()``
            reaches every parameter, at any order of differentiation). ``False``,
            or ``torch.no_grad()``, gives plain data, in less memory and time.

    Returns:
        The :class:`Superset`, which holds the plan and any retained partials.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tanh(x).sum()
        >>> xa.backward(y, order=3)
        >>> x.xgrad[2].shape
        torch.Size([1, 3, 3, 3])
    """
    return Superset(source).backward(order, target=target, configurations=configurations, direction=direction,
                                     max_memory=max_memory, batch_dim=batch_dim, create_graph=create_graph)


def clear_partials() -> int:
    """Take ``.xgrad`` off every tensor xa set it on, and return how many.

    A recorded ``.xgrad`` (the default under grad mode, so that it can be trained on) hangs on a
    graph that holds its leaf: the leaf and its derivatives keep each other alive until ``.xgrad``
    is deleted. In a loop that calls :func:`xa.backward` on fresh tensors, call this (or
    :meth:`Superset.remove_partials`) once their ``.xgrad`` is used, or pass ``create_graph=False``.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> _ = xa.backward(torch.tanh(x).sum(), order=2)
        >>> xa.clear_partials() >= 1, hasattr(x, "xgrad")
        (True, False)
    """
    return attach.clear()


def plan_for(source: torch.Tensor, order: int, target=None, configurations=None, direction="auto",
             batch_dim=None) -> tuple:
    """Capture and plan without running: ``(graph, plan)``."""
    order = _check_order(order)
    direction = _check_direction(direction)
    batch_dim = _check_batch_dim(batch_dim, source)
    overrides = _overrides(configurations)
    graph = Graph(source)
    requested, retained = Superset(source)._request(graph, target)
    planned, _ = _samples(graph, batch_dim)
    return graph, planner.build(graph, order, graph.rules(overrides, order), requested, retained, direction,
                                batch_dim=planned)

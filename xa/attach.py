"""Attach: put a run's results where users read them.

Results go onto leaves as ``.xgrad`` (a tuple, the k-th entry shaped
``(source.numel(), *(k * (leaf.numel(),)))``, in the leaf's dtype and on its
device) and, for retained intermediate tensors, into the partials a
:class:`~xa.api.Superset` hands out.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch

from .batch import Batching
from .capture import Graph
from .plan import Plan
from .request import Request


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


def layout(request: Request, plan: Plan) -> Batching | None:
    """How results are laid out per sample: the plan's batch over all samples, or one sample's (``(1, s, ..)``)."""
    if request.one_sample:
        return Batching(request.sample_dim, 1, (None,) * len(request.graph.values), 1)
    return None if plan.batch is None else dataclasses.replace(plan.batch, size=plan.batch.total)


def attach(request: Request, plan: Plan, results: dict, kept: dict) -> tuple:
    """Set ``.xgrad`` on the requested leaves: ``(leaves, partials)``, partials keyed by (node, output)."""
    graph, order, batch = request.graph, request.order, layout(request, plan)
    partials = {(graph.values[i].fn, graph.values[i].output): flat(graph, i, order, kept[i], batch)
                for i in request.retained}
    leaves = []
    for i in request.requested:
        v = graph.values[i]
        if v.leaf is not None:
            v.leaf.xgrad = flat(graph, i, order, results[i], batch)
            leaves.append(v.leaf)
    if torch.is_grad_enabled():
        _warn_cycles()
    return leaves, partials

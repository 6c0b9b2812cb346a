"""Queries on the derivative tensor, answered without building it: the Laplacian.

``xa.laplacian(u, x)`` is ``sum_i d^2 u / dx_i^2`` for every entry of ``u``,
shaped like ``u``. It runs forward jets from ``x`` (:mod:`xa.jets`) whose
second order is *collapsed*: each node keeps its full first-order jet
(``n`` rows) and one second-order row, the running sum over ``i`` of
``d^2 v / dx_i^2``, pushed through by Faa di Bruno,

    L_y = f' L_x + f'' sum_i (J_x[i])^2      (and the mixed terms of a
                                               node with several inputs),

so the Laplacian costs about ``n + 1`` rows per node, never the ``n x n``
Hessian (collapsed Taylor mode, Dangel et al. 2024). With ``batch_dim``,
it is each sample's Laplacian w.r.t. its own entries of ``x``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import attach
from .api import _budget, _check_batch_dim, _overrides
from .capture import Graph
from .errors import TargetError


def laplacian(source: torch.Tensor, wrt: torch.Tensor, batch_dim: Optional[int] = None,
              configurations=None, max_memory: Optional[int] = None) -> torch.Tensor:
    """``sum_i d^2 source / dwrt_i^2``, shaped like ``source``, in its dtype and on its device.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``i`` runs over all its entries, or,
            with ``batch_dim``, over one sample's entries).
        batch_dim: the source's sample dim: each sample's Laplacian w.r.t. its
            own entries of ``wrt`` (``u`` of shape ``(B, 1)`` from points ``x`` of
            shape ``(B, d)`` gives ``(B, 1)``: ``u_x1x1 + .. + u_xdxd`` per point).
            See :func:`xa.backward` for what the sample dim may be.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`; per sample, over budget, chunks of samples.

    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> u = (x ** 2).sum(1, keepdim=True)
        >>> xa.laplacian(u, x, batch_dim=0)   # 6 for every point
    """
    batch_dim = _check_batch_dim(batch_dim, source)
    overrides = _overrides(configurations)
    graph = Graph(source)
    if not isinstance(wrt, torch.Tensor):
        raise TypeError(f"wrt must be a torch.Tensor, got {type(wrt).__name__}")
    i = graph.find(wrt)
    if i is None or graph.values[i].leaf is None:
        what = "is not a leaf of the source's graph" if i is None else "is an intermediate tensor, not a leaf"
        raise TargetError(f"laplacian: wrt (shape {list(wrt.shape)}) {what}; the Laplacian is taken w.r.t. a leaf "
                          "that requires grad and that the source depends on")
    if batch_dim is not None and graph.source_shape[batch_dim] == 1:
        batch_dim = None  # one sample: the whole graph's Laplacian is that sample's
    plan, results, _ = attach.compute(graph, 2, graph.rules(overrides), (i,), (), "forward",
                                      _budget(max_memory, graph.device), batch_dim, query="laplacian")
    out = results[i][0]
    if out is None:  # the source is affine in wrt
        return torch.zeros(graph.source_shape, dtype=source.dtype, device=source.device)
    if plan.batch is not None:  # (B, *one sample's shape): the sample dim back in its place
        shape = graph.source_shape
        d = plan.batch.source_dim
        out = out.reshape((shape[d],) + shape[:d] + shape[d + 1:]).movedim(0, d)
    return out.reshape(graph.source_shape).to(source.dtype)

"""Argument checks of the public functions: one typed error per bad argument, naming it."""

from __future__ import annotations

import operator
from typing import Optional

import torch

DIRECTIONS = ("auto", "backward", "forward")


def order(value) -> int:
    """A positive int."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"order must be a positive int, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"order must be a positive int, got {value}")
    return value


def direction(value) -> str:
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}, got {value!r}")
    return value


def batch_dim(value, source: torch.Tensor) -> Optional[int]:
    """The source's sample dim, wrapped into ``range(source.dim())``; ``None`` for none."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"batch_dim must be an int (a dim of the source) or None, got {type(value).__name__}")
    d = operator.index(value)
    ndim = source.dim()
    if ndim == 0:
        raise IndexError(f"batch_dim={d}: the source is 0-d, it has no sample dim; per-sample derivatives need "
                         "a source with one entry per sample (a loss with reduction='none', not its mean)")
    if not -ndim <= d < ndim:
        raise IndexError(f"batch_dim={d} is out of range for a source of shape {list(source.shape)} "
                         f"(expected a dim in [{-ndim}, {ndim - 1}])")
    return d % ndim


def max_memory(value) -> Optional[float]:
    """The user's byte budget, or ``None`` for the default (a share of what the device has free)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_memory must be a number of bytes or None, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"max_memory must be positive, got {value}")
    return float(value)


def create_graph(value) -> bool:
    """Whether the results join torch's graph: ``create_graph``, or by default whether grad mode is on."""
    if value is None:
        return torch.is_grad_enabled()
    if not isinstance(value, bool):
        raise TypeError(f"create_graph must be True, False or None (follow grad mode), got {type(value).__name__}")
    return value


def configurations(value) -> dict:
    """Rules swapped in for one call: a mapping, or an iterable of mappings, node name -> rule."""
    if value is None:
        return {}
    if isinstance(value, dict):
        value = [value]
    merged: dict = {}
    try:
        items = list(value)
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


def source(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"source must be a torch.Tensor, got {type(value).__name__}")
    return value


def intermediates(tensors) -> list:
    """Tensors whose partials are kept: each a tensor with a ``grad_fn``."""
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

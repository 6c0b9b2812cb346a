"""Folding permutations into their consumers: ``W.t()`` read by ``addmm`` costs no block copy.

A permutation node ``t = x.permute(dims)`` (``TBackward0``, ``TransposeBackward0``,
``PermuteBackward0``) only relabels: every block through it is a copy of the
block before it with its dims reordered, a full pass over memory for
nothing (for a per-sample Hessian w.r.t. ``nn.Linear``'s weight, the pass
over the whole result). When ``t`` has one consumer ``c`` and its partials
are not asked for, the plan reads ``x`` straight from ``c``: ``c``'s rule is
wrapped so that the port of each slot that read ``t`` is reordered into
``x``'s row-major order (a label that spans two of ``t``'s dims is split,
a reshape of the operands that carry it). The fold is derived from the
graph's signature and the rule objects alone, so it belongs to the plan.
"""

from __future__ import annotations

import copy
import dataclasses

from .capture import Graph
from .factor import Factor, port_labels, split_at


def fold(graph: Graph, rules: dict, keep: set) -> tuple:
    """``(graph', folds)``: the graph with foldable permutations bypassed, and ``{consumer: {slot: (shape, dims)}}``.

    ``keep``: values whose partials are asked for, never folded away.
    """
    readers: dict = {}
    for v in graph.values:
        for slot, i in enumerate(v.inputs):
            if i is not None:
                readers.setdefault(i, []).append((v.index, slot))
    folds: dict = {}
    gone: set = set()
    for v in graph.values:
        rule = rules.get(v.name)
        dims_of = getattr(rule, "permutation", None)
        if dims_of is None or v.leaf is not None or v.index == 0 or v.index in keep:
            continue
        users = readers.get(v.index, [])
        if len({c for c, _ in users}) != 1 or v.inputs[0] is None or v.inputs[0] in gone:
            continue
        consumer = users[0][0]
        if consumer in gone:
            continue
        x = graph.values[v.inputs[0]]
        dims = tuple(dims_of(graph.ctx(v.index, planning=True), len(x.shape)))
        for _, slot in users:
            folds.setdefault(consumer, {})[slot] = (v.shape, dims, v.inputs[0])
        gone.add(v.index)
    if not folds:
        return graph, {}
    folded = copy.copy(graph)
    folded.forget_signature()  # its values differ from the graph's
    folded.values = list(graph.values)
    for c, slots in folds.items():
        v = graph.values[c]
        inputs = list(v.inputs)
        for slot, (_, _, x) in slots.items():
            inputs[slot] = x
        folded.values[c] = dataclasses.replace(v, inputs=tuple(inputs))
    folded.order = [i for i in graph.order if i not in gone]
    specs = {c: {slot: spec[:2] for slot, spec in slots.items()} for c, slots in folds.items()}

    def rule(i, rules):
        base = graph.rule(i, rules)
        return wrap(base, specs[i]) if i in specs else base

    folded.rule = rule  # the consumers' rules read the input through the permutation
    folded.ctx = graph.ctx  # and see the node as torch recorded it (the permuted shape in its slot)
    folded.folds = specs  # (xa.batch.cut: a folded slot is not cut)
    return folded, specs


def wrap(rule, spec: dict):
    """``rule`` with the port of each slot in ``spec`` (``{slot: (permuted shape, dims)}``) in the input's order."""

    def folded(ctx, slots):
        f = rule(ctx, slots)
        if f is None:
            return None
        for pos, slot in enumerate(slots):
            if slot in spec:
                f = _unpermute(f, pos, *spec[slot])
        return f

    folded.multi_output = getattr(rule, "multi_output", False)
    return folded


def _unpermute(f: Factor, pos: int, shape: tuple, dims: tuple) -> Factor:
    """Reorder input port ``pos``, laid out over ``shape = x.permute(dims).shape``, into ``x``'s row-major order."""
    if tuple(dims) == tuple(range(len(dims))):  # t() of a 0-d or 1-d tensor: nothing moves
        return f
    port = ("ins", pos)
    acc = 1
    bounds = []
    for n in shape:
        acc *= n
        bounds.append(acc)
    for b in bounds[:-1]:
        f = split_at(f, port, b, "a folded permutation")
    groups, acc, d = [[] for _ in shape], 1, 0
    for label in port_labels(f, port):
        acc *= f.sizes[label]
        while d < len(shape) - 1 and acc > bounds[d]:
            d += 1
        groups[d].append(label)
    inverse = [0] * len(dims)
    for i, j in enumerate(dims):
        inverse[j] = i
    new = tuple(label for j in range(len(dims)) for label in groups[inverse[j]])
    ins = list(f.ins)
    ins[pos] = new
    return dataclasses.replace(f, ins=tuple(ins))

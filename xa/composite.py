"""Composite nodes: an operator described as a small graph of simpler ones.

softmax's k-th derivative is dense along its dim, ``n^(k+1)`` entries built
from Bell(k+1) partition terms. Written instead as the composition torch
itself could have recorded,

    e = exp(x - c),   s = sum(e, dim, keepdim=True),   y = e / s,

every piece has a structured rule (a tied diagonal, a relabelling, a
broadcast product), and the Faa di Bruno machinery of both directions
contracts through them at the cost of the elementwise ops they are: a
softmax of ``n`` classes at order 4 writes ``n^4``-entry blocks, never an
``n^5`` factor.

A rule with a ``composite`` attribute is expanded this way when the graph's
rules are resolved (:meth:`xa.capture.Graph.rules`), unless the user swapped
in a rule of their own for the node. ``rule.composite(ctx)`` returns the
pieces (:class:`Piece`), the last of which is the node's output, or ``None``
to keep the node whole. Each piece is named by the torch node whose rule
describes it (``ExpBackward0``, ``SumBackward1``, ``DivBackward0``) and
carries the saved attributes that rule reads, computed from what torch saved
on the node: the pieces are values of the graph like any other, planned on
their shapes and read at execution. Their derivatives at the point are the
node's exactly: a constant shift (``c``, picked as ``logsumexp(x)`` so that
``e`` is softmax's own saved result and ``s`` is one) changes no derivative.

The node keeps its index (the pieces before it are appended to the graph),
so a retained or target tensor that is the node's output is still found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .capture import Value
from .registry import lookup


@dataclass
class Piece:
    """One value of a composite's graph.

    ``name``: the torch node whose rule describes it; ``inputs``: per slot,
    ``("in", slot)`` (the composite's own input slot), ``("piece", k)`` (an
    earlier piece) or ``None`` (a constant); ``saved``: the attributes its
    rule reads; ``what``: a few words for explain and error messages.
    """

    name: str
    shape: tuple
    inputs: tuple
    saved: dict = field(default_factory=dict)
    what: str = ""


# A node whose dense factors at the call's order hold at most this many entries stays whole:
# its one dense term costs less than the pieces' steps (softmax over 4 classes at order 2).
DENSE_LIMIT = 4096


def expand(graph, rules: dict, order: int | None = None) -> bool:
    """Replace, in ``graph``, every node whose rule is a composite by its pieces; whether any was.

    With ``order``, a node whose rule says its dense factors (``rule.dense_entries(ctx, order)``)
    are small stays whole. The choice is made on shapes alone, and the graph's signature shows it.
    """
    changed = False
    n = 0
    while n < len(graph.values):  # pieces appended here are expanded in turn (dist's norm)
        v = graph.values[n]
        n += 1
        rule = rules.get(v.name) or (lookup(v.name) if v.fn is None else None)
        composite = getattr(rule, "composite", None)
        if composite is None or v.leaf is not None or v.output != 0:
            continue
        ctx = graph.ctx(v.index, planning=False)
        dense = getattr(rule, "dense_entries", None)
        if order is not None and dense is not None and dense(ctx, order) <= DENSE_LIMIT:
            continue
        pieces = composite(ctx)
        if not pieces:
            continue
        changed = True
        made: list[int] = []
        for n, piece in enumerate(pieces):
            inputs = tuple(_wire(ref, v.inputs, made) for ref in piece.inputs)
            last = n == len(pieces) - 1
            label = f"{v.name} ({piece.what})"
            if last:  # the node's own value: same index, torch's node (found by its grad_fn)
                graph.values[v.index] = dataclasses.replace(
                    v, name=piece.name, inputs=inputs, saved=piece.saved, attrs={}, label=label)
                made.append(v.index)
            else:
                index = len(graph.values)
                graph.values.append(Value(index, None, piece.name, tuple(piece.shape), inputs, piece.saved,
                                          parent=v.index, label=label))
                made.append(index)
    if changed:
        graph.order = graph._reverse_topological()
        graph.__dict__.pop("_signature", None)
        graph.__dict__.pop("_provenance", None)
    return changed


def _wire(ref: Any, inputs: tuple, made: list):
    if ref is None:
        return None
    kind, k = ref
    return inputs[k] if kind == "in" else made[k]

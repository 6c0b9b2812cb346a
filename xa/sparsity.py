"""Block sparsity of forward jets: a leaf's items, tied label until an operator mixes them.

A network that processes a leaf ``X`` of shape ``(B, N, F)`` item by item
(per particle, per node, per atom) before it mixes items has jets with a
structure: until then, item ``m`` of a value depends on item ``m`` of ``X``
alone, so ``d v[.., m, ..] / d X[.., m', f]`` is zero for ``m' != m``. The
item index is then a label tied through every factor, exactly as a
per-sample plan's sample label is (:mod:`xa.batch`): such a value's jet
keeps, per item, only rows over the item's own ``F`` entries, laid out
``(rows over F, T, *rest)`` with ``T`` the joint digit of the samples and
the items (``b * N + m``) as one sample label.

:func:`find` follows the items from the leaf up through the first-order
factors: a node whose every input that depends on the leaf carries the
items, and whose factor ties that input's item label to one label of its
output port (the same digit for every input), carries them on; any other
node is dense (a sum or mean over items, a reshape that merges them,
attention across them). Where a dense node reads a tied value (a
*frontier* value; the source too when it is tied), the value's tied jets
are written into the dense jets its consumers read -- each dense row that
lies within one item takes the tied row of that item, a row across items is
zero -- by one einsum with a one-hot constant (:func:`embedding`), and for a
collapsed top order with the query's weights gathered per item
(:func:`item_weights`).

No annotation is needed: the leaf's dims are tried as runs of item dims
(after the sample dim with ``batch_dim=``), and the run that keeps the most
values tied is used. The plan is priced as usual and kept only where it is
cheaper than the dense one (:mod:`xa.jets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .batch import Batching, position, split_port
from .capture import Graph
from .errors import BatchMixingError

ENABLED = True  # new requests plan block sparsity where it is cheaper (False: always the dense plan)

@dataclass(frozen=True)
class Items:
    """Where a leaf's items are tied.

    Args:
        batch: the tied layout as a :class:`~xa.batch.Batching`: ``at[v]`` the joint digit of samples and items
            of each tied value (``None`` elsewhere), ``size`` the joint count (samples of this plan times items).
            Never sliced: in a chunk of samples these nodes read all samples' factors, narrowed.
        tied: the values (the leaf's consumers up to the frontier) whose jets are kept per item.
        items: ``N``, items per sample.
        pre, post: one sample of the leaf flattened is ``(pre, N, post)``: entry ``i = (a * N + m) * post + f``;
            one item of it has ``pre * post`` entries ``a * post + f``.
    """

    batch: Batching
    tied: frozenset
    items: int
    pre: int
    post: int

    @property
    def numel(self) -> int:
        """Entries of the leaf per item (and sample)."""
        return self.pre * self.post

    def split(self, entries: np.ndarray) -> tuple:
        """Dense entries of one sample of the leaf -> (their item, their entry within the item)."""
        n, p = self.items, self.post
        return (entries // p) % n, (entries // (p * n)) * p + entries % p


def depends_on(graph: Graph, leaf: int, dead=()) -> list:
    """Per value, whether it depends on ``leaf`` through values that are not ``dead``."""
    reach = [False] * len(graph.values)
    for i in reversed(graph.order):
        reach[i] = i == leaf or (i not in dead and any(j is not None and reach[j] for j in graph.values[i].inputs))
    return reach


def find(graph: Graph, rules: dict, leaf: int, batch: Batching | None) -> Items | None:
    """The leaf's items and the values that keep them tied, or ``None`` where no node would keep fewer rows."""
    shape = graph.values[leaf].shape
    if batch is None:
        runs = [(lo, hi) for lo in range(len(shape)) for hi in range(lo + 1, len(shape) + 1)]
        samples, size = 1, 1
    else:
        s = batch.dim(graph, leaf)
        if s is None:
            return None
        runs = [(s, hi) for hi in range(s + 2, len(shape) + 1)]
        samples, size = batch.total, batch.size
    reach = depends_on(graph, leaf, () if batch is None else batch.dead)
    asked: dict = {}  # (node, slot) -> its first-order factor, asked once for every run of dims tried
    best = None
    for lo, hi in runs:
        joint = math.prod(shape[lo:hi])
        items = joint // samples
        if items <= 1 or (lo, hi) == (0, len(shape)) and batch is None:
            continue
        at = _region(graph, rules, leaf, math.prod(shape[:lo]), joint, batch, reach, asked)
        if at is None or len(at) <= 1:
            continue
        score = (len(at), items)
        if best is None or score > best[0]:
            best = (score, lo, hi, at, items)
    if best is None:
        return None
    _, lo, hi, at, items = best
    per_sample = math.prod(shape) // samples
    pre = math.prod(shape[:lo])
    post = per_sample // (pre * items)
    layout = tuple(at.get(i) for i in range(len(graph.values)))
    tied = Batching(batch.source_dim if batch is not None else 0, samples * items, layout, size * items)
    return Items(tied, frozenset(i for i in at if i != leaf), items, pre, post)


def _region(graph: Graph, rules: dict, leaf: int, pre: int, joint: int, batch, reach, asked: dict) -> dict | None:
    """Each value that keeps the leaf's items tied -> where their joint digit is, from the leaf up."""
    at = {leaf: pre}
    for y in reversed(graph.order):
        v = graph.values[y]
        if v.leaf is not None or not reach[y]:
            continue
        found = _carried(graph, rules, y, at, joint, reach, asked)
        if found is None:
            continue
        if batch is not None and batch.at[y] != found:
            continue  # the samples must stay the joint digit's outer part
        at[y] = found
    return at


def _carried(graph: Graph, rules: dict, y: int, at: dict, joint: int, reach, asked: dict) -> int | None:
    """Where node ``y``'s output carries the items its inputs carry, or ``None`` (it mixes them)."""
    v = graph.values[y]
    slots = [t for t, x in enumerate(v.inputs) if x is not None and reach[x]]
    if any(v.inputs[t] not in at for t in slots):
        return None
    here = f"{v.title} at {v.where(graph)}"
    found = None
    for t in slots:
        if (y, t) not in asked:
            asked[y, t] = graph.rule(y, rules)(graph.ctx(y, planning=True), (t,))
        f = asked[y, t]
        if f is None:
            continue
        try:
            f, q = split_port(f, ("ins", 0), at[v.inputs[t]], joint, here)
            if f.ins[0].count(q) != 1 or f.out.count(q) != 1:  # mixed away, or a diagonal (dense: kept simple)
                return None
            e = position(f.out, f.sizes, q)
            split_port(f, ("out",), e, joint, here)
        except BatchMixingError:  # the items do not line up with this node's labels: it is dense
            return None
        if found is not None and found != e:
            return None
        found = e
    return found


# ---------------------------------------------------------------- the rows kept per item


def within(items: Items, rows: np.ndarray) -> tuple:
    """``(positions, tied rows, items)`` of the dense rows (an ``(R, k)`` array of one sample's leaf
    entries) that lie within one item: which rows, each as a row over its item's entries, and the item."""
    item, entry = items.split(rows)
    keep = np.all(item == item[:, :1], axis=1)
    return np.nonzero(keep)[0], entry[keep], item[keep, 0]

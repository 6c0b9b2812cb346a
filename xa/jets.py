"""The forward direction: jets ``d^k v / dL^k`` pushed from one leaf up to the source.

For a leaf ``L`` and every value ``v`` that depends on it, the jet
``J_v[k] = d^k v / dL^k`` is symmetric in its ``k`` leaf indices, so it is
stored once per *sorted* multi-index ``i_1 <= .. <= i_k`` of the leaf's
``n`` entries: ``C(n + k - 1, k)`` rows instead of ``n^k`` (15 instead of 81
for ``n = 3``, ``k = 4``), laid out ``(M_k, *v.shape)`` -- the multi-index
first (before the sample label of a per-sample plan too), so that a linear
layer is one ``mm`` over contiguous rows and reading a jet at other rows
copies whole contiguous rows.
``J_L[1]`` is the identity (never stored) and ``J_L[k] = 0`` for ``k >= 2``.
For ``y = f(x_1 .. x_m)``, Faa di Bruno in the forward direction reads

    J_y[k][a] = sum over set partitions P of the positions {1..k}, and over a
                slot s_B for every block B of P:  d^|P| y / dx_(s_B ...)
                contracted with  prod over B: J_(x_(s_B))[|B|][a_B]

where ``a_B`` is the sub-multi-index of ``a`` at the positions of ``B``
(still sorted): reading ``J_x[|B|]`` at ``a_B`` for every ``a`` is one
``index_select`` with a fixed index, after which every operand of the term
carries the same multi-index label. Written out term by term, like the
backward direction. A value read by two operators (fan-out) needs nothing
special here: each consumer reads the same jet. The source's jets are
expanded to xa's layout ``(s, n_L, ..., n_L)`` at the end.

Blocks cost ``C(n_L + k - 1, k) * n_v`` instead of backprop's ``s * n_v^k``:
the right way round for a small leaf feeding a wide network (a PINN's input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations, combinations_with_replacement, product

import numpy as np
import torch

from . import sparsity
from .batch import BatchFactors, Batching, operand_views
from .capture import Graph
from .errors import BatchMixingError, QueryError
from .sparsity import Items
from .terms import PlanFactors, Step, TermLabels, compile_term, set_partitions

IDENTITY = "identity"
EMBED_LIMIT = 2**22  # entries of one embedding constant, at most (dense rows x tied rows x items)


def jet_key(leaf: int, value: int, k: int) -> tuple:
    return ("jet", leaf, value, k)


@lru_cache(maxsize=256)
@lru_cache(maxsize=64)
def multi_indices(n: int, k: int) -> tuple:
    """The sorted multi-indices of order ``k`` over ``n`` entries, in order, and their positions."""
    rows = tuple(combinations_with_replacement(range(n), k))
    return rows, {row: r for r, row in enumerate(rows)}


@lru_cache(maxsize=64)
def _row_array(n: int, kind) -> np.ndarray:
    """The rows of one order as an ``(R, k)`` int64 array."""
    found = rows_of(n, kind)
    k = kind if isinstance(kind, int) else len(kind[0]) if kind else 0
    return np.array(found, dtype=np.int64).reshape(len(found), k)


def rows(n: int, k: int) -> int:
    """``C(n + k - 1, k)``: how many sorted multi-indices there are."""
    return math.comb(n + k - 1, k)


@dataclass(frozen=True)
class Rows:
    """What a forward pass keeps per order: the structure of a query (:mod:`xa.queries`), never its values.

    ``m`` directions span the jets: the leaf's ``n`` entries (``J_L[1]`` is the
    identity), or, ``seeded``, ``m`` directions given at execution as an
    ``(m, n)`` matrix (``J_L[1] = D``: directional jets). ``kinds[k - 1]`` is
    the rows of order ``k``: ``k`` itself for every sorted multi-index over
    the ``m`` directions, or a tuple of sorted multi-indices holding every
    sub-multi-index of the rows above it. With ``collapse = q > 0`` the top
    order keeps ``q`` weighted sums of its rows (weights ``(q, rows)`` given
    at execution), pushed through every node on their own (collapsed Taylor mode).
    """

    m: int
    kinds: tuple
    seeded: bool = False
    collapse: int = 0
    # the constant that collapses the top order: the query's weights ``(q, rows)``, or, for jets kept per
    # item (xa.sparsity), its weights gathered per item and laid out over the samples and items ``(q, rows, T)``;
    # None where they are all ones by structure (a Laplacian's, q = 1): the rows are summed, no weights read
    weights: tuple | None = ("weights",)
    per_sample: bool = False

    @property
    def order(self) -> int:
        return len(self.kinds)


def full_rows(n: int, order: int) -> Rows:
    """Every sorted multi-index of every order: the whole derivative tensor."""
    return Rows(n, tuple(range(1, order + 1)))


ALL = "all"  # every sorted multi-index of an order


def closure(m: int, wanted: dict) -> tuple:
    """Kinds for orders 1..max: the rows ``wanted[k]`` (a set of sorted multi-indices, or :data:`ALL`) and every
    sub-multi-index of the rows above; an order that holds every row is its int ``k``."""
    top = max(wanted)
    kinds = []
    below: set = set()
    everything = False
    for k in range(top, 0, -1):
        here = wanted.get(k, set())
        everything = everything or here == ALL
        if everything:
            kinds.append(k)
            continue
        here = set(here) | below
        below = {tuple(a[p] for p in keep) for a in here for keep in combinations(range(k), k - 1)}
        kinds.append(k if len(here) == rows(m, k) else tuple(sorted(here)))
    return tuple(reversed(kinds))


def rows_of(n: int, kind) -> tuple:
    """The rows of one order: every sorted multi-index of order ``kind`` (an int), or the rows ``kind`` lists."""
    return multi_indices(n, kind)[0] if isinstance(kind, int) else kind


def count(n: int, kind) -> int:
    """How many rows an order keeps."""
    return rows(n, kind) if isinstance(kind, int) else len(kind)


@lru_cache(maxsize=256)
def where(n: int, kind) -> dict:
    """Each row of an order -> its position."""
    return multi_indices(n, kind)[1] if isinstance(kind, int) else {row: r for r, row in enumerate(kind)}


@lru_cache(maxsize=1024)
def _index_cpu(n: int, k, block, lower=None) -> torch.Tensor:
    """For each row ``a`` of kind ``k``: the position of ``a_block`` among the rows of kind ``lower``."""
    if block == "full":  # every (unsorted) k-tuple -> its sorted row: the expansion to n^k
        _, at = multi_indices(n, k)
        return torch.tensor([at[tuple(sorted(t))] for t in product(range(n), repeat=k)], dtype=torch.long,
                            device="cpu")
    lower = len(block) if lower is None else lower
    j = len(block)
    if n ** max(j, 1) < 2**62:
        # sorted rows of one length are in lexicographic order: as base-n numbers they increase,
        # so each sub-row's position is a binary search among the lower rows' numbers
        weights = n ** np.arange(j - 1, -1, -1, dtype=np.int64)
        keys = _row_array(n, k)[:, list(block)] @ weights
        lower_keys = _row_array(n, lower) @ weights
        return torch.from_numpy(np.searchsorted(lower_keys, keys).astype(np.int64))
    at = where(n, lower)
    return torch.tensor([at[tuple(a[p] for p in block)] for a in rows_of(n, k)], dtype=torch.long, device="cpu")


@lru_cache(maxsize=1024)
def _reads_in_order(n: int, k, block: tuple, lower=None) -> bool:
    """Reading the rows of ``lower`` at ``block`` of each row of ``k`` is every row once, in order."""
    if count(n, k) != count(n, len(block) if lower is None else lower):
        return False
    return _index_cpu(n, k, block, lower).tolist() == list(range(count(n, len(block) if lower is None else lower)))


_ON_DEVICE: dict = {}


def index(n: int, k, block, device, lower=None) -> torch.Tensor:
    """:func:`_index_cpu` on ``device``, kept (a handful of small index tensors per plan)."""
    key = (n, k, block, lower, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        hit = _index_cpu(n, k, block, lower).to(device)
        if len(_ON_DEVICE) > 4096:
            _ON_DEVICE.clear()
        _ON_DEVICE[key] = hit
    return hit


def onehot(n: int, k, pos: int, dtype, device) -> torch.Tensor:
    """``E[a, i] = [a[pos] == i]`` over the rows ``a`` of kind ``k``: the leaf's identity jet."""
    key = ("onehot", n, k, pos, dtype, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        rows_k = rows_of(n, k)
        at = torch.tensor([a[pos] for a in rows_k], dtype=torch.long, device="cpu")
        hit = torch.zeros(len(rows_k), n, dtype=dtype, device="cpu").scatter_(1, at[:, None], 1.0).to(device)
        _ON_DEVICE[key] = hit
    return hit


def seed(directions: torch.Tensor, m: int, k, pos: int) -> torch.Tensor:
    """``D[a[pos], i]`` over the rows ``a`` of kind ``k``: the leaf's jet along seeded directions ``D``."""
    at = index(m, k, (pos,), directions.device, lower=1)
    return directions.index_select(0, at)


def sample_seed(directions: torch.Tensor, m: int, k, pos: int, first: int = 0, size=None) -> torch.Tensor:
    """``D[b, a[pos], i]`` over the rows ``a`` of kind ``k`` and the samples ``first .. first + size``:
    the leaf's jet along each sample's own directions ``D`` of shape ``(B, m, n')``, laid out
    ``(rows, b, i)`` like the jets.

    Directions stored ``(m, B, n')`` (``D`` a transposed view of them, as :mod:`xa.sampling` draws
    them) are the operand itself, with no copy, where the rows read every direction once, in order,
    over all samples (order 1 of a directional query or an estimator).
    """
    directions = directions.transpose(0, 1)
    if not (count(m, k) == m and _reads_in_order(m, k, (pos,), 1)):
        directions = directions.index_select(0, index(m, k, (pos,), directions.device, lower=1))
    if size is not None and size != directions.shape[1]:
        directions = directions.narrow(1, first, size)
    return directions


def constant(ref: tuple, seeds: dict | None, dtype, device, first: int = 0, size=None) -> torch.Tensor:
    """A plan's constant operand: a one-hot identity jet, seeded directions, or a query's weights.

    Per-sample directions (``"sample_seed"``) are read at the samples ``first .. first + size`` of a chunk.
    """
    if ref[0] == "onehot":
        return onehot(*ref[1:], dtype, device)
    if ref[0] == "seed":
        return seed(seeds["directions"].to(dtype), *ref[1:])
    if ref[0] == "items":
        return embedding(ref[1:], dtype, device)
    if ref[0] == "item_weights":
        return item_weights(ref[1:], seeds["weights"].to(dtype))
    if ref[0] == "item_weights_joint":  # (q, rows, N) repeated for every sample: (q, rows, samples * N)
        w = item_weights(ref[1:6], seeds["weights"].to(dtype))
        return w[:, :, None, :].expand(w.shape[0], w.shape[1], ref[6], w.shape[2]).reshape(w.shape[0], w.shape[1], -1)
    if ref[0] == "sample_seed":
        return sample_seed(seeds["directions"].to(dtype), *ref[1:], first=first, size=size)
    return seeds["weights"].to(dtype)


@lru_cache(maxsize=256)
def _item_rows(items: Items, m: int, kind, mt: int, kind_t) -> tuple:
    """Per dense row within one item: ``(dense position, tied position, item)``, as CPU index tensors."""
    pos, entry, item = sparsity.within(items, _row_array(m, kind))
    at = where(mt, kind_t)
    tied = [at[tuple(r)] for r in entry.tolist()]
    return (torch.from_numpy(pos), torch.tensor(tied, dtype=torch.long), torch.from_numpy(item))


def embedding(spec: tuple, dtype, device) -> torch.Tensor:
    """``E[r, t, m] = 1`` where dense row ``r`` is tied row ``t`` of item ``m`` (:mod:`xa.sparsity`)."""
    key = ("items",) + spec + (dtype, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        items, m, kind, mt, kind_t = spec
        pos, tied, item = _item_rows(*spec)
        e = torch.zeros(count(m, kind), count(mt, kind_t), items.items, dtype=dtype, device="cpu")
        e[pos, tied, item] = 1.0
        hit = _ON_DEVICE[key] = e.to(device)
    return hit


def item_weights(spec: tuple, weights: torch.Tensor) -> torch.Tensor:
    """``W[w, t, m]``: the query's weight ``w`` of the dense row that is tied row ``t`` of item ``m`` (0: none)."""
    items, m, kind, mt, kind_t = spec
    pos, tied, item = (i.to(weights.device) for i in _item_rows(*spec))
    out = weights.new_zeros(count(mt, kind_t), items.items, weights.shape[0])
    return out.index_put((tied, item), weights.index_select(1, pos).T).permute(2, 0, 1)


def build_forward(graph: Graph, order: int, rules: dict, leaves: tuple, batch: Batching | None = None,
                  query=None, sparse: bool = True) -> tuple:
    """Steps computing the jets of each leaf in ``leaves``: ``(steps, block_shapes, results, expand, tied)``.

    ``expand[key]`` tells how to turn a result jet into xa's layout (:func:`expand`).
    With ``batch``, a batched value's jet is per sample, ``(M_k, samples, *v.shape')``
    (``'``: the sample dim left out), the sample label tied through every term;
    a shared value's jet (computed from shared leaves alone) has no sample label.

    With a ``query`` (:class:`xa.queries.Ask`, whose ``rows(n)`` is a :class:`Rows`;
    one leaf), each order keeps the query's rows only, the leaf's jet may be
    seeded with directions, and the top order may be collapsed to weighted
    sums; the results are the source's jets of every order in that layout,
    unexpanded (:mod:`xa.queries` reads them).

    With ``sparse``, a leaf whose items stay apart up to some node (:mod:`xa.sparsity`) has the jets of the
    values before that node kept per item, over the item's own entries: ``tied[leaf]`` is then
    ``(items, rows kept per item)``.
    """
    steps, shapes, results, expansions, sparse_ = [], {}, {}, {}, {}
    for leaf in leaves:
        n = graph.values[leaf].numel if batch is None else batch.numel(graph, leaf)
        rows_ = full_rows(n, order) if query is None else query.rows(n)
        tied = _tied(graph, rules, leaf, batch, rows_) if sparse else None
        found = dict(shapes)
        try:
            leaf_steps = _leaf_steps(graph, rows_, leaf, rules, found, batch, tied)
        except BatchMixingError:
            if tied is None:
                raise
            tied, found = None, dict(shapes)  # a higher-order factor does not keep the items apart: dense
            leaf_steps = _leaf_steps(graph, rows_, leaf, rules, found, batch, None)
        shapes.update(found)
        steps.extend(leaf_steps)
        if tied is not None:
            sparse_[leaf] = tied
        results[leaf] = [jet_key(leaf, 0, k) for k in range(1, order + 1)]
        for key in results[leaf]:
            shapes.setdefault(key, _jet_shape(graph, batch, 0, rows_, key[3]))
            if query is None:
                expansions[key] = (n, key[3])
    _retire_after_last_read(steps, {k for keys in results.values() for k in keys})
    return steps, shapes, results, expansions, sparse_


def expand(t: torch.Tensor, how: tuple) -> torch.Tensor:
    """A result jet ``(M_k, *rest)`` as ``(*rest, n, .., n)``: every ordering of each sorted row."""
    n, k = how
    full = t.index_select(0, index(n, k, "full", t.device)).reshape((n,) * k + t.shape[1:])
    return full.movedim(tuple(range(k)), tuple(range(full.dim() - k, full.dim())))


def _jet_shape(graph, batch, v, rows_: Rows, k) -> tuple:
    collapsed = rows_.collapse and k == rows_.order
    head = (rows_.collapse,) if collapsed else (count(rows_.m, rows_.kinds[k - 1]),)
    if batch is None:
        return head + graph.values[v].shape
    lead = () if batch.at[v] is None else (batch.size,)
    return head + lead + batch.shape(graph, v)


def _tied(graph: Graph, rules: dict, leaf: int, batch, rows_: Rows):
    """``(items, tied rows)`` where the leaf's items stay apart through some nodes (:mod:`xa.sparsity`), or
    ``None``: seeded directions span items; an order no row of which lies in one item."""
    if rows_.seeded:
        return None
    items = sparsity.find(graph, rules, leaf, batch)
    if items is None:
        return None
    wanted: dict = {}
    for k, kind in enumerate(rows_.kinds, start=1):
        if isinstance(kind, int):
            wanted[k] = ALL
            continue
        _, entry, _ = sparsity.within(items, _row_array(rows_.m, kind))
        wanted[k] = {tuple(r) for r in entry.tolist()}
        if not wanted[k]:
            return None
    kinds = closure(items.numel, wanted)
    embedded = zip(rows_.kinds[:-1], kinds[:-1]) if rows_.collapse else zip(rows_.kinds, kinds)
    if any(count(rows_.m, kind) * count(items.numel, kt) * items.items > EMBED_LIMIT for kind, kt in embedded):
        return None
    if not rows_.collapse:
        return items, Rows(items.numel, kinds)
    # a collapsed top order is collapsed per item too, with the query's weights of each item's rows
    weights = None if rows_.weights is None else (
        "item_weights_joint", items, rows_.m, rows_.kinds[-1], items.numel, kinds[-1], items.batch.size // items.items)
    return items, Rows(items.numel, kinds, collapse=rows_.collapse, weights=weights)


def tied_key(leaf: int, value: int, k: int) -> tuple:
    """The block of a value's jet kept per item (:mod:`xa.sparsity`)."""
    return ("tied", leaf, value, k)


def _leaf_steps(graph, rows_: Rows, leaf, rules, shapes, batch, tied=None) -> list:
    reach = sparsity.depends_on(graph, leaf, () if batch is None else batch.dead)
    jets = {leaf: {1: IDENTITY}}  # value -> {order k: block key or IDENTITY}
    items, rows_t = tied if tied is not None else (None, None)
    kept = {leaf: {1: IDENTITY}}  # the same for the jets kept per item
    steps = []
    for y in reversed(graph.order):
        v = graph.values[y]
        if v.leaf is not None or not reach[y]:
            continue
        inputs = tuple(i if i is not None and reach[i] else None for i in v.inputs)
        slots = [s for s, i in enumerate(inputs) if i is not None]
        factor = PlanFactors(graph, y, graph.rule(y, rules), graph.ctx(y, planning=True), inputs)
        step = Step(y, v.title)
        if items is not None and y in items.tied:
            sampled = BatchFactors(graph, items.batch, y, inputs, factor)
            _node_terms(step, graph, rows_t, leaf, y, factor, slots, inputs, kept, sampled, shapes, items.batch,
                        tied_key)
            if y == 0:  # the source itself keeps the items: its jets in the source's layout
                _embed(step, graph, rows_, rows_t, items, leaf, y, kept, jets, shapes, batch)
        else:
            for x in dict.fromkeys(inputs):
                if items is not None and x in items.tied and x not in jets:
                    _embed(step, graph, rows_, rows_t, items, leaf, x, kept, jets, shapes, batch)
            sampled = None if batch is None else BatchFactors(graph, batch, y, inputs, factor)
            _node_terms(step, graph, rows_, leaf, y, factor, slots, inputs, jets, sampled, shapes, batch, jet_key)
        factor.finish(step)
        _share_gathers(step)
        steps.append(step)
    return steps


def _node_terms(step, graph, rows_: Rows, leaf, y, factor, slots, inputs, jets, sampled, shapes, batch,
                key) -> None:
    """The Faa di Bruno terms of node ``y``'s jets of every order, appended to ``step``."""
    jets[y] = {}
    for k in range(1, rows_.order + 1):
        target = key(leaf, y, k)
        for p in range(1, k + 1):
            for part in set_partitions(tuple(range(k)), p):
                for choice in product(slots, repeat=p):
                    if any(len(b) not in jets[inputs[a]] for b, a in zip(part, choice)):
                        continue
                    pairs = sorted(zip(choice, part), key=lambda t: t[0])
                    f = factor(tuple(a for a, _ in pairs))
                    if f is None:
                        continue
                    step.terms.append(_jet_term(rows_, k, f, pairs, inputs, jets, target, sampled))
                    jets[y][k] = target
        if target in jets[y].values():
            shapes[target] = _jet_shape(graph, batch, y, rows_, k)


def _embed(step, graph, rows_: Rows, rows_t: Rows, items: Items, leaf, x, kept, jets, shapes, batch) -> None:
    """Terms writing value ``x``'s jets kept per item into its jets over the leaf's rows (a row across items: 0).

    The kept jet ``(rows per item, samples * items, *rest)`` is read as ``(t, [b], m, i, j)``, ``x`` being
    ``(i, [b], m, j)`` flattened, and written ``(r, [b], i, m, j)`` through a one-hot ``E[r, t, m]``; a
    collapsed top order, collapsed per item with the query's weights of each item's rows, is only permuted.
    """
    jets[x] = {}
    joint = items.batch.size
    samples = joint // items.items
    pre = items.batch.at[x]
    post = graph.values[x].numel // (pre * items.batch.total)
    for k, source in kept[x].items():
        lab = TermLabels()
        kind, kind_t = rows_.kinds[k - 1], rows_t.kinds[k - 1]
        collapsed = rows_.collapse and k == rows_.order
        t = lab.new(rows_t.collapse if collapsed else count(rows_t.m, kind_t))
        b = lab.new(samples) if batch is not None else None
        m, i, j = lab.new(items.items), lab.new(pre), lab.new(post)
        lead = (b,) if b is not None else ()
        target = jet_key(leaf, x, k)
        if collapsed:  # collapsed per item already: a permutation
            term = compile_term(lab, [(source, (t,) + lead + (m, i, j))], [], [], [t] + list(lead) + [i, m, j],
                                target, unit_sums=True, keep=(t,))
        else:
            r = lab.new(count(rows_.m, kind))
            ref = ("items", items, rows_.m, kind, rows_t.m, kind_t)
            term = compile_term(lab, [(source, (t,) + lead + (m, i, j))], [(ref, (r, t, m))], [],
                                [r] + list(lead) + [i, m, j], target, unit_sums=True, keep=(r,))
        term.gathers = (None,)
        step.terms.append(term)
        jets[x][k] = target
        shapes[target] = _jet_shape(graph, batch, x, rows_, k)


def _share_gathers(step: Step) -> None:
    """Number the step's distinct reads at sub-multi-indices: terms that read the same rows share one copy.

    An order-4 step reads ``J_x[2]`` at positions ``(0, 1)`` in several set partitions;
    each distinct (block, shape, rows) is gathered once per step, ``(axis, rows before, spec, id)``.
    """
    seen: dict = {}
    for term in step.terms:
        if term.gathers is None:
            continue
        shared = []
        for (key, shape), g in zip(term.sources, term.gathers):
            if g is not None:
                g = seen.setdefault((key, tuple(shape), g), g + (len(seen),))
            shared.append(g)
        term.gathers = tuple(shared)


def _jet_term(rows_: Rows, k, f, pairs, inputs, jets, target, sampled):
    lab = TermLabels()
    slots = tuple(a for a, _ in pairs)
    p, ins_p = None, (None,) * len(slots)
    if sampled is not None:
        f, p, ins_p = sampled.get(slots)
    shift, operands = lab.adopt(f, slots)
    ps = None if p is None else shift[p]
    if ps is not None:
        lab.sizes[ps] = sampled.batch.size
    m, kind = rows_.m, rows_.kinds[k - 1]
    q = rows_.collapse if k == rows_.order else 0
    alpha = lab.new(count(m, kind))  # the target's rows
    omega = lab.new(q) if q else None  # a collapsed target's weighted sums of them
    sources, gathers, constants = [], [], []
    for (a, block), port, pin in zip(pairs, f.ins, ins_p):
        kept = tuple(shift[i] for i in port if pin is None or i != pin)
        key = jets[inputs[a]][len(block)]
        if key == IDENTITY:  # d leaf / d leaf, read at a[pos]: a one-hot (rows, n), or the seeded directions
            if rows_.per_sample and sampled is not None:  # each sample's own directions: (rows, b, n')
                if pin is None:
                    raise QueryError("per-sample directions: the leaf does not carry the sample dim of batch_dim= "
                                     "(it is shared by every sample, as a weight is); each sample's own directions "
                                     "need a leaf with one slice per sample, such as the points")
                constants.append((("sample_seed", m, kind, block[0]), (alpha, ps) + kept))
                continue
            ref = ("seed", m, kind, block[0]) if rows_.seeded else ("onehot", m, kind, block[0])
            constants.append((ref, (alpha,) + kept))
            continue
        lead = (ps,) if pin is not None else ()
        if len(block) == k:  # the whole of the target's order from one input: its jet, row for row
            sources.append((key, ((omega,) if q else (alpha,)) + lead + kept))
            gathers.append(None)
            continue
        # the source is J_x[|B|] read at each target row's sub-multi-index a_B
        lower = rows_.kinds[len(block) - 1]
        sources.append((key, (alpha,) + lead + kept))
        read_all = _reads_in_order(m, kind, tuple(block), lower)  # (a Laplacian's J_x[i] at (i, i)): no copy
        gathers.append(None if read_all else (0, count(m, lower), (m, kind, tuple(block), lower)))
    head = [omega] if q else [alpha]
    if q and (constants or any(g is not None or labels[0] == alpha for (_, labels), g in zip(sources, gathers))):
        if rows_.weights is None:  # every weight one: the rows are summed (the target's one row is left out)
            head = []
        else:  # sum the rows with the query's weights (per sample and item where the jets are kept per item)
            constants.append((rows_.weights, (omega, alpha) if len(rows_.weights) == 1 else (omega, alpha, ps)))
    out = head + ([ps] if ps is not None else []) + [shift[i] for i in f.out if shift[i] != ps]
    # the rows' label stays, even of size one, where a gather reads along it; a collapsed target of one
    # row (u_xx alone at the top order) sums it with its weight: then a broadcast product, not a matmul
    keep = (alpha,) if any(g is not None for g in gathers) or not q else ()
    term = compile_term(lab, sources, operands + constants, [slots], out, target, unit_sums=True, keep=keep)
    term.gathers = tuple(gathers)  # the constants follow the factor refs in term.operands
    if sampled is not None:
        term.views = tuple(operand_views(f, operands, ps)) + (None,) * len(constants)
    return term


def _retire_after_last_read(steps: list, keep: set) -> None:
    last: dict = {}
    for index, step in enumerate(steps):
        for term in step.terms:
            for key, _ in term.sources:
                last[key] = index
    for key, index in last.items():
        if key not in keep:
            steps[index].retire.append(key)


# ---------------------------------------------------------------- a query's rows


@dataclass(frozen=True)
class Ask:
    """The structure of a query: what its plan depends on (in the plan key); no values.

    ``wanted[k - 1]`` lists the patterns of rows asked at order ``k``: ``"all"``,
    ``"diagonal"``, ``("rows", sorted multi-indices)``, ``("rank", offset, r)``
    (the diagonal rows of ``r`` seeded directions). ``identity``: the leaf's own
    entries are directions; ``extra``: how many seeded directions follow them.
    ``collapse``: the top order is kept as that many weighted sums; ``unit``: one sum, every weight one
    (the Laplacian's: the rows are summed, no weights read). ``per_sample``: the
    seeded directions are each sample's own (``(B, m, n')`` at execution). A pattern
    ``("mixed", offset, r, k)`` asks the rows ``(o + j k, o + j k + 1, .., o + j k + k - 1)``
    for ``j < r``: ``d^k S [d_(o + j k), .., d_(o + j k + k - 1)]``, mixed along ``k``
    seeded directions each (an estimator's terms, :mod:`xa.sampling`).
    """

    name: str
    wanted: tuple
    identity: bool = True
    extra: int = 0
    collapse: int = 0
    per_sample: bool = False
    unit: bool = False

    @property
    def order(self) -> int:
        return len(self.wanted)

    def rows(self, n: int) -> Rows:
        return _rows(self, n)


@lru_cache(maxsize=256)
def _rows(ask: Ask, n: int) -> Rows:
    ni = n if ask.identity else 0
    m = ni + ask.extra
    wanted: dict = {}
    for k, patterns in enumerate(ask.wanted, start=1):
        if not patterns:
            continue
        if "all" in patterns and m == n:
            wanted[k] = ALL
            continue
        here: set = set()
        for pat in patterns:
            if pat == "all":
                here |= set(multi_indices(n, k)[0])
            elif pat == "diagonal":
                here |= {(i,) * k for i in range(n)}
            elif pat == "pairs":  # (i, i, j, j): the biharmonic's rows
                here |= {(i, i, j, j) for i in range(n) for j in range(i, n)}
            elif pat[0] == "rows":
                for a in pat[1]:
                    if a[0] < 0 or a[-1] >= n:
                        raise QueryError(f"{ask.name}: the multi-index {a} names an entry outside the leaf's "
                                         f"{n} entries (entries are 0..{n - 1} of the leaf flattened, one "
                                         "sample's with batch_dim)")
                here |= set(pat[1])
            elif pat[0] == "mixed":  # ("mixed", offset, r, k): k seeded directions per row
                first = ni + pat[1]
                here |= {tuple(range(first + j * k, first + (j + 1) * k)) for j in range(pat[2])}
            else:  # ("rank", offset, r)
                here |= {(ni + pat[1] + j,) * k for j in range(pat[2])}
        wanted[k] = here
    return Rows(m, closure(m, wanted), seeded=ask.extra > 0, collapse=ask.collapse, per_sample=ask.per_sample,
                weights=None if ask.unit and ask.collapse == 1 else ("weights",))

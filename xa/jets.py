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
from functools import lru_cache
from itertools import combinations_with_replacement, product

import torch

from .batch import BatchFactors, Batching, operand_views
from .capture import Graph
from .terms import PlanFactors, Step, TermLabels, compile_term, set_partitions

IDENTITY = "identity"


def jet_key(leaf: int, value: int, k: int) -> tuple:
    return ("jet", leaf, value, k)


@lru_cache(maxsize=256)
def multi_indices(n: int, k: int) -> tuple:
    """The sorted multi-indices of order ``k`` over ``n`` entries, in order, and their positions."""
    rows = tuple(combinations_with_replacement(range(n), k))
    return rows, {row: r for r, row in enumerate(rows)}


def rows(n: int, k: int) -> int:
    """``C(n + k - 1, k)``: how many sorted multi-indices there are."""
    return math.comb(n + k - 1, k)


def query_rows(n: int, query: str) -> tuple:
    """The multi-indices a collapsed query sums: ``"laplacian"``, the diagonal ``(i, i)`` of order 2."""
    if query == "laplacian":
        return tuple((i, i) for i in range(n))
    raise ValueError(f"unknown query {query!r}")


def _rows_of(n: int, k) -> tuple:
    """The rows of a jet: every sorted multi-index of order ``k``, or a query's (``k = ("query", name)``)."""
    return query_rows(n, k[1]) if isinstance(k, tuple) else multi_indices(n, k)[0]


@lru_cache(maxsize=1024)
def _index_cpu(n: int, k, block: tuple) -> torch.Tensor:
    """For each row ``a`` of order ``k`` (all sorted ones, or a query's): the row of ``a_block`` among its order's."""
    if block == "full":  # every (unsorted) k-tuple -> its sorted row: the expansion to n^k
        _, where = multi_indices(n, k)
        return torch.tensor([where[tuple(sorted(t))] for t in product(range(n), repeat=k)], dtype=torch.long,
                            device="cpu")
    _, where = multi_indices(n, len(block))
    return torch.tensor([where[tuple(a[p] for p in block)] for a in _rows_of(n, k)], dtype=torch.long, device="cpu")


@lru_cache(maxsize=1024)
def _reads_in_order(n: int, k, block: tuple) -> bool:
    """Reading order-|block| rows at ``block`` of each row of ``k`` is every row once, in order."""
    return _index_cpu(n, k, block).tolist() == list(range(rows(n, len(block))))


_ON_DEVICE: dict = {}


def index(n: int, k: int, block, device) -> torch.Tensor:
    """:func:`_index_cpu` on ``device``, kept (a handful of small index tensors per plan)."""
    key = (n, k, block, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        hit = _index_cpu(n, k, block).to(device)
        if len(_ON_DEVICE) > 4096:
            _ON_DEVICE.clear()
        _ON_DEVICE[key] = hit
    return hit


def onehot(n: int, k: int, pos: int, dtype, device) -> torch.Tensor:
    """``E[a, i] = [a[pos] == i]`` over the rows ``a`` of order ``k`` (or a query's): the leaf's identity jet."""
    key = ("onehot", n, k, pos, dtype, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        rows_k = _rows_of(n, k)
        at = torch.tensor([a[pos] for a in rows_k], dtype=torch.long, device="cpu")
        hit = torch.zeros(len(rows_k), n, dtype=dtype, device="cpu").scatter_(1, at[:, None], 1.0).to(device)
        _ON_DEVICE[key] = hit
    return hit


def build_forward(graph: Graph, order: int, rules: dict, leaves: tuple, batch: Batching | None = None,
                  query: str | None = None) -> tuple:
    """Steps computing the jets of each leaf in ``leaves``: ``(steps, block_shapes, results, expand)``.

    ``expand[key]`` tells how to turn a result jet into xa's layout (:func:`expand`).
    With ``batch``, a batched value's jet is per sample, ``(M_k, samples, *v.shape')``
    (``'``: the sample dim left out), the sample label tied through every term;
    a shared value's jet (computed from shared leaves alone) has no sample label.

    With a ``query`` (:func:`query_rows`), the jets of order ``order`` are
    *collapsed*: each holds the sum of the query's rows only, ``(*v.shape)``, and
    is pushed through every node from the lower-order jets and its inputs'
    collapsed jets (collapsed Taylor mode); the result is the source's.
    """
    steps, shapes, results, expansions = [], {}, {}, {}
    for leaf in leaves:
        leaf_steps = _leaf_steps(graph, order, leaf, rules, shapes, batch, query)
        steps.extend(leaf_steps)
        if query is not None:
            results[leaf] = [jet_key(leaf, 0, order)]
            shapes.setdefault(results[leaf][0], _jet_shape(graph, batch, 0, leaf, order, collapsed=True))
            continue
        results[leaf] = [jet_key(leaf, 0, k) for k in range(1, order + 1)]
        n = graph.values[leaf].numel if batch is None else batch.numel(graph, leaf)
        for key in results[leaf]:
            shapes.setdefault(key, _jet_shape(graph, batch, 0, leaf, key[3]))
            expansions[key] = (n, key[3])
    _retire_after_last_read(steps, {k for keys in results.values() for k in keys})
    return steps, shapes, results, expansions


def expand(t: torch.Tensor, how: tuple) -> torch.Tensor:
    """A result jet ``(M_k, *rest)`` as ``(*rest, n, .., n)``: every ordering of each sorted row."""
    n, k = how
    full = t.index_select(0, index(n, k, "full", t.device)).reshape((n,) * k + t.shape[1:])
    return full.movedim(tuple(range(k)), tuple(range(full.dim() - k, full.dim())))


def _jet_shape(graph, batch, v, leaf, k, collapsed=False) -> tuple:
    n = graph.values[leaf].numel if batch is None else batch.numel(graph, leaf)
    head = () if collapsed else (rows(n, k),)
    if batch is None:
        return head + graph.values[v].shape
    lead = () if batch.at[v] is None else (batch.size,)
    return head + lead + batch.shape(graph, v)


def _depends_on(graph: Graph, leaf: int) -> list:
    reach = [False] * len(graph.values)
    for i in reversed(graph.order):
        reach[i] = i == leaf or any(j is not None and reach[j] for j in graph.values[i].inputs)
    return reach


def _leaf_steps(graph, order, leaf, rules, shapes, batch, query=None) -> list:
    reach = _depends_on(graph, leaf)
    n_leaf = graph.values[leaf].numel if batch is None else batch.numel(graph, leaf)
    jets = {leaf: {1: IDENTITY}}  # value -> {order k: block key or IDENTITY}
    steps = []
    for y in reversed(graph.order):
        v = graph.values[y]
        if v.leaf is not None or not reach[y]:
            continue
        inputs = tuple(i if i is not None and reach[i] else None for i in v.inputs)
        slots = [s for s, i in enumerate(inputs) if i is not None]
        factor = PlanFactors(graph, y, graph.rule(y, rules), graph.ctx(y, planning=True), inputs)
        sampled = None if batch is None else BatchFactors(graph, batch, y, inputs, factor)
        step = Step(y, v.name)
        jets[y] = {}
        for k in range(1, order + 1):
            target = jet_key(leaf, y, k)
            collapse = query if k == order else None
            for p in range(1, k + 1):
                for part in set_partitions(tuple(range(k)), p):
                    for choice in product(slots, repeat=p):
                        if any(len(b) not in jets[inputs[a]] for b, a in zip(part, choice)):
                            continue
                        pairs = sorted(zip(choice, part), key=lambda t: t[0])
                        f = factor(tuple(a for a, _ in pairs))
                        if f is None:
                            continue
                        step.terms.append(_jet_term(n_leaf, k, f, pairs, inputs, jets, target, sampled,
                                                    collapse))
                        jets[y][k] = target
            if target in jets[y].values():
                shapes[target] = _jet_shape(graph, batch, y, leaf, k, collapsed=collapse is not None)
        factor.finish(step)
        steps.append(step)
    return steps


def _jet_term(n_leaf, k, f, pairs, inputs, jets, target, sampled, collapse=None):
    lab = TermLabels()
    slots = tuple(a for a, _ in pairs)
    p, ins_p = None, (None,) * len(slots)
    if sampled is not None:
        f, p, ins_p = sampled.get(slots)
    shift, operands = lab.adopt(f, slots)
    ps = None if p is None else shift[p]
    if ps is not None:
        lab.sizes[ps] = sampled.batch.size
    # the target's rows: every sorted multi-index of order k, or a collapsed query's rows (summed)
    kind = k if collapse is None else ("query", collapse)
    alpha = lab.new(rows(n_leaf, k) if collapse is None else len(query_rows(n_leaf, collapse)))
    sources, gathers, constants = [], [], []
    for (a, block), port, pin in zip(pairs, f.ins, ins_p):
        kept = tuple(shift[i] for i in port if pin is None or i != pin)
        key = jets[inputs[a]][len(block)]
        if key == IDENTITY:  # d leaf / d leaf, read at a[pos]: a one-hot (rows, n) on the leaf's own port
            constants.append((("onehot", n_leaf, kind, block[0]), (alpha,) + kept))
            continue
        lead = (ps,) if pin is not None else ()
        if len(block) == k:  # the whole of the target's order from one input: its jet, row for row
            sources.append((key, (() if collapse else (alpha,)) + lead + kept))
            gathers.append(None)
            continue
        # the source is J_x[|B|] (rows M_|B|) read at each target row's sub-multi-index a_B
        sources.append((key, (alpha,) + lead + kept))
        read_all = _reads_in_order(n_leaf, kind, tuple(block))  # (a Laplacian's J_x[i] at (i, i)): no copy
        gathers.append(None if read_all else (0, rows(n_leaf, len(block)), (n_leaf, kind, tuple(block))))
    head = [] if collapse else [alpha]  # a collapsed target sums its rows: alpha is not an output label
    out = head + ([ps] if ps is not None else []) + [shift[i] for i in f.out if shift[i] != ps]
    term = compile_term(lab, sources, operands + constants, [slots], out, target)
    term.gathers = tuple(gathers)  # the one-hot constants follow the factor refs in term.operands
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



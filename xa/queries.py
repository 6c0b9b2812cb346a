"""Queries on the derivative tensor, answered without building it.

A query asks for a few numbers made from ``d^k S / dx^k`` of one leaf ``x``:
its trace (the Laplacian), chosen entries (``u_xx``, ``u_xxyy``), a
contraction with coefficient tensors per order (any linear differential
operator), its contraction with ``v, .., v`` (directional jets). All are

    sum over k, over sorted multi-indices a over m directions:  W_k[a] * J_k[a],
    J_k[a] = d^k S [d_(a_1), .., d_(a_k)]

for directions ``d`` that are the leaf's entries, given vectors, or both.
Forward jets (:mod:`xa.jets`) keep only the rows ``a`` a query needs at each
order -- those it names and their sub-multi-indices, which Faa di Bruno reads
-- and the top order is *collapsed*: each node keeps the weighted sum
``sum_a W_K[a] J_K[a]`` itself, pushed through by Faa di Bruno,

    L_y = f' L_x + sum over the other partitions of W_K[a] f^(p) prod J_x[|B|][a_B],

so a Laplacian costs about ``n + 1`` rows per node, never the ``n x n`` Hessian
(collapsed Taylor mode, Dangel et al. 2024). The rows are the plan's
structure (in its key); directions and coefficients are values, read at
execution. ``direction="auto"`` also prices the backward plan of the whole
tensor, contracted at the leaf, and runs the cheaper.

Mixed partials across leaves (``d^(j+l) S / dA^j dB^l``) are backprop's
joint blocks (:mod:`xa.backprop`), kept for the leaves asked together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from . import attach
from . import plan as planner
from .api import _budget, _check_batch_dim, _check_direction, _check_order, _overrides, _recording
from .capture import Graph
from .errors import QueryError, TargetError
from .jets import ALL, Rows, closure, count, index, multi_indices, rows_of, where

__all__ = ["laplacian", "biharmonic", "partials", "differential_operator", "directional", "mixed", "Laplacian",
           "Biharmonic", "Partials", "Operator", "Directional", "Mixed", "Diagonal", "RankOne", "Query"]

# --------------------------------------------------------------------------- coefficients


class Diagonal:
    """The coefficient tensor ``C[i, .., i] = c[i]``, zero elsewhere (``c`` a number or a vector over the leaf)."""

    def __init__(self, c=1.0):
        self.c = c

    def __repr__(self):
        return f"Diagonal({self.c!r})"


class RankOne:
    """The coefficient tensor ``sum_r v_r ⊗ .. ⊗ v_r`` for vectors ``v`` of shape ``(n,)`` or ``(r, n)``.

    At order ``k`` it asks for ``d^k S [v_r, .., v_r]``: a directional jet, seeded with ``v``.
    """

    def __init__(self, v: torch.Tensor):
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2):
            raise TypeError("RankOne takes a tensor of shape (n,) or (r, n), got "
                            f"{type(v).__name__ if not isinstance(v, torch.Tensor) else list(v.shape)}")
        self.v = v if v.dim() == 2 else v[None]

    def __repr__(self):
        return f"RankOne({list(self.v.shape)})"


def _pattern(k: int, c, offset: int):
    """The structure of one order's coefficient (in the plan key): rows it reads, never its values."""
    if isinstance(c, Diagonal):
        return "diagonal"
    if isinstance(c, RankOne):
        return ("rank", offset, c.v.shape[0])
    if isinstance(c, dict):
        rows = set()
        for e in c:
            e = (e,) if isinstance(e, int) else tuple(e)
            if len(e) != k or not all(isinstance(i, int) for i in e):
                raise QueryError(f"coefficients[{k}]: the entry {e!r} is not a multi-index of {k} ints")
            rows.add(tuple(sorted(e)))
        return ("rows", tuple(sorted(rows)))
    if isinstance(c, torch.Tensor):
        return "all"
    raise TypeError(f"coefficients[{k}] must be a tensor of shape (n,)*{k}, xa.queries.Diagonal, "
                    f"xa.queries.RankOne or a dict {{multi-index: number}}, got {type(c).__name__}")


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Ask:
    """The structure of a query: what its plan depends on (in the plan key); no values.

    ``wanted[k - 1]`` lists the patterns of rows asked at order ``k``: ``"all"``,
    ``"diagonal"``, ``("rows", sorted multi-indices)``, ``("rank", offset, r)``
    (the diagonal rows of ``r`` seeded directions). ``identity``: the leaf's own
    entries are directions; ``extra``: how many seeded directions follow them.
    ``collapse``: the top order is kept as that many weighted sums.
    """

    name: str
    wanted: tuple
    identity: bool = True
    extra: int = 0
    collapse: int = 0

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
            else:  # ("rank", offset, r)
                here |= {(ni + pat[1] + j,) * k for j in range(pat[2])}
        wanted[k] = here
    return Rows(m, closure(m, wanted), seeded=ask.extra > 0, collapse=ask.collapse)


class Query:
    """A query on the derivative tensor of ``source`` w.r.t. the leaf ``wrt``; its subclasses say what it asks."""

    wrt: torch.Tensor

    def ask(self) -> Ask:
        raise NotImplementedError

    def seeds(self, rows: Rows, n: int, dtype, device) -> dict:
        """The values read at execution: the seeded directions ``(m, n)``, the top order's weights."""
        return {}

    def answer(self, jets: list, rows: Rows, n: int, like, seeds: dict):
        """The answer from the source's jets per order (rows, or the collapsed sums, first) and :meth:`seeds`."""
        raise NotImplementedError


def _directions(rank_ones, identity: bool, n: int, dtype, device) -> torch.Tensor:
    parts = [torch.eye(n, dtype=dtype, device=device)] if identity else []
    for c in rank_ones:
        v = c.v.to(dtype=dtype, device=device)
        if v.shape[1] != n:
            raise QueryError(f"RankOne: the vectors have {v.shape[1]} entries, the leaf has {n}"
                             f"{' per sample' if identity else ''}")
        parts.append(v)
    return torch.cat(parts)


def _weights(k: int, c, pattern, rows: Rows, n: int, ni: int, dtype, device) -> torch.Tensor:
    """``W_k`` over the rows of order ``k``: the symmetrised coefficient, ``sum`` over orderings of each row."""
    kind = rows.kinds[k - 1]
    at = where(rows.m, kind)
    w = torch.zeros(count(rows.m, kind), dtype=dtype, device=device)
    if pattern == "all":
        c = c.to(dtype=dtype, device=device)
        if tuple(c.shape) != (n,) * k:
            raise QueryError(f"coefficients[{k}] has shape {list(c.shape)}; a dense coefficient of order {k} "
                             f"is ({', '.join([str(n)] * k)}) for a leaf of {n} entries")
        full = torch.zeros(math.comb(n + k - 1, k), dtype=dtype, device=device)
        full.index_add_(0, index(n, k, "full", device), c.reshape(-1))
        if isinstance(kind, int) and rows.m == n:
            return full
        pos = torch.tensor([at[a] for a in multi_indices(n, k)[0]], dtype=torch.long, device=device)
        return w.index_add_(0, pos, full)
    if pattern == "diagonal":
        cc = torch.as_tensor(c.c, dtype=dtype, device=device)
        if cc.dim() > 1 or (cc.dim() == 1 and cc.shape[0] != n):
            raise QueryError(f"coefficients[{k}]: Diagonal takes a number or a vector of {n} entries, "
                             f"got shape {list(cc.shape)}")
        pos = torch.tensor([at[(i,) * k] for i in range(n)], dtype=torch.long, device=device)
        return w.index_put_((pos,), cc.expand(n).clone(), accumulate=True)
    if pattern[0] == "rank":
        pos = torch.tensor([at[(ni + pattern[1] + j,) * k] for j in range(pattern[2])], dtype=torch.long,
                           device=device)
        return w.index_fill_(0, pos, 1.0)
    # entries {multi-index: coefficient}: each adds to its sorted row
    pos = torch.tensor([at[tuple(sorted((e,) if isinstance(e, int) else e))] for e in c], dtype=torch.long,
                       device=device)
    values = list(c.values())
    if all(isinstance(v, (int, float)) for v in values):
        values = torch.tensor(values, dtype=dtype, device=device)
    else:
        values = torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])
    return w.index_add_(0, pos, values)


class Operator(Query):
    """``sum_k sum C_k[i_1..i_k] d^k S / dx_(i_1) .. dx_(i_k)``: a linear differential operator, shaped like S.

    ``coefficients`` maps each order ``k >= 1`` to a dense tensor ``(n,)*k``, a
    :class:`Diagonal`, a :class:`RankOne`, or a dict ``{multi-index: number}``.
    """

    def __init__(self, wrt, coefficients: dict, name: str = "operator"):
        if not isinstance(coefficients, dict) or not coefficients:
            raise TypeError("coefficients must be a non-empty dict {order: coefficient}, got "
                            f"{type(coefficients).__name__}")
        for k in coefficients:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise QueryError(f"coefficients: the order {k!r} is not a positive int")
        self.wrt, self.coefficients, self.name = wrt, dict(sorted(coefficients.items())), name
        self.rank_ones = [c for c in self.coefficients.values() if isinstance(c, RankOne)]
        offset, self.patterns = 0, {}
        for k, c in self.coefficients.items():
            self.patterns[k] = _pattern(k, c, offset)
            if isinstance(c, RankOne):
                offset += c.v.shape[0]
        self.extra = offset
        self.identity = any(not isinstance(c, RankOne) for c in self.coefficients.values())

    def ask(self) -> Ask:
        top = max(self.coefficients)
        wanted = tuple((self.patterns[k],) if k in self.patterns else () for k in range(1, top + 1))
        return Ask(self.name, wanted, self.identity, self.extra, collapse=1)

    def seeds(self, rows, n, dtype, device) -> dict:
        """Every order's weights (``"orders"``, summed at the end), the top order's as ``"weights"``."""
        ni = n if self.identity else 0
        orders = {k: _weights(k, c, self.patterns[k], rows, n, ni, dtype, device)
                  for k, c in self.coefficients.items()}
        out = {"weights": orders[rows.order][None], "orders": orders}
        if rows.seeded:
            out["directions"] = _directions(self.rank_ones, self.identity, n, dtype, device)
        return out

    def answer(self, jets, rows, n, like, seeds):
        total = None
        for k, w in seeds["orders"].items():
            t = jets[k - 1]
            if t is None:
                continue
            part = t[0] if k == rows.order else torch.tensordot(w.to(t.dtype), t, dims=([0], [0]))
            total = part if total is None else total + part
        return like(total)


class Laplacian(Operator):
    """``sum_i d^2 S / dx_i^2``, shaped like S."""

    def __init__(self, wrt):
        super().__init__(wrt, {2: Diagonal(1.0)}, name="laplacian")


class Biharmonic(Query):
    """``sum_(i,j) d^4 S / dx_i^2 dx_j^2``: the Laplacian of the Laplacian, shaped like S."""

    def __init__(self, wrt):
        self.wrt = wrt

    def ask(self) -> Ask:
        return Ask("biharmonic", ((), (), (), ("pairs",)), collapse=1)

    def seeds(self, rows, n, dtype, device):
        # the top order keeps exactly the rows (i, i, j, j), i <= j: u_iijj is summed once for i = j, twice else
        weights = [1.0 if a[0] == a[3] else 2.0 for a in rows_of(rows.m, rows.kinds[3])]
        return {"weights": torch.tensor([weights], dtype=dtype, device=device)}

    def answer(self, jets, rows, n, like, seeds):
        return like(None if jets[3] is None else jets[3][0])


class Partials(Query):
    """Chosen entries ``d^k S / dx_(i_1) .. dx_(i_k)``, one tensor shaped like S per multi-index."""

    def __init__(self, wrt, indices: Sequence):
        if isinstance(indices, (int, tuple)) or not isinstance(indices, Sequence) or not indices:
            raise TypeError("indices must be a non-empty list of multi-indices (tuples of entry positions), "
                            f"got {indices!r}")
        self.wrt, self.indices = wrt, []
        for a in indices:
            a = (a,) if isinstance(a, int) and not isinstance(a, bool) else a
            if not isinstance(a, tuple) or not a or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in a):
                raise QueryError(f"partials: {a!r} is not a multi-index (a non-empty tuple of entry positions)")
            self.indices.append(tuple(sorted(a)))

    def ask(self) -> Ask:
        top = max(len(a) for a in self.indices)
        wanted = tuple(tuple(("rows", (a,)) for a in sorted({a for a in self.indices if len(a) == k}))
                       for k in range(1, top + 1))
        return Ask("partials", wanted)

    def answer(self, jets, rows, n, like, seeds):
        out = []
        for a in self.indices:
            t = jets[len(a) - 1]
            out.append(like(None if t is None else t[where(rows.m, rows.kinds[len(a) - 1])[a]]))
        return tuple(out)


class Directional(Query):
    """``d^k S [v, .., v]`` for k = 1..order and each direction ``v`` (the Taylor coefficients times ``k!``)."""

    def __init__(self, wrt, directions: torch.Tensor, order: int):
        if not isinstance(directions, torch.Tensor) or directions.dim() < 1:
            raise TypeError("directions must be a tensor: one direction, 1-d with the leaf's n entries (one "
                            "sample's with batch_dim), or m of them, (m, n) or (m, *one sample's shape)")
        self.wrt, self.order = wrt, _check_order(order)
        self.single = directions.dim() == 1
        self.v = directions[None] if self.single else directions.reshape(directions.shape[0], -1)

    def ask(self) -> Ask:
        m = self.v.shape[0]
        return Ask("directional", tuple((("rank", 0, m),) for _ in range(self.order)), identity=False, extra=m)

    def seeds(self, rows, n, dtype, device):
        if self.v.shape[1] != n:
            raise QueryError(f"directional: each direction has {self.v.shape[1]} entries, the leaf has {n} "
                             "(per sample with batch_dim)")
        return {"directions": self.v.to(dtype=dtype, device=device)}

    def answer(self, jets, rows, n, like, seeds):
        out = []
        m = self.v.shape[0]
        for t in jets:
            t = torch.stack([like(None if t is None else t[r]) for r in range(m)])
            out.append(t[0] if self.single else t)
        return tuple(out)


# --------------------------------------------------------------------------- running a query


def _leaf(graph: Graph, wrt, what: str) -> int:
    if not isinstance(wrt, torch.Tensor):
        raise TypeError(f"{what}: wrt must be a torch.Tensor, got {type(wrt).__name__}")
    i = graph.find(wrt)
    if i is None or graph.values[i].leaf is None:
        why = "is not a leaf of the source's graph" if i is None else "is an intermediate tensor, not a leaf"
        raise TargetError(f"{what}: wrt (shape {list(wrt.shape)}) {why}; a query is taken w.r.t. a leaf "
                          "that requires grad and that the source depends on")
    return i


def _prepare(source, wrt, what, batch_dim, configurations):
    batch_dim = _check_batch_dim(batch_dim, source)
    overrides = _overrides(configurations)
    graph = Graph(source)
    leaves = tuple(_leaf(graph, w, what) for w in wrt)
    if batch_dim is not None and graph.source_shape[batch_dim] == 1:
        batch_dim = None  # one sample: the whole graph's answer is that sample's
    return graph, graph.rules(overrides), leaves, batch_dim


def plan_query(graph: Graph, rules: dict, i: int, query: Query, batch_dim, direction: str = "auto"):
    """The plan that answers ``query``: forward jets of its rows, or (cheaper) backprop of the whole tensor.

    ``plan.prices`` holds both: ``"forward"`` (the query's rows) and ``"backward"`` (the whole
    derivative tensor, contracted at the leaf); ``plan.full_price``, the forward jets of the whole tensor.
    """
    ask = query.ask()
    forward = planner.build(graph, ask.order, rules, (i,), (), "forward", batch_dim=batch_dim, query=ask)
    prices = {"forward": forward.flops}
    chosen = forward
    if direction in ("auto", "backward"):
        backward = planner.build(graph, ask.order, rules, (i,), (), "backward", batch_dim=batch_dim)
        prices["backward"] = backward.flops + backward.result_elements  # the contraction at the leaf
        if direction == "backward" or prices["backward"] < prices["forward"]:
            chosen = backward
    return dataclasses.replace(chosen, prices=prices)


def explain_query(source, query: Query, configurations, direction, batch_dim) -> tuple:
    """``(graph, plan, lines)`` for :func:`xa.explain`: the query's plan, its rows, its price against the whole."""
    if not isinstance(query, Query):
        raise TypeError(f"query must be one of xa.queries' queries (Laplacian, Partials, Operator, Biharmonic, "
                        f"Directional, Mixed), got {type(query).__name__}")
    if isinstance(query, Mixed):
        return _explain_mixed(source, query, configurations, batch_dim)
    direction = _check_direction(direction)
    ask = query.ask()
    graph, rules, (i,), batch_dim = _prepare(source, (query.wrt,), ask.name, batch_dim, configurations)
    plan = plan_query(graph, rules, i, query, batch_dim, direction)
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    rows = ask.rows(n)
    whole = planner.build(graph, ask.order, rules, (i,), (), "forward", batch_dim=batch_dim)
    backward = plan.prices.get("backward")
    per = " per sample" if batch is not None else ""
    lines = [f"query: {ask.name} of the source w.r.t. leaf #{i} ({n} entries{per}), order {ask.order}, "
             f"answered by {plan.direction} {'jets of its rows' if plan.direction == 'forward' else 'backprop'}"]
    dirs = f"{rows.m} seeded directions" if rows.seeded else f"the leaf's {rows.m} entries"
    kept = []
    for k, kind in enumerate(rows.kinds, start=1):
        note = f" summed into {rows.collapse} on the fly (collapsed)" if rows.collapse and k == rows.order else ""
        kept.append(f"order {k}: {count(rows.m, kind)} of {math.comb(rows.m + k - 1, k)}{note}")
    lines.append(f"rows kept (sorted multi-indices over {dirs}): " + "; ".join(kept))
    full = min(whole.flops, backward if backward is not None else whole.flops)
    lines.append(f"FLOPs: forward (the query's rows) {plan.prices['forward']:.4g}"
                 + (f", backward (the whole tensor, contracted at the leaf) {backward:.4g}" if backward else "")
                 + f"; the whole derivative tensor by forward jets: {whole.flops:.4g}; "
                 f"this plan: {plan.flops:.4g} ({full / max(plan.flops, 1):.3g}x fewer than the whole tensor's "
                 "cheaper plan)")
    return graph, plan, lines


def _like(graph: Graph, plan, dtype):
    """Turn one row of the source's jet (``(*S)``, or ``(B, *S')`` per sample) into the source's shape."""
    shape = graph.source_shape

    def like(t):
        if t is None:
            return torch.zeros(shape, dtype=dtype, device=graph.device)
        if plan.batch is not None:
            d = plan.batch.source_dim
            t = t.reshape((shape[d],) + shape[:d] + shape[d + 1:]).movedim(0, d)
        return t.reshape(shape).to(dtype)
    return like


def _rows_from_blocks(graph, plan, i, blocks, rows: Rows, seeds: dict) -> list:
    """The whole tensor's blocks read at a query's rows, laid out like the forward jets (backward direction)."""
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    lead = graph.source_shape if batch is None else (batch.total,) + batch.shape(graph, 0)
    out = []
    for k, t in enumerate(attach.flat(graph, i, rows.order, blocks, batch), start=1):
        kind = rows.kinds[k - 1]
        rows_k = rows_of(rows.m, kind)
        t = t.to(graph.dtype)
        if not rows.seeded:
            at = torch.tensor([sum(a[p] * n ** (k - 1 - p) for p in range(k)) for a in rows_k], dtype=torch.long,
                              device=t.device)
            r = t.reshape(t.shape[:t.dim() - k] + (n ** k,)).index_select(-1, at).movedim(-1, 0)
        else:  # d^k S [d_(a_1), .., d_(a_k)]: contract one leaf position at a time with each row's direction
            size = math.prod(t.shape[:t.dim() - k])
            r = t.reshape(size, n, n ** (k - 1))
            for p in range(k):
                at = torch.tensor([a[p] for a in rows_k], dtype=torch.long, device=t.device)
                Dp = seeds["directions"].index_select(0, at)
                if p == 0:
                    r = torch.einsum("lir,ai->alr", r, Dp)
                else:
                    r = torch.einsum("alir,ai->alr", r.reshape(len(rows_k), size, n, -1), Dp)
        r = r.reshape((len(rows_k),) + tuple(lead))
        if rows.collapse and k == rows.order:
            r = torch.tensordot(seeds["weights"].to(r.dtype), r, dims=([1], [0]))
        out.append(r)
    return out


def _answer(source, query: Query, batch_dim, configurations, max_memory, direction, create_graph):
    record = _recording(create_graph)
    direction = _check_direction(direction)
    with torch.set_grad_enabled(record):
        return _run_query(source, query, batch_dim, configurations, max_memory, direction)


def _run_query(source, query: Query, batch_dim, configurations, max_memory, direction):
    what = query.ask().name
    graph, rules, (i,), batch_dim = _prepare(source, (query.wrt,), what, batch_dim, configurations)
    plan = plan_query(graph, rules, i, query, batch_dim, direction)
    batch = plan.batch
    n = graph.values[i].numel if batch is None else batch.numel(graph, i)
    ask = query.ask()
    rows = ask.rows(n)
    seeds = query.seeds(rows, n, graph.dtype, graph.device)
    budget = _budget(max_memory, graph.device)
    if plan.direction == "forward":
        plan, results, _ = attach.compute(graph, ask.order, rules, (i,), (), "forward", budget, batch_dim,
                                          query=ask, seeds=seeds, caller=_caller(what))
        jets = results[i]
    else:
        plan, results, _ = attach.compute(graph, ask.order, rules, (i,), (), "backward", budget, batch_dim,
                                          caller=_caller(what))
        jets = _rows_from_blocks(graph, plan, i, results[i], rows, seeds)
    return query.answer(jets, rows, n, _like(graph, plan, source.dtype), seeds)


def _caller(name: str) -> str:
    """The public function that answers a query named ``name``, as messages show it."""
    return "xa." + {"operator": "differential_operator"}.get(name, name)


# --------------------------------------------------------------------------- the public functions

_ARGS = """
        batch_dim: the source's sample dim: each sample's answer w.r.t. its own
            entries of ``wrt`` (``u`` of shape ``(B, 1)`` from points ``x`` of shape
            ``(B, d)``: one number per point). See :func:`xa.backward`.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`; per sample, over budget, chunks of samples.
        create_graph: whether the answer carries a gradient (to the parameters, to ``wrt``, to
            coefficients and directions that require grad); by default whenever grad mode is on.
            See :func:`xa.backward`.
        direction: ``"auto"`` (the cheaper), ``"forward"`` (jets of the query's rows,
            collapsed) or ``"backward"`` (backprop of the whole tensor, contracted at the leaf)."""


def laplacian(source: torch.Tensor, wrt: torch.Tensor, batch_dim: Optional[int] = None,
              configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
              create_graph: Optional[bool] = None) -> torch.Tensor:
    """``sum_i d^2 source / dwrt_i^2``, shaped like ``source``, in its dtype and on its device.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``i`` runs over all its entries, or, with
            ``batch_dim``, over one sample's entries).{args}

    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> u = (x ** 2).sum(1, keepdim=True)
        >>> xa.laplacian(u, x, batch_dim=0)   # 6 for every point
    """
    return _answer(source, Laplacian(wrt), batch_dim, configurations, max_memory, direction, create_graph)


def biharmonic(source: torch.Tensor, wrt: torch.Tensor, batch_dim: Optional[int] = None,
               configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
               create_graph: Optional[bool] = None) -> torch.Tensor:
    """``sum_(i,j) d^4 source / dwrt_i^2 dwrt_j^2`` (the Laplacian of the Laplacian), shaped like ``source``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad.{args}

    Example:
        >>> x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
        >>> u = (x ** 4).sum(1, keepdim=True)
        >>> xa.biharmonic(u, x, batch_dim=0)   # 48 for every point
    """
    return _answer(source, Biharmonic(wrt), batch_dim, configurations, max_memory, direction, create_graph)


def partials(source: torch.Tensor, wrt: torch.Tensor, indices: Sequence, batch_dim: Optional[int] = None,
             configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
             create_graph: Optional[bool] = None) -> tuple:
    """Chosen partials ``d^k source / dwrt_(i_1) .. dwrt_(i_k)``, all from one plan.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad.
        indices: a list of multi-indices, each a tuple of entry positions in ``wrt``
            flattened (one sample's entries with ``batch_dim``); an int ``i`` is ``(i,)``.
            ``(1, 1)`` is ``d^2 / dwrt_1^2``, ``(0, 1, 1)`` is ``d^3 / dwrt_0 dwrt_1^2``.{args}

    Returns:
        A tuple with one tensor shaped like ``source`` per multi-index, in their order.

    Example:
        >>> pts = torch.randn(100, 3, dtype=torch.float64, requires_grad=True)   # (t, x, y) per point
        >>> u = net(pts)                                                        # (100, 1)
        >>> T, X, Y = 0, 1, 2
        >>> u_t, u_xx, u_yy = xa.partials(u, pts, [(T,), (X, X), (Y, Y)], batch_dim=0)
    """
    return _answer(source, Partials(wrt, indices), batch_dim, configurations, max_memory, direction,
                   create_graph)


def differential_operator(source: torch.Tensor, wrt: torch.Tensor, coefficients: dict,
                          batch_dim: Optional[int] = None, configurations=None,
                          max_memory: Optional[int] = None, direction: str = "auto",
                          create_graph: Optional[bool] = None) -> torch.Tensor:
    """``sum_k sum C_k[i_1..i_k] d^k source / dwrt_(i_1) .. dwrt_(i_k)``, shaped like ``source``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``n`` entries, per sample with ``batch_dim``).
        coefficients: ``{k: C_k}`` for the orders the operator has. ``C_k`` is a
            dense tensor of shape ``(n,) * k``; :class:`xa.queries.Diagonal`\\ ``(c)``
            (``C_k[i, .., i] = c[i]``); :class:`xa.queries.RankOne`\\ ``(v)``
            (``sum_r v_r ⊗ .. ⊗ v_r``, a directional jet); or a dict
            ``{multi-index: number}`` of its nonzero entries. Their values are read
            at every call; their structure (which kind, which entries) is planned.{args}

    Example:
        >>> # u_t - 0.1 (u_xx + u_yy) for points (t, x, y)
        >>> r = xa.differential_operator(u, pts, {1: {(0,): 1.0}, 2: {(1, 1): -0.1, (2, 2): -0.1}}, batch_dim=0)
    """
    return _answer(source, Operator(wrt, coefficients), batch_dim, configurations, max_memory, direction,
                   create_graph)


def directional(source: torch.Tensor, wrt: torch.Tensor, directions: torch.Tensor, order: int,
                batch_dim: Optional[int] = None, configurations=None, max_memory: Optional[int] = None,
                direction: str = "auto", create_graph: Optional[bool] = None) -> tuple:
    """Directional jets: ``d^k source [v, .., v]`` for k = 1..order and each direction ``v``.

    ``d^k source [v, .., v] / k!`` is the k-th Taylor coefficient of ``t -> source(wrt + t v)``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``n`` entries, per sample with ``batch_dim``).
        directions: one direction (1-d, ``n`` entries), or ``m`` of them, ``(m, n)``
            or ``(m, *one sample of wrt's shape)``; the same for every sample.
        order: the highest order ``K``.{args}

    Returns:
        A tuple of ``order`` tensors: the k-th shaped like ``source`` for one
        direction, ``(m, *source.shape)`` for ``m``.

    Example:
        >>> d1, d2, d3 = xa.directional(u, x, v, order=3)   # the first three Taylor terms, times k!
    """
    return _answer(source, Directional(wrt, directions, order), batch_dim, configurations, max_memory,
                   direction, create_graph)


for _f in (laplacian, biharmonic, partials, differential_operator, directional):
    _f.__doc__ = _f.__doc__.replace("{args}", _ARGS)


def mixed(source: torch.Tensor, wrt, batch_dim: Optional[int] = None, configurations=None,
          max_memory: Optional[int] = None, create_graph: Optional[bool] = None):
    """Mixed partials across leaves: ``d^k source / dwrt[0] .. dwrt[k-1]``.

    Backprop's joint blocks of the leaves asked together (one plan serves every request).

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a sequence of leaves, repeats allowed: ``(A, B)`` is ``d^2 S / dA dB``,
            ``(A, A, B)`` is ``d^3 S / dA^2 dB``; or a list of such sequences, all
            computed in one plan.
        batch_dim: the source's sample dim, as in :func:`xa.backward`.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`.
        create_graph: whether the blocks carry a gradient, as in :func:`xa.backward`.

    Returns:
        For one request, ``(s, n_0, .., n_(k-1))``: xa's layout, ``s = source.numel()``,
        ``n_j = wrt[j].numel()`` (per sample with ``batch_dim``: ``(B, s', n_0', ..)``).
        ``.reshape(*source.shape, *A.shape, *B.shape)`` is
        ``torch.func.hessian(f, argnums=(0, 1))(A, B)[0][1]``. For a list, a tuple of them.

    Example:
        >>> H_AB = xa.mixed(loss, (A, B))                        # (1, A.numel(), B.numel())
        >>> H_AAB, H_AB = xa.mixed(loss, [(A, A, B), (A, B)])
    """
    record = _recording(create_graph)
    with torch.set_grad_enabled(record):
        return _mixed(source, Mixed(wrt), batch_dim, configurations, max_memory)


def _mixed(source, query, batch_dim, configurations, max_memory):
    requests = query.requests
    checked = _check_batch_dim(batch_dim, source)
    one_sample = checked is not None and source.shape[checked] == 1
    graph, rules, value, keys, batch_dim = _mixed_setup(source, query, batch_dim, configurations)
    plan, results, _ = attach.compute(graph, max(len(k) for k in keys), rules, tuple(sorted(set(value.values()))),
                                      (), "backward", _budget(max_memory, graph.device), batch_dim,
                                      mixed=tuple(sorted(set(keys))), caller="xa.mixed")
    batch = plan.batch
    out = []
    for r, key in zip(requests, keys):
        t = results[("mixed", key)][0]
        sizes = [graph.values[u].numel if batch is None else batch.numel(graph, u) for u in key]
        lead = (graph.values[0].numel,) if batch is None else (batch.total, batch.numel(graph, 0))
        if one_sample:  # one sample: planned whole, laid out per sample as xa.backward does
            lead = (1,) + lead
        if t is None:
            t = torch.zeros(lead + tuple(sizes), dtype=graph.dtype, device=graph.device)
        t = t.reshape(lead + tuple(sizes))
        # the block's positions follow the sorted values; the request's order may differ
        free = list(range(len(key)))
        perm = []
        for w in r:
            p = next(p for p in free if key[p] == value[id(w)])
            free.remove(p)
            perm.append(p)
        t = t.permute(tuple(range(len(lead))) + tuple(len(lead) + p for p in perm))
        out.append(t.to(source.dtype).contiguous())
    return out[0] if query.single else tuple(out)


class Mixed(Query):
    """Mixed partials across leaves, ``d^k S / dwrt[0] .. dwrt[k-1]``: backprop's joint blocks (:func:`mixed`)."""

    def __init__(self, wrt):
        if isinstance(wrt, torch.Tensor) or not isinstance(wrt, Sequence) or not wrt:
            raise TypeError("wrt must be a non-empty sequence of leaves (A, B), or a list of such sequences")
        self.single = all(isinstance(w, torch.Tensor) for w in wrt)
        self.requests = [tuple(wrt)] if self.single else [tuple(w) if isinstance(w, Sequence) else w for w in wrt]
        for r in self.requests:
            if not isinstance(r, tuple) or not r or not all(isinstance(w, torch.Tensor) for w in r):
                raise TypeError("wrt must be a non-empty sequence of leaves (A, B), or a list of such sequences; "
                                f"got an entry {type(r).__name__}")
        self.leaves = list({id(w): w for r in self.requests for w in r}.values())


def _mixed_setup(source, query: Mixed, batch_dim, configurations):
    """``(graph, rules, value index of each leaf by id, sorted block key of each request, batch_dim)``."""
    graph, rules, leaves, batch_dim = _prepare(source, tuple(query.leaves), "mixed", batch_dim, configurations)
    value = {id(w): i for w, i in zip(query.leaves, leaves)}
    keys = [tuple(sorted(value[id(w)] for w in r)) for r in query.requests]
    return graph, rules, value, keys, batch_dim


def _explain_mixed(source, query: Mixed, configurations, batch_dim) -> tuple:
    graph, rules, value, keys, batch_dim = _mixed_setup(source, query, batch_dim, configurations)
    plan = planner.build(graph, max(len(k) for k in keys), rules, tuple(sorted(set(value.values()))), (),
                         "backward", batch_dim=batch_dim, mixed=tuple(sorted(set(keys))))
    asked = ", ".join("d^{} S / {}".format(len(k), " ".join(f"d#{u}" for u in k)) for k in keys)
    return graph, plan, [f"query: mixed partials {asked}, answered by backprop; the joint blocks of leaves "
                         f"{sorted(set(value.values()))} are kept (block (a, b) = d^2 S / d#a d#b)"]

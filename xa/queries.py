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

import math
from typing import Sequence

import torch

from . import checks
from .errors import QueryError
from .jets import Ask, Rows, count, index, multi_indices, rows_of, where

__all__ = ["Laplacian", "Biharmonic", "Partials", "Operator", "Directional", "Mixed", "Pure", "Diagonal", "RankOne",
           "Query"]

# --------------------------------------------------------------------------- coefficients


class Diagonal:
    """The coefficient tensor ``C[i, .., i] = c[i]``, zero elsewhere (``c`` a number or a vector over the leaf).

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = (x ** 3).sum()                              # Hessian diag(6 x)
        >>> xa.queries.Diagonal(2.0), xa.differential_operator(s, x, {2: xa.queries.Diagonal(2.0)}).item()
        (Diagonal(2.0), 36.0)
        >>> c = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> xa.differential_operator(s, x, {2: xa.queries.Diagonal(c)}).item()    # u_00 - u_11 = 6 - 12
        -6.0
    """

    def __init__(self, c=1.0):
        self.c = c

    def __repr__(self):
        return f"Diagonal({self.c!r})"


class RankOne:
    """The coefficient tensor ``sum_r v_r ⊗ .. ⊗ v_r`` for vectors ``v`` of shape ``(n,)`` or ``(r, n)``.

    At order ``k`` it asks for ``d^k S [v_r, .., v_r]``: a directional jet, seeded with ``v``.

    Example:
        >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> s = (x ** 3).sum()                              # Hessian diag(6 x)
        >>> V = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        >>> xa.queries.RankOne(V), xa.differential_operator(s, x, {2: xa.queries.RankOne(V)}).item()
        (RankOne([2, 3]), 36.0)
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


class SourceShape:
    """Turns one row of the source's jet (``(*S)``, or ``(B, *S')`` per sample) into the source's shape.

    ``sample_dim``: the source's sample dim of a per-sample plan (the row has it first), else ``None``.
    A row that is zero by structure (``None``) becomes zeros.
    """

    def __init__(self, shape: tuple, dtype, device, sample_dim=None):
        self.shape, self.dtype, self.device, self.sample_dim = tuple(shape), dtype, device, sample_dim

    def __call__(self, t):
        shape, d = self.shape, self.sample_dim
        if t is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        if d is not None:
            t = t.reshape((shape[d],) + shape[:d] + shape[d + 1:]).movedim(0, d)
        return t.reshape(shape).to(self.dtype)


class Query:
    """A query on the derivative tensor of ``source`` w.r.t. the leaf ``wrt``; its subclasses say what it asks.

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> qs = [xa.queries.Laplacian(x), xa.queries.Partials(x, [(0, 1, 1)]), xa.queries.Mixed((x, x, x))]
        >>> all(isinstance(q, xa.queries.Query) for q in qs)
        True
        >>> [xa.explain((x ** 3).sum(), query=q, file=io.StringIO()).order for q in qs]   # each plans its own order
        [2, 3, 3]
    """

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

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = x[0] ** 2 * x[1] ** 3                       # u_0 - 0.5 u_11 = 2 * 8 - 0.5 * 6 * 2
        >>> op = xa.queries.Operator(x, {1: {(0,): 1.0}, 2: {(1, 1): -0.5}})
        >>> xa.explain(s, query=op, file=io.StringIO()).order
        2
        >>> xa.differential_operator(s, x, op.coefficients).item()          # what xa.differential_operator asks
        10.0
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
        c = self.coefficients[top]
        unit = isinstance(c, Diagonal) and type(c.c) in (int, float) and c.c == 1  # (a Laplacian's)
        return Ask(self.name, wanted, self.identity, self.extra, collapse=1, unit=unit)

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
    """``sum_i d^2 S / dx_i^2``, shaped like S.

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = (x ** 3).sum()                              # Laplacian 6 x_0 + 6 x_1
        >>> xa.explain(s, query=xa.queries.Laplacian(x), file=io.StringIO()).order
        2
        >>> xa.laplacian(s, x).item()                       # what xa.laplacian asks
        18.0
    """

    def __init__(self, wrt):
        super().__init__(wrt, {2: Diagonal(1.0)}, name="laplacian")


class Biharmonic(Query):
    """``sum_(i,j) d^4 S / dx_i^2 dx_j^2``: the Laplacian of the Laplacian, shaped like S.

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = x[0] ** 4 + x[1] ** 4 + (x[0] * x[1]) ** 2  # 24 + 24 + 2 * 4
        >>> xa.explain(s, query=xa.queries.Biharmonic(x), file=io.StringIO()).order
        4
        >>> xa.biharmonic(s, x).item()                      # what xa.biharmonic asks
        56.0
    """

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
    """Chosen entries ``d^k S / dx_(i_1) .. dx_(i_k)``, one tensor shaped like S per multi-index.

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = x[0] ** 2 * x[1] ** 3                       # u_0 = 2 x_0 x_1^3, u_011 = 12 x_0 x_1
        >>> q = xa.queries.Partials(x, [(0,), (1, 0, 1)])
        >>> q.indices, xa.explain(s, query=q, file=io.StringIO()).order        # multi-indices are sorted
        ([(0,), (0, 1, 1)], 3)
        >>> [t.item() for t in xa.partials(s, x, q.indices)]                 # what xa.partials asks
        [16.0, 24.0]
    """

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
    """``d^k S [v, .., v]`` for k = 1..order and each direction ``v`` (the Taylor coefficients times ``k!``).

    ``per_sample=True``: ``directions`` is ``(B, m, n)``, each sample's own ``m`` (a per-sample plan
    seeds them with the sample label; :func:`xa.directional` sets it for such a tensor with ``batch_dim``).

    Example:
        >>> import io
        >>> x = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
        >>> s = torch.exp(x).sum()                          # d^k s [v, .., v] = sum_i exp(x_i) v_i^k
        >>> v = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> xa.explain(s, query=xa.queries.Directional(x, v, 3), file=io.StringIO()).order
        3
        >>> [d.item() for d in xa.directional(s, x, v, order=3)]   # what xa.directional asks
        [3.0, 5.0, 9.0]
    """

    def __init__(self, wrt, directions: torch.Tensor, order: int, per_sample: bool = False):
        if not isinstance(directions, torch.Tensor) or directions.dim() < 1:
            raise TypeError("directions must be a tensor: one direction, 1-d with the leaf's n entries (one "
                            "sample's with batch_dim), or m of them, (m, n) or (m, *one sample's shape); with "
                            "batch_dim, each sample's own: (B, m, n)")
        self.wrt, self.order = wrt, checks.order(order)
        self.per_sample = per_sample  # directions (B, m, n'): each sample its own m (xa.directional decides)
        self.single = directions.dim() == 1
        if per_sample:
            self.v = directions
        else:
            self.v = directions[None] if self.single else directions.reshape(directions.shape[0], -1)

    def ask(self) -> Ask:
        m = self.v.shape[-2]
        return Ask("directional", tuple((("rank", 0, m),) for _ in range(self.order)), identity=False, extra=m,
                   per_sample=self.per_sample)

    def seeds(self, rows, n, dtype, device):
        if self.v.shape[-1] != n:
            raise QueryError(f"directional: each direction has {self.v.shape[-1]} entries, the leaf has {n} "
                             "(per sample with batch_dim)")
        return {"directions": self.v.to(dtype=dtype, device=device)}

    def answer(self, jets, rows, n, like, seeds):
        out = []
        m = self.v.shape[-2]
        for t in jets:
            t = torch.stack([like(None if t is None else t[r]) for r in range(m)])
            out.append(t[0] if self.single else t)
        return tuple(out)


class Mixed(Query):
    """Mixed partials across leaves, ``d^k S / dwrt[0] .. dwrt[k-1]``: backprop's joint blocks (:func:`mixed`).

    Example:
        >>> import io
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> b = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> s = (a ** 2).sum() * b[0]                       # d^2 s / da db = 2 a
        >>> out = io.StringIO()
        >>> plan = xa.explain(s, query=xa.queries.Mixed((a, b)), file=out)
        >>> plan.order, "mixed partials" in out.getvalue(), xa.mixed(s, (a, b)).tolist()   # what xa.mixed asks
        (2, True, [[[2.0], [4.0]]])
    """

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

    def keys(self, value: dict) -> list:
        """Each request's block: the sorted value indices of its leaves (``value``: leaf id -> index)."""
        return [tuple(sorted(value[id(w)] for w in r)) for r in self.requests]


class Pure(Query):
    """The pure partials ``d^k S / dx_i^k`` for every entry ``i`` of each leaf: the diagonal of the derivative.

    Forward, the jets of the rows ``(i,)*j`` (``n`` rows per order, as a Laplacian's); backward,
    backprop with each leaf's ``k`` positions tied, so that the terms that write its block compute
    only the diagonal (:mod:`xa.diag`). ``wrt`` is a leaf or a sequence of leaves (one plan).

    Example:
        >>> import io
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> s = x[0] ** 3 * x[1] ** 2                       # d^2 s / dx_0^2 = 6 x_0 x_1^2, d^2 s / dx_1^2 = 2 x_0^3
        >>> xa.explain(s, query=xa.queries.Pure(x, 2), file=io.StringIO()).order
        2
        >>> xa.diagonal(s, x, order=2).tolist()             # what xa.diagonal asks
        [24.0, 2.0]
    """

    def __init__(self, wrt, order: int):
        self.single = isinstance(wrt, torch.Tensor)
        if not self.single and (not isinstance(wrt, Sequence) or not wrt
                                or not all(isinstance(w, torch.Tensor) for w in wrt)):
            got = type(wrt).__name__ if not isinstance(wrt, Sequence) or not wrt else \
                next(type(w).__name__ for w in wrt if not isinstance(w, torch.Tensor))
            raise TypeError(f"xa.diagonal: wrt must be a leaf tensor or a non-empty sequence of leaves, got {got}")
        self.wrt = wrt
        self.leaves = [wrt] if self.single else list({id(w): w for w in wrt}.values())
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise QueryError(f"xa.diagonal: order must be a positive int (the k of d^k S / dx_i^k), got {order!r}")
        self.order = order

    def ask(self) -> Ask:
        return Ask("diagonal", ((),) * (self.order - 1) + (("diagonal",),))

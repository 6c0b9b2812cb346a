"""Randomized estimators: a Laplacian, a biharmonic, a differential operator from a few random jets per sample.

``xa.laplacian(u, x, samples=S)`` and its siblings return an *unbiased
estimate* instead of the exact value: each is a mean over ``S`` terms, every
term a directional (or mixed directional) derivative of ``u`` along random
directions, and each sample (each ``b`` along ``batch_dim``) draws its own.

- Laplacian (Hutchinson): ``E[v^T H v] = tr H`` for ``v`` with ``E[v v^T] = I``,
  so the estimate is ``mean_s d^2 u [v_s, v_s]``; ``v`` Rademacher (±1, the
  default: ``Var = 2 (||H||_F^2 - sum_i H_ii^2) / S``) or Gaussian
  (``Var = 2 ||H||_F^2 / S``).
- Biharmonic: for ``v ~ N(0, I)``, ``E[v_i v_j v_k v_l] = d_ij d_kl + d_ik d_jl
  + d_il d_jk``, so ``E[d^4 u [v, .., v]] = 3 sum_(i,j) u_iijj = 3 D^2 u`` and the
  estimate is ``mean_s d^4 u [v_s, ..] / 3``. Rademacher vectors have
  ``E[v_i^4] = 1``, not 3, so they give ``3 D^2 u - 2 sum_i u_iiii``: refused.
- A differential operator ``sum_k sum C_k[i..] d^k u / dx_i..``, order by order
  (in the spirit of STDE, Shi et al. 2024: sparse random jets):
  order 1 and :class:`~xa.queries.RankOne` coefficients exactly (one jet each);
  order 2 with a dense ``A`` or a :class:`~xa.queries.Diagonal` by Hutchinson,
  ``sum_ij A_ij u_ij = E[d^2 u [A^T v, v]]`` (a mixed directional derivative;
  ``Diagonal(c)`` with a number ``c`` is ``c E[d^2 u [v, v]]``); every other
  order and every dict ``{multi-index: number}`` by importance sampling of its
  entries: an entry ``a`` drawn with probability ``p_a = |C[a]| / sum |C|``
  adds ``C[a] / p_a * d^k u [e_(a_1), .., e_(a_k)]`` (a mixed jet along one-hot
  directions: the partial at ``a``); the mean over ``S`` draws is unbiased,
  and ``p`` is a constant for the gradient, so the gradient w.r.t. a
  coefficient is unbiased too.

Every term is a row of one forward-jet plan (:mod:`xa.jets`): the directions
are the seeds, each sample's own carried by the sample label through every
node (no loop over samples), and the terms of a shared weight are summed on
the fly (the top order collapsed). The directions are drawn on the leaf's
device (``generator=`` for reproducible draws) and are constants: under grad
mode the estimate's gradient is that of the same terms with the same
directions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import QueryError, SamplingError
from .jets import Ask, count, where
from .queries import Diagonal, Query, RankOne

DISTRIBUTIONS = ("rademacher", "gaussian")

# --------------------------------------------------------------------------- arguments


def check(caller: str, samples, distribution, generator, wrt, default: str = "rademacher") -> Optional[tuple]:
    """``(S, distribution, generator)`` checked, or ``None`` for the exact value (``samples=None``)."""
    if samples is None:
        for name, value in (("distribution", distribution), ("generator", generator)):
            if value is not None:
                raise SamplingError(f"{caller}: {name}= is for a randomized estimate, which samples= asks for "
                                    "(samples=None computes the exact value)")
        return None
    if isinstance(samples, bool) or not hasattr(type(samples), "__index__"):
        raise SamplingError(f"{caller}: samples must be a positive int (random directions per sample) or None "
                            f"(the exact value), got {type(samples).__name__} {samples!r}")
    samples = operator.index(samples)
    if samples < 1:
        raise SamplingError(f"{caller}: samples must be a positive int (random directions per sample) or None "
                            f"(the exact value), got {samples}")
    if distribution is None:
        distribution = default
    if distribution not in DISTRIBUTIONS:
        raise SamplingError(f"{caller}: distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}, "
                            f"got {distribution!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise SamplingError(f"{caller}: generator must be a torch.Generator or None, got "
                                f"{type(generator).__name__}")
        if isinstance(wrt, torch.Tensor) and torch.device(generator.device) != wrt.device:
            raise SamplingError(f"{caller}: generator is on {generator.device}, wrt on {wrt.device}; the directions "
                                f"are drawn where wrt is: torch.Generator(device={str(wrt.device)!r})")
    return samples, distribution, generator


def layout(caller: str, source: torch.Tensor, wrt: torch.Tensor, sample_dim: Optional[int]) -> tuple:
    """``(B, n)``: how many samples draw their own directions (``None`` without ``batch_dim``) and the
    entries of one sample's slice of ``wrt`` (all of them without ``batch_dim``)."""
    if not isinstance(wrt, torch.Tensor):
        raise TypeError(f"{caller}: wrt must be a torch.Tensor, got {type(wrt).__name__}")
    if sample_dim is None:
        return None, wrt.numel()
    B = source.shape[sample_dim]
    if B == 0 or wrt.numel() % B:
        raise QueryError(f"{caller}: wrt (shape {list(wrt.shape)}) has no slice per sample of the source's "
                         f"{B} samples (batch_dim={sample_dim}); each sample's random directions are over its "
                         "own entries of wrt")
    return B, wrt.numel() // B


def draw(shape: tuple, distribution: str, generator, dtype, device) -> torch.Tensor:
    """Random directions of ``shape``: Rademacher ``±1`` or standard Gaussian entries.

    Rademacher: ``2 * torch.randint(0, 2, shape, generator=generator, dtype=dtype) - 1``; Gaussian:
    ``torch.randn(shape, generator=generator, dtype=dtype)``; on ``device``. (In place: one tensor of
    ``shape`` is all they allocate, 128 MB for 100 points of 10 000 entries and 16 directions in float64.)
    """
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, dtype=dtype, device=device).mul_(2).sub_(1)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def directions(B, S: int, n: int, distribution: str, generator, dtype, device) -> torch.Tensor:
    """``S`` random directions per sample: ``(B, S, n)``, ``V[b, s]`` for sample ``b``, or ``(S, n)`` for one
    sample (``B = None``). Per sample they are drawn as ``(S, B, n)`` and ``V`` is its transposed view, the
    layout the jets read them in (:func:`xa.jets.sample_seed`: no copy of them is made)."""
    if B is None:
        return draw((S, n), distribution, generator, dtype, device)
    return draw((S, B, n), distribution, generator, dtype, device).transpose(0, 1)


# --------------------------------------------------------------------------- the query


@dataclass
class Group:
    """``r`` terms of one order ``k``: term ``j`` is ``d^k S [d_(jk'), .., d_(jk' + k' - 1)]`` along its
    ``k' = arity`` directions (``arity`` 1: ``d^k S [d_j, .., d_j]``; ``k``: a mixed jet).

    ``directions``: ``(B, r * arity, n)`` (each sample's own) or ``(r * arity, n)``. ``weight``: one
    number (or 0-d tensor) for every term (then the top order is collapsed), or per term, ``(B, r)``
    or ``(r,)`` (an importance weight; the terms are read one by one).
    """

    k: int
    directions: torch.Tensor
    arity: int
    weight: object
    per_term: bool = False

    @property
    def r(self) -> int:
        return self.directions.shape[-2] // self.arity


class Sampled(Query):
    """An estimator's query: the weighted sum of its groups' directional jets (:class:`Group`)."""

    def __init__(self, wrt, groups: list, name: str, per_sample: bool):
        self.wrt, self.groups, self.name, self.per_sample = wrt, groups, name, per_sample
        self.top = max(g.k for g in groups)
        self.collapse = all(not g.per_term for g in groups if g.k == self.top)
        self.offsets, offset = [], 0  # where each group's directions start
        for g in groups:
            self.offsets.append(offset)
            offset += g.directions.shape[-2]
        self.m = offset

    def ask(self) -> Ask:
        wanted = [[] for _ in range(self.top)]
        for g, offset in zip(self.groups, self.offsets):
            wanted[g.k - 1].append(("rank", offset, g.r) if g.arity == 1 else ("mixed", offset, g.r, g.k))
        return Ask(self.name, tuple(tuple(p) for p in wanted), identity=False, extra=self.m,
                   collapse=1 if self.collapse else 0, per_sample=self.per_sample)

    def _positions(self, g: Group, offset: int, rows, device) -> torch.Tensor:
        at = where(rows.m, rows.kinds[g.k - 1])
        if g.arity == 1:
            found = [at[(offset + j,) * g.k] for j in range(g.r)]
        else:
            found = [at[tuple(range(offset + j * g.k, offset + (j + 1) * g.k))] for j in range(g.r)]
        return torch.tensor(found, dtype=torch.long, device=device)

    def seeds(self, rows, n, dtype, device) -> dict:
        for g in self.groups:
            if g.directions.shape[-1] != n:
                raise QueryError(f"{self.name}: the directions have {g.directions.shape[-1]} entries, the leaf has "
                                 f"{n} (per sample with batch_dim)")
        parts = [g.directions.to(dtype=dtype, device=device) for g in self.groups]
        if len(parts) == 1:  # as drawn: no copy
            together = parts[0]
        elif self.per_sample:  # put together in the (m, B, n) layout the jets read (xa.jets.sample_seed)
            together = torch.cat([p.transpose(0, 1) for p in parts]).transpose(0, 1)
        else:
            together = torch.cat(parts)
        out = {"directions": together}
        if self.collapse:
            w = torch.zeros(count(rows.m, rows.kinds[self.top - 1]), dtype=dtype, device=device)
            for g, offset in zip(self.groups, self.offsets):
                if g.k == self.top:
                    pos = self._positions(g, offset, rows, device)
                    value = torch.as_tensor(g.weight, dtype=dtype, device=device).reshape(())
                    w = w.index_put((pos,), value.expand(g.r), accumulate=True)
            out["weights"] = w[None]
        return out

    def answer(self, jets, rows, n, like, seeds):
        total = None
        batched = like.sample_dim is not None
        if self.collapse and jets[self.top - 1] is not None:
            total = jets[self.top - 1][0]
        for g, offset in zip(self.groups, self.offsets):
            t = jets[g.k - 1]
            if t is None or (self.collapse and g.k == self.top):
                continue
            t = t.index_select(0, self._positions(g, offset, rows, t.device))  # (r, [B], ...)
            w = torch.as_tensor(g.weight, dtype=t.dtype, device=t.device)
            if not g.per_term:
                part = t.sum(0) * w
            else:
                if w.dim() == 2:  # (B, r): each sample's own
                    w = w.t() if batched else w[0]
                part = (t * w.reshape(w.shape + (1,) * (t.dim() - w.dim()))).sum(0)
            total = part if total is None else total + part
        return like(total)


# --------------------------------------------------------------------------- the estimators


def _per_sample(t: torch.Tensor, B) -> torch.Tensor:
    """A shared ``(r, n)`` set of directions, the same for every sample: ``(B, r, n)`` (a view)."""
    return t if B is None else t.expand(B, *t.shape)


def laplacian(wrt, B, n, S, distribution, generator, dtype, device) -> Sampled:
    """Hutchinson: ``mean_s d^2 u [v_s, v_s]``, ``v_s`` drawn as :func:`draw` of ``(B, S, n)`` (or ``(S, n)``)."""
    V = directions(B, S, n, distribution, generator, dtype, device)
    return Sampled(wrt, [Group(2, V, 1, 1.0 / S)], "laplacian", B is not None)


def biharmonic(caller, wrt, B, n, S, distribution, generator, dtype, device) -> Sampled:
    """``mean_s d^4 u [v_s, .., v_s] / 3`` with Gaussian ``v_s`` (:func:`draw` of ``(B, S, n)``)."""
    if distribution != "gaussian":
        raise SamplingError(f"{caller}: distribution={distribution!r} gives no unbiased biharmonic: for Rademacher "
                            "directions E[d^4 u [v, v, v, v]] = 3 sum_(i,j) u_iijj - 2 sum_i u_iiii (E[v_i^4] is 1, "
                            "not 3); use distribution='gaussian', for which it is 3 times the biharmonic")
    V = directions(B, S, n, "gaussian", generator, dtype, device)
    return Sampled(wrt, [Group(4, V, 1, 1.0 / (3 * S))], "biharmonic", B is not None)


def operator_query(caller, wrt, coefficients: dict, B, n, S, distribution, generator, dtype, device) -> Sampled:
    """An unbiased estimator of ``sum_k sum C_k[a] d^k u / dx_a``, order by order (see the module)."""
    if not isinstance(coefficients, dict) or not coefficients:
        raise TypeError("coefficients must be a non-empty dict {order: coefficient}, got "
                        f"{type(coefficients).__name__}")
    groups = []
    for k, c in sorted(coefficients.items()):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise QueryError(f"coefficients: the order {k!r} is not a positive int")
        if isinstance(c, RankOne):  # exact: r directional jets
            v = c.v.to(dtype=dtype, device=device)
            if v.shape[1] != n:
                raise QueryError(f"coefficients[{k}]: RankOne's vectors have {v.shape[1]} entries, the leaf has {n}"
                                 f"{' per sample' if B is not None else ''}")
            groups.append(Group(k, _per_sample(v, B), 1, 1.0))
        elif k == 1:  # exact: one directional derivative along the coefficient vector
            groups.append(Group(1, _per_sample(_vector(caller, c, n, dtype, device)[None], B), 1, 1.0))
        elif k == 2 and isinstance(c, (Diagonal, torch.Tensor)):
            groups.append(_hutchinson(caller, c, B, n, S, distribution, generator, dtype, device))
        else:
            groups.append(_importance(caller, k, c, B, n, S, generator, dtype, device))
    return Sampled(wrt, groups, "operator", B is not None)


def _vector(caller, c, n, dtype, device) -> torch.Tensor:
    """An order-1 coefficient as the vector ``C_1`` of ``n`` entries."""
    if isinstance(c, Diagonal):
        c = c.c
    if isinstance(c, dict):
        pos, values = _entries(caller, 1, c, n, dtype, device)
        return torch.zeros(n, dtype=dtype, device=device).index_put((pos[:, 0],), values, accumulate=True)
    c = torch.as_tensor(c, dtype=dtype, device=device)
    if c.dim() == 0:
        return c.expand(n)
    if tuple(c.shape) != (n,):
        raise QueryError(f"coefficients[1] has shape {list(c.shape)}; an order-1 coefficient is ({n},) for a leaf "
                         f"of {n} entries")
    return c


def _hutchinson(caller, c, B, n, S, distribution, generator, dtype, device) -> Group:
    """``sum_ij A_ij u_ij = E[d^2 u [A^T v, v]]``: rows ``(2s, 2s + 1)`` over the directions ``A^T v_s, v_s``."""
    V = directions(B, S, n, distribution, generator, dtype, device)
    if isinstance(c, Diagonal):
        cc = torch.as_tensor(c.c, dtype=dtype, device=device)
        if cc.dim() == 0:  # c tr H: Hutchinson's own d^2 u [v, v]
            return Group(2, V, 1, cc / S)
        if tuple(cc.shape) != (n,):
            raise QueryError(f"coefficients[2]: Diagonal takes a number or a vector of {n} entries, got shape "
                             f"{list(cc.shape)}")
        A_v = V * cc
    else:
        A = c.to(dtype=dtype, device=device)
        if tuple(A.shape) != (n, n):
            raise QueryError(f"coefficients[2] has shape {list(A.shape)}; a dense coefficient of order 2 is "
                             f"({n}, {n}) for a leaf of {n} entries")
        A_v = V @ A  # (A^T v)_j = sum_i A_ij v_i
    pairs = torch.stack([A_v, V], dim=-2).reshape(V.shape[:-2] + (2 * S, n))
    return Group(2, pairs, 2, 1.0 / S)


def _entries(caller, k, c: dict, n, dtype, device) -> tuple:
    """A dict coefficient's multi-indices ``(E, k)`` and values ``(E,)`` (stacked, so they keep a gradient)."""
    pos = []
    for e in c:
        e = (e,) if isinstance(e, int) and not isinstance(e, bool) else e
        if not isinstance(e, tuple) or len(e) != k or not all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in e):
            raise QueryError(f"coefficients[{k}]: the entry {e!r} is not a multi-index of {k} ints")
        if not all(0 <= i < n for i in e):
            raise QueryError(f"{caller}: coefficients[{k}]: the multi-index {e} names an entry outside the leaf's "
                             f"{n} entries")
        pos.append(e)
    values = list(c.values())
    if all(isinstance(v, (int, float)) for v in values):
        values = torch.tensor(values, dtype=dtype, device=device)
    else:
        values = torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])
    return torch.tensor(pos, dtype=torch.long, device=device).reshape(len(pos), k), values


def _importance(caller, k, c, B, n, S, generator, dtype, device) -> Group:
    """``C[a] / p_a * d^k u [e_(a_1), .., e_(a_k)]`` for entries ``a`` drawn with ``p_a = |C[a]| / sum |C|``."""
    if isinstance(c, Diagonal):
        cc = torch.as_tensor(c.c, dtype=dtype, device=device)
        if cc.dim() > 1 or (cc.dim() == 1 and cc.shape[0] != n):
            raise QueryError(f"coefficients[{k}]: Diagonal takes a number or a vector of {n} entries, got shape "
                             f"{list(cc.shape)}")
        values = cc.expand(n)
        index = torch.arange(n, device=device)[:, None]
        arity = 1  # d^k u [e_i, .., e_i]: one direction per term
    elif isinstance(c, dict):
        index, values = _entries(caller, k, c, n, dtype, device)
        arity = k
    elif isinstance(c, torch.Tensor):
        values = c.to(dtype=dtype, device=device)
        if tuple(values.shape) != (n,) * k:
            raise QueryError(f"coefficients[{k}] has shape {list(values.shape)}; a dense coefficient of order {k} "
                             f"is ({', '.join([str(n)] * k)}) for a leaf of {n} entries")
        values = values.reshape(-1)
        digits = n ** torch.arange(k - 1, -1, -1, device=device)
        index = None  # the flat entry's digits, below
        arity = k
    else:
        raise TypeError(f"coefficients[{k}] must be a tensor of shape (n,)*{k}, xa.queries.Diagonal, "
                        f"xa.queries.RankOne or a dict {{multi-index: number}}, got {type(c).__name__}")
    size = values.abs().detach()
    total = size.sum()
    p = size / total if total > 0 else torch.full_like(size, 1.0 / size.numel())
    draws = 1 if B is None else B
    # inverse CDF (any number of entries: torch.multinomial takes at most 2^24), never an entry of p = 0
    cdf = p.cumsum(0)
    u = torch.rand(draws * S, generator=generator, dtype=cdf.dtype, device=device) * cdf[-1]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=p.numel() - 1).reshape(draws, S)
    weight = values[picked] / (p[picked] * S)  # (draws, S): C[a] / p_a / S, p a constant
    multi = (picked[..., None] // digits) % n if index is None else index[picked]  # (draws, S, arity)
    directions = torch.nn.functional.one_hot(multi, n).to(dtype).reshape(draws, S * arity, n)
    if B is None:
        directions, weight = directions[0], weight[0]
    return Group(k, directions, arity, weight, per_term=True)

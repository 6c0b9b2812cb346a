"""Operators along a dim: softmax, log_softmax, logsumexp, prod, max and min.

Each is dense along the dims it acts on and batched (tied labels) along
every other dim. Their k-th derivatives are built from the saved values
with broadcasting and structural masks: no branch looks at a value.
(sum and mean, which are linear, live in :mod:`xa_ops.linear`.)

softmax: with ``y = softmax(x)``, ``dy_i/dx_j = y_i (d_ij - y_j)``. So
``d^k y_i0 / dx_i1 .. dx_ik`` is a sum over set partitions ``P`` of
``{0..k}`` of ``c_P * prod_{B in P} y_B * [all indices in B equal]``, and
differentiating one term by ``x_j`` either puts ``j`` into one of its
blocks (+1 each) or adds the block ``{j}`` (-|P|).

prod: ``d^k prod(x) / dx_i1 .. dx_ik`` is the product of the entries not
among ``i1..ik`` when those are distinct, and zero otherwise; it is built
without dividing by ``x``, so zeros in ``x`` are exact.

logsumexp: ``dy / dx_j = s_j`` with ``s = softmax(x)`` over the reduced
dims, so ``d^k y / dx_j1 .. dx_jk`` is the (k-1)-th derivative of
``s_j1`` w.r.t. ``x_j2 .. x_jk``: softmax's partition sum (see
:mod:`xa_ops.special`) with ``j1`` in the output's place. Several reduced
dims are one flattened softmax axis.

log_softmax: ``y_i = x_i - logsumexp(x)``, so ``dy_i / dx_j = d_ij - s_j``
and every higher derivative is minus logsumexp's, the same for every ``i``.

max / min along a dim pick one entry (torch's saved index): the
derivative is that one-hot selection, every higher order is zero. max /
min of all entries and amax / amin share a tie among the ``c`` maxima
evenly, as torch does: the derivative is ``[x == y] / c``. The masks come
from comparisons, constant under differentiation, so higher orders vanish.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch.func import jacfwd, vmap

from xa.errors import UnsupportedOperatorError
from xa.factor import LabelMaker, normalize_dim, planned
from xa.families import Piece, composite, linear_map
from xa.registry import register

# ---------------------------------------------------------------- softmax and prod


@lru_cache(maxsize=None)
def _softmax_terms(k: int) -> tuple:
    """``((coef, partition), ...)`` for the k-th derivative; blocks are sorted tuples."""
    terms = {((0,),): 1}
    for j in range(1, k + 1):
        new: dict = {}
        for part, c in terms.items():
            for b in range(len(part)):
                merged = tuple(sorted(part[:b] + (tuple(sorted(part[b] + (j,))),) + part[b + 1:]))
                new[merged] = new.get(merged, 0) + c
            grown = tuple(sorted(part + ((j,),)))
            new[grown] = new.get(grown, 0) - c * len(part)
        terms = {p: c for p, c in new.items() if c != 0}
    return tuple((c, p) for p, c in sorted(terms.items()))


def _equal_positions(n: int, positions: tuple, total: int, device) -> torch.Tensor:
    """Boolean mask over ``total`` positions of size ``n`` (others size 1): all listed indices equal."""
    idx = torch.arange(n, device=device)
    first = idx.reshape([n if p == positions[0] else 1 for p in range(total)])
    mask = torch.ones([n if p in positions else 1 for p in range(total)], dtype=torch.bool, device=device)
    for p in positions[1:]:
        mask = mask & (first == idx.reshape([n if q == p else 1 for q in range(total)]))
    return mask


# A softmax or prod derivative is built as its result plus, at most, one term
# and the partial product before it: two more tensors of the result's size.
DENSE_WORKSPACE = 2


def softmax_derivative(ctx, s: torch.Tensor, k: int) -> torch.Tensor:
    """``d^k s_i0 / dx_i1 .. dx_ik`` for ``s = softmax(x)`` over the last dim, shaped ``(*batch, n, .., n)``."""
    n, batch, total = s.shape[-1], s.shape[:-1], k + 1

    def build():
        derivative = torch.zeros((*batch, *([n] * total)), dtype=s.dtype, device=s.device)
        for coef, partition in _softmax_terms(k):
            term = None
            for block in partition:
                expand = [n if p == block[0] else 1 for p in range(total)]
                piece = s.reshape(*batch, *expand) * _equal_positions(n, block, total, s.device)
                term = piece if term is None else term * piece
            derivative.add_(term, alpha=coef)
        return derivative

    return planned(ctx, (*batch, *([n] * total)), build)


def _softmax(ctx, slots):
    k = len(slots)
    y = ctx.saved("result")
    d = normalize_dim(ctx.saved("dim"), y.dim())
    yb = y.movedim(d, -1) if y.dim() else y.reshape(1)
    n = yb.shape[-1]
    batch = yb.shape[:-1]
    total = k + 1
    derivative = softmax_derivative(ctx, yb, k)
    lab = LabelMaker()
    bl = lab.dims(batch)
    pos = lab.dims([n] * total)

    def port(p):
        labels = list(bl)
        labels.insert(d, pos[p])
        return tuple(labels) if y.dim() else (pos[p],)

    return lab.factor(port(0), [port(p) for p in range(1, total)], [(derivative, bl + pos)],
                      workspace=DENSE_WORKSPACE * derivative.numel())


def _prod(ctx, slots, dim=None):
    k = len(slots)
    x = ctx.saved("self")
    xb = x.reshape(-1) if dim is None or x.dim() == 0 else x.movedim(dim, -1)  # 0-d: one entry
    n = xb.shape[-1]
    if k > n:
        return None
    batch = xb.shape[:-1]
    total = k + 1

    def build():
        left_out = torch.zeros([n] * total, dtype=torch.bool, device=xb.device)
        distinct = torch.ones([n] * k, dtype=torch.bool, device=xb.device)
        for a in range(k):
            left_out = left_out | _equal_positions(n, (a, k), total, xb.device)
            for b in range(a + 1, k):
                distinct = distinct & ~_equal_positions(n, (a, b), k, xb.device)
        kept = torch.where(left_out, torch.ones((), dtype=xb.dtype, device=xb.device),
                           xb.reshape(*batch, *([1] * k), n))
        return kept.prod(-1) * distinct

    derivative = planned(ctx, (*batch, *([n] * k)), build)
    workspace = math.prod(batch) * n ** total + DENSE_WORKSPACE * derivative.numel()  # kept, before its prod
    lab = LabelMaker()
    bl = lab.dims(batch)
    pos = lab.dims([n] * k)
    if dim is None:
        # Each x port is the flattened input: one label of size numel covers every dim.
        return lab.factor((), [(p,) for p in pos], [(derivative, pos)], workspace=workspace)

    def port(p):
        labels = list(bl)
        labels.insert(dim, p)
        return tuple(labels)

    return lab.factor(bl, [port(p) for p in pos], [(derivative, bl + pos)], workspace=workspace)


def _prod_dim(ctx, slots):
    return _prod(ctx, slots, normalize_dim(ctx.saved("dim"), len(ctx.in_shapes[0])))


# ---------------------------------------------------------------- as composites (xa.composite)
#
# softmax(x) = e / sum(e) with e = exp(x - c) for any constant c; with c = logsumexp(x),
# e is softmax's saved result itself and the sum is one: the pieces' saved values cost nothing.


def _ones(t, dims):
    shape = list(t.shape)
    for d in dims:
        shape[d] = 1
    return torch.ones(shape, dtype=t.dtype, device=t.device)


def _result_and_dim(ctx):
    """softmax's and log_softmax's saved result, its dim, and the sum's value along it (ones); ``None`` for 0-d."""
    y = ctx.saved("result")
    if y.dim() == 0:
        return None
    d = normalize_dim(ctx.saved("dim"), y.dim())
    return y, d, _ones(y, (d,))


def _softmax_pieces(ctx):
    """``e = exp(x - c)``, ``s = sum(e, dim)``, ``y = e / s`` (0-d: kept whole, a constant)."""
    found = _result_and_dim(ctx)
    if found is None:
        return None
    y, d, s = found
    return [
        Piece("ExpBackward0", y.shape, (("in", 0),), {"result": y}, "exp"),
        Piece("SumBackward1", s.shape, (("piece", 0),), {"dim": (d,), "keepdim": True}, "sum"),
        Piece("DivBackward0", y.shape, (("piece", 0), ("piece", 1)), {"self": y, "other": s}, "divide"),
    ]


def _log_softmax_pieces(ctx):
    """``e = exp(x - c)``, ``s = sum(e, dim)``, ``y = x - log(s)``."""
    found = _result_and_dim(ctx)
    if found is None:
        return None
    y, d, s = found
    return [
        Piece("ExpBackward0", y.shape, (("in", 0),), {"result": torch.exp(y)}, "exp"),
        Piece("SumBackward1", s.shape, (("piece", 0),), {"dim": (d,), "keepdim": True}, "sum"),
        Piece("LogBackward0", s.shape, (("piece", 1),), {"self": s}, "log"),
        Piece("SubBackward0", y.shape, (("in", 0), ("piece", 2)), {"alpha": 1}, "x - log"),
    ]


def _logsumexp_pieces(ctx):
    """``e = exp(x - c)``, ``y = log(sum(e, dims))``."""
    x, result = ctx.saved("self"), ctx.saved("result")
    if x.dim() == 0:
        return None
    along = _Along(ctx, ctx.saved("dim"))
    keepdim = bool(ctx.saved("keepdim"))
    kept = result if keepdim else result.reshape([1 if d in along.reduced else n for d, n in enumerate(x.shape)])
    s = torch.ones(result.shape, dtype=result.dtype, device=result.device)
    return [
        Piece("ExpBackward0", x.shape, (("in", 0),), {"result": torch.exp(x - kept)}, "exp"),
        Piece("SumBackward1", s.shape, (("piece", 0),), {"dim": tuple(along.reduced), "keepdim": keepdim}, "sum"),
        Piece("LogBackward0", s.shape, (("piece", 1),), {"self": s}, "log"),
    ]


def _along_entries(dims_of):
    """The composite's ``entries``: the input's entries times the reduced run's size to the order."""

    def entries(ctx, order):
        shape = ctx.in_shapes[0] or ctx.out_shape
        n = math.prod(shape[d] for d in {normalize_dim(d, len(shape)) for d in dims_of(ctx)}) if shape else 1
        return math.prod(shape) * n ** order

    return entries


def _one_dim(ctx):
    return (ctx.saved("dim"),)


softmax = register("SoftmaxBackward0", composite(_softmax, _softmax_pieces, _along_entries(_one_dim)))
register("ProdBackward0", _prod)
register("ProdBackward1", _prod_dim)

# ---------------------------------------------------------------- softmax-shaped reductions


class _Along:
    """The input's dims as batch dims (kept, tied to the output) and the reduced dims.

    Each run of adjacent reduced dims gets one label per port, so ports stay
    row-major and operands small; ``flat`` lays a tensor shaped like the input
    out as ``(*batch, n)``, the reduced dims flattened in order.
    """

    def __init__(self, ctx, dims):
        self.shape = tuple(ctx.in_shapes[0])
        ndim = len(self.shape)
        self.reduced = sorted({normalize_dim(d, ndim) for d in dims}) if ndim else []
        self.kept = [d for d in range(ndim) if d not in self.reduced]
        self.runs = []
        for d in self.reduced:
            if self.runs and self.runs[-1][-1] == d - 1:
                self.runs[-1].append(d)
            else:
                self.runs.append([d])
        self.sizes = [math.prod(self.shape[d] for d in run) for run in self.runs]
        self.batch = [self.shape[d] for d in self.kept]

    def flat(self, t):
        return t.permute([*self.kept, *self.reduced]).reshape([*self.batch, math.prod(self.sizes)])

    def port(self, batch_labels, run_labels):
        labels = dict(zip(self.kept, batch_labels))
        labels.update({run[0]: label for run, label in zip(self.runs, run_labels)})
        return tuple(labels[d] for d in sorted(labels))


def _softmax_factor(ctx, along, s, k, coef=1.0, y_along=False):
    """``coef`` times the (k-1)-th derivative of softmax ``s`` (shaped like the input), on ``k`` x ports.

    The y port is the batch labels, plus, with ``y_along``, fresh labels on the
    reduced dims that no operand carries: the derivative is the same for every
    entry along them (log_softmax).
    """
    derivative = softmax_derivative(ctx, along.flat(s), k - 1).reshape([*along.batch, *(along.sizes * k)])
    lab = LabelMaker()
    bl = lab.dims(along.batch)
    pos = [lab.dims(along.sizes) for _ in range(k)]
    out = along.port(bl, lab.dims(along.sizes)) if y_along else bl
    return lab.factor(out, [along.port(bl, p) for p in pos], [(derivative, bl + sum(pos, ()))], coef,
                      workspace=DENSE_WORKSPACE * derivative.numel())


def _logsumexp(ctx, slots):
    x, result = ctx.saved("self"), ctx.saved("result")
    along = _Along(ctx, ctx.saved("dim"))
    if not ctx.saved("keepdim"):
        result = result.reshape([1 if d in along.reduced else n for d, n in enumerate(x.shape)])
    return _softmax_factor(ctx, along, torch.exp(x - result), len(slots))


def _log_softmax(ctx, slots):
    along = _Along(ctx, (ctx.saved("dim"),))
    s = torch.exp(ctx.saved("result"))
    if len(slots) >= 2:
        return _softmax_factor(ctx, along, s, len(slots), coef=-1.0, y_along=True)
    # d_ij - s_j is a sum, so it is one dense operand along dim: (batch, i, j).
    flat = along.flat(s)
    n = flat.shape[-1]
    jac = torch.eye(n, dtype=flat.dtype, device=flat.device) - flat.unsqueeze(-2)
    lab = LabelMaker()
    bl, i, j = lab.dims(along.batch), lab.dims(along.sizes), lab.dims(along.sizes)
    operand = jac.reshape([*along.batch, *along.sizes, *along.sizes])
    return lab.factor(along.port(bl, i), [along.port(bl, j)], [(operand, bl + i + j)])


register("LogsumexpBackward0", composite(_logsumexp, _logsumexp_pieces, _along_entries(
    lambda ctx: ctx.saved("dim") or range(len(ctx.in_shapes[0] or ())))))
register("LogSoftmaxBackward0", composite(_log_softmax, _log_softmax_pieces, _along_entries(_one_dim)))

# ---------------------------------------------------------------- max and min


def _select(ctx, lab, slot):
    """max / min / median / kthvalue / mode along ``dim``: the one-hot of torch's saved indices along it."""
    along = _Along(ctx, (ctx.saved("dim"),))
    if not along.reduced:  # a 0-d input is its own max
        return (), (), ()
    (d,) = along.reduced
    indices = ctx.saved("indices")
    if not ctx.saved("keepdim"):
        indices = indices.unsqueeze(d)
    # the stand-ins of planning pick index 0: the same shapes, so planning needs no branch.
    onehot = torch.zeros(along.shape, dtype=ctx.dtype, device=indices.device).scatter(d, indices, 1.0)
    x = lab.dims(along.shape)
    return [x[k] for k in along.kept], x, [(onehot, x)]


def _even(all_dims: bool):
    """max / min of all entries, amax / amin: ``[x == y] / c``, ``c`` the number of ties per output."""

    def build(ctx, lab, slot):
        x, result = ctx.saved("self"), ctx.saved("result")
        dims = () if all_dims else ctx.saved("dim")
        along = _Along(ctx, dims or range(x.dim()))
        if all_dims or not ctx.saved("keepdim"):
            result = result.reshape([1 if d in along.reduced else n for d, n in enumerate(x.shape)])
        ties = (x == result).to(ctx.dtype)
        share = ties / ties.sum(along.reduced, keepdim=True) if along.reduced else ties
        xl = lab.dims(along.shape)
        return [xl[d] for d in along.kept], xl, [(share, xl)]

    return linear_map(build)


# the values along ``dim`` that torch's saved indices pick: max, min, median, nanmedian, kthvalue, mode
for _name in ("MaxBackward0", "MinBackward0", "MedianBackward1", "NanmedianBackward1", "KthvalueBackward0",
              "ModeBackward0"):
    register(_name, linear_map(_select))
register("MaxBackward1", _even(all_dims=True))
register("MinBackward1", _even(all_dims=True))
register("AmaxBackward0", _even(all_dims=False))
register("AminBackward0", _even(all_dims=False))
# median of all entries: torch shares a tie among the medians evenly too (evenly_distribute_backward)
register("MedianBackward0", _even(all_dims=True))
register("NanmedianBackward0", _even(all_dims=True))

# ---------------------------------------------------------------- var, std, vector norms
#
# Each is y = f(g) of every group g of entries along the reduced dims. Whole, the k-th derivative is the
# dense T_k = d^k f / dg^k of each group by nested jacfwd (small groups); as a composite, the pieces torch
# could have recorded: var = sum((x - mean)^2) / (n - correction), std = sqrt(var), a vector norm
# sum(|x|^p)^(1/p) (p = 2: sqrt(sum(x^2)); p = inf: amax(|x|)), each with structured rules.


def _reduced_dims(ctx):
    shape = ctx.in_shapes[0] or tuple(ctx.saved("self").shape)
    return ctx.saved("dim") or range(len(shape))


def _correction(ctx) -> float:
    c = ctx.saved("correction")
    return 1.0 if c is None else float(c)


def _real_input(ctx):
    x = ctx.saved("self")
    if x.is_complex():
        raise UnsupportedOperatorError(f"{ctx.name}: a complex input is not supported")
    return x.to(ctx.dtype)


def _norm_order(ctx) -> float:
    """``ord`` of linalg.vector_norm, ``p`` of torch.norm (None is 2)."""
    p = ctx.saved("ord") if ctx.has("ord") else ctx.saved("p") if ctx.has("p") else 2.0
    if isinstance(p, complex):
        raise UnsupportedOperatorError(f"{ctx.name}: a complex ord is not supported")
    return float(p)


def _variance(n, c):
    return lambda g: ((g - g.mean()) ** 2).sum() / (n - c)


def _group_function(kind):
    """``fn(ctx, n) -> f`` for one group of ``n`` entries, or ``None`` where every derivative is zero."""

    def var(ctx, n):
        return _variance(n, _correction(ctx))

    def std(ctx, n):
        v = _variance(n, _correction(ctx))
        return lambda g: torch.sqrt(v(g))

    def norm(ctx, n):
        p = _norm_order(ctx)
        if p == 0:
            return None  # the count of nonzero entries: piecewise constant
        if p == 2:
            return _norm2
        if math.isinf(p):
            return lambda g: g.abs().amax() if p > 0 else g.abs().amin()
        return lambda g: (g.abs() ** p).sum() ** (1.0 / p)

    return {"var": var, "std": std, "norm": norm}[kind]


def _norm2(g):
    """``sqrt(sum(g^2))``, every derivative 0 where it is 0 (a padding row), as torch gives (a NaN through sqrt):
    the zero branch of a ``where`` whose other branch reads a safe 1 there."""
    s = (g * g).sum()
    zero = s == 0
    return torch.where(zero, torch.zeros_like(s), torch.sqrt(torch.where(zero, torch.ones_like(s), s)))


def _group_rule(kind):
    fn_of = _group_function(kind)

    def rule(ctx, slots):
        k = len(slots)
        x = _real_input(ctx)
        along = _Along(ctx, _reduced_dims(ctx))
        n = math.prod(along.sizes)
        fn = fn_of(ctx, n)
        if fn is None:
            return None
        shape = (*along.batch, *(along.sizes * k))

        def build():
            f = fn
            for _ in range(k):
                f = jacfwd(f)
            return vmap(f)(along.flat(x).reshape(-1, n)).reshape(shape)

        dense = planned(ctx, shape, build)
        lab = LabelMaker()
        bl = lab.dims(along.batch)
        pos = [lab.dims(along.sizes) for _ in range(k)]
        return lab.factor(bl, [along.port(bl, p) for p in pos], [(dense, bl + sum(pos, ()))],
                          workspace=DENSE_WORKSPACE * math.prod(shape))

    return rule


def _var_pieces(ctx, root=False):
    """``m = mean(x)``, ``d = x - m``, ``q = d^2``, ``s = sum(q)``, ``v = s / (n - correction)`` (, ``sqrt(v)``)."""
    x = _real_input(ctx)
    along = _Along(ctx, _reduced_dims(ctx))
    n, c = math.prod(along.sizes), _correction(ctx)
    if x.dim() == 0 or n - c <= 0:
        return None
    reduced, keepdim = tuple(along.reduced), bool(ctx.saved("keepdim"))
    mean = x.mean(reduced, keepdim=True)
    d = x - mean
    s_shape = tuple(d.sum(reduced, keepdim=keepdim).shape)
    pieces = [
        Piece("MeanBackward1", mean.shape, (("in", 0),), {"dim": reduced, "keepdim": True}, "mean"),
        Piece("SubBackward0", x.shape, (("in", 0), ("piece", 0)), {"alpha": 1}, "x - mean"),
        Piece("PowBackward0", x.shape, (("piece", 1),), {"self": d, "exponent": 2.0}, "square"),
        Piece("SumBackward1", s_shape, (("piece", 2),), {"dim": reduced, "keepdim": keepdim}, "sum"),
        Piece("MulBackward1", s_shape, (("piece", 3),), {"other": 1.0 / (n - c)}, "/ (n - correction)"),
    ]
    if root:
        pieces.append(Piece("SqrtBackward0", s_shape, (("piece", 4),), {"result": ctx.saved("result")}, "sqrt"))
    return pieces


def _norm_pieces(ctx):
    """``sqrt(sum(x^2))``, ``amax(|x|)`` / ``amin(|x|)``, or ``sum(|x|^p)^(1/p)`` over the reduced dims."""
    x = _real_input(ctx)
    p = _norm_order(ctx)
    if x.dim() == 0 or p == 0:
        return None
    along = _Along(ctx, _reduced_dims(ctx))
    reduced, keepdim = tuple(along.reduced), bool(ctx.saved("keepdim"))
    result = ctx.saved("result").to(ctx.dtype)
    r_shape = tuple(result.shape)
    total = {"dim": reduced, "keepdim": keepdim}
    if p == 2:
        # where the norm is 0 torch gives the subgradient 0 at every order: sqrt's k-th derivative
        # c_k r^(1 - 2k) read at r = inf is that 0 (at r = 0 it is inf, and inf * 0 a NaN)
        root = torch.where(result == 0, torch.inf, result)
        return [
            Piece("PowBackward0", x.shape, (("in", 0),), {"self": x, "exponent": 2.0}, "square"),
            Piece("SumBackward1", r_shape, (("piece", 0),), total, "sum"),
            Piece("SqrtBackward0", r_shape, (("piece", 1),), {"result": root}, "sqrt"),
        ]
    a = x.abs()
    pieces = [Piece("AbsBackward0", x.shape, (("in", 0),), {"self": x}, "abs")]
    if math.isinf(p):
        name = "AmaxBackward0" if p > 0 else "AminBackward0"
        pieces.append(Piece(name, r_shape, (("piece", 0),), {"self": a, "result": result, **total}, "max |x|"))
        return pieces
    if p == 1:
        pieces.append(Piece("SumBackward1", r_shape, (("piece", 0),), total, "sum"))
        return pieces
    return pieces + [
        Piece("PowBackward0", x.shape, (("piece", 0),), {"self": a, "exponent": p}, "|x|^p"),
        Piece("SumBackward1", r_shape, (("piece", 1),), total, "sum"),
        Piece("PowBackward0", r_shape, (("piece", 2),), {"self": result**p, "exponent": 1.0 / p}, "^(1/p)"),
    ]


register("VarBackward0", composite(_group_rule("var"), _var_pieces, _along_entries(_reduced_dims)))
register("StdBackward0", composite(_group_rule("std"), lambda ctx: _var_pieces(ctx, root=True),
                                   _along_entries(_reduced_dims)))
# torch.linalg.vector_norm, torch.norm, Tensor.norm
_norm = register("LinalgVectorNormBackward0", composite(_group_rule("norm"), _norm_pieces,
                                                        _along_entries(_reduced_dims)))
register("NormBackward1", _norm)  # torch.norm(x, p, dim) on some paths: F.pairwise_distance


def _dist_pieces(ctx):
    """``torch.dist(x, y, p)``: ``d = x - y`` (broadcast), then the p-norm of all of ``d`` (a composite itself)."""
    x, y = ctx.saved("self").to(ctx.dtype), ctx.saved("other").to(ctx.dtype)
    d = x - y
    norm = {"self": d, "ord": ctx.saved("p"), "dim": None, "keepdim": False, "result": ctx.saved("result")}
    return [Piece("SubBackward0", d.shape, (("in", 0), ("in", 1)), {"alpha": 1}, "x - y"),
            Piece("LinalgVectorNormBackward0", (), (("piece", 0),), norm, "norm")]


def _dist(ctx, slots):
    raise UnsupportedOperatorError(f"{ctx.name}: torch.dist runs as the norm of x - y (its composite)")


register("DistBackward0", composite(_dist, _dist_pieces))

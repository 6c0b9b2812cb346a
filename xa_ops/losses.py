"""Losses: mse, smooth_l1, huber, binary cross-entropy (on probabilities and on logits), nll.

Pointwise losses are ``l = f(x, t)`` entrywise (``x`` the prediction, slot
0; ``t`` the target, slot 1, where torch lets it require grad), then a
reduction. The rule gives the mixed partial ``d^(i+j) f / dx^i dt^j`` as one
tensor whose labels every port shares (a diagonal); 'none' keeps those
labels on the ``y`` port, 'sum' leaves the ``y`` port empty so they are
summed, 'mean' does the same with ``coef = 1 / numel``. With ``w`` the
weight, ``p`` the pos_weight (1 when absent), ``d = x - t``:

* mse:        ``f = d^2``; ``d^(i+j) f / dx^i dt^j`` is ``(-1)^j`` times the ``(i+j)``-th
  derivative of ``d^2``: ``2 d``, then ``2``, then zero.
* bce:        ``f = -w (t log x + (1 - t) log(1 - x))``, linear in ``t``: every
  derivative is a combination of ``log^(i)(x)`` and ``log^(i)(1 - x)``.
* bce_with_logits: ``f = w ((1 - t) x + (1 + (p - 1) t) sp(-x))``, ``sp`` the
  softplus, ``d^i sp(-x) / dx^i = (-1)^i s^(i-1)(-x)`` for ``i >= 1``, ``s`` the
  sigmoid, whose derivatives are polynomials in ``s``.
* smooth_l1: ``f = g(d)``, ``g = d^2 / (2 beta)`` for ``|d| < beta`` and
  ``|d| - beta / 2`` beyond; like torch, the derivatives are those of the
  active piece: ``g'' = [|d| < beta] / beta``, the third is zero.

nll_loss is linear in its input: ``y_n = -w[c_n] x[n, c_n]`` for each
target class ``c_n`` other than ``ignore_index`` (``n`` running over the
batch and any spatial dims; the class dim is dim 1, or dim 0 of a 1-d
input), summed for 'sum' and divided by torch's saved total weight for
'mean'. Its derivative is that weighted one-hot selection; every higher
order is zero. cross_entropy is log_softmax followed by nll_loss, or, with
probabilities as targets or label smoothing, by products and sums; the few
scalar operators it records on the way are registered at the end. (l1_loss
is recorded as sub, abs and mean or sum, which have rules elsewhere.)
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from xa.factor import LabelMaker, broadcast_port, broadcast_shapes, signed
from xa.families import linear_map
from xa.registry import register

NONE, MEAN, SUM = 0, 1, 2  # torch's reduction enum, as saved on the node


def _pointwise(deriv):
    """Rule for ``reduce(f(x, t))``; ``deriv(ctx, i, j)`` is ``d^(i+j) f / dx^i dt^j`` entrywise, or ``None``."""

    def rule(ctx, slots):
        value = deriv(ctx, slots.count(0), slots.count(1))
        if value is None:
            return None
        # f's entries: self and target broadcast (and the weights, which torch multiplies in last).
        names = [n for n in ("self", "target", "weight", "pos_weight") if ctx.has(n)]
        shape = broadcast_shapes(*(ctx.saved(n).shape for n in names))
        lab = LabelMaker()
        e = lab.dims(shape)
        ports = [broadcast_port(lab, e, shape, ctx.in_shapes[s]) for s in slots]
        reduction = ctx.saved("reduction")
        out = e if reduction == NONE else ()
        coef = 1.0 / max(math.prod(shape), 1) if reduction == MEAN else 1.0
        return lab.factor(out, ports, [(value.expand(shape), e)], coef)

    return rule


def _weight(ctx):
    return ctx.saved("weight") if ctx.has("weight") else 1.0


@lru_cache(maxsize=None)
def _sigmoid_poly(m: int) -> tuple:
    """Coefficients (lowest first) of ``P_m`` with ``s^(m) = P_m(s)``: ``P_0 = s``, ``P_(m+1) = P_m' (s - s^2)``."""
    p = np.array([0.0, 1.0])
    for _ in range(m):
        p = np.polynomial.polynomial.polymul(np.polynomial.polynomial.polyder(p), [0.0, 1.0, -1.0])
    return tuple(float(c) for c in p)


def _sigmoid_derivative(z, m: int):
    s = torch.sigmoid(z)
    coeffs = _sigmoid_poly(m)
    acc = torch.full_like(s, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * s + c
    return acc


def _log_derivative(z, i: int):
    """``log^(i)(z) = (-1)^(i-1) (i-1)! z^-i``, ``i >= 1``."""
    return (-1) ** (i - 1) * math.factorial(i - 1) * z**-i


# ---------------------------------------------------------------- mse, smooth_l1: f = g(x - t)


def _of_difference(g):
    """``deriv`` for ``f = g(x - t)``: ``g(ctx, d, n)`` is ``g^(n)(d)``, ``n >= 1``, or ``None``."""

    def deriv(ctx, i, j):
        d = ctx.saved("self") - ctx.saved("target")
        value = g(ctx, d, i + j)
        return None if value is None else (-1) ** j * value

    return deriv


def _mse(ctx, d, n):
    if n > 2:
        return None  # a quadratic
    return 2.0 * d if n == 1 else torch.full_like(d, 2.0)


def _smooth_l1(ctx, d, n):
    beta = float(ctx.saved("beta"))
    if n > 2 or (n == 2 and beta == 0.0):  # beta = 0 is l1: no quadratic piece
        return None
    inside = d.abs() < beta
    if n == 2:
        return inside.to(ctx.dtype) / beta
    # torch's first derivative: the quadratic piece's slope inside, the linear piece's outside
    return torch.where(inside, d / beta if beta else d, torch.sign(d))


def _huber(ctx, d, n):
    """``d^2 / 2`` for ``|d| <= delta``, ``delta (|d| - delta / 2)`` beyond: ``delta * smooth_l1(beta=delta)``.
    torch's first derivative takes the quadratic piece's slope on the closed interval, its second the open one."""
    delta = float(ctx.saved("delta"))
    if n > 2:
        return None
    if n == 2:
        return (d.abs() < delta).to(ctx.dtype)
    return torch.where(d.abs() <= delta, d, delta * torch.sign(d))


register("MseLossBackward0", _pointwise(_of_difference(_mse)))
register("SmoothL1LossBackward0", _pointwise(_of_difference(_smooth_l1)))
# torch has no forward-mode derivative of huber_loss_backward, so torch.func checks its samples at the
# first order only; tests/test_operators.py checks the higher ones against delta * smooth_l1(beta=delta).
register("HuberLossBackward0", _pointwise(_of_difference(_huber)))
# SoftMarginLossBackward0 is left out: torch has no forward-mode derivative of its backward, so torch.func,
# the reference, cannot check a rule past the first order.

# ---------------------------------------------------------------- binary cross-entropy


def _bce(ctx, i, j):
    """``f = -w (t log x + (1 - t) log(1 - x))``; torch clamps the logs at -100 (within e^-100 of 0 or 1)."""
    if j > 1:
        return None
    x, t, w = ctx.saved("self"), ctx.saved("target"), _weight(ctx)
    if i == 0:  # d/dt
        return w * (torch.log1p(-x) - torch.log(x))
    log_x, log_1mx = _log_derivative(x, i), (-1) ** i * _log_derivative(1.0 - x, i)
    return -w * (log_x - log_1mx if j else t * log_x + (1.0 - t) * log_1mx)


def _bce_with_logits(ctx, i, j):
    """``f = w (a x + b sp(-x))``, ``(a, b) = (1 - t, 1 + (p - 1) t)``; ``df/dt`` is the same with ``(-1, p - 1)``."""
    if j > 1:
        return None
    x, t = ctx.saved("self"), ctx.saved("target")
    p = ctx.saved("pos_weight") if ctx.has("pos_weight") else None
    if j == 0:
        a, b = 1.0 - t, 1.0 if p is None else 1.0 + (p - 1.0) * t
    else:
        if p is None and i >= 2:
            return None  # df/dt = -w x
        a, b = -1.0, 0.0 if p is None else p - 1.0
    softplus = -F.logsigmoid(x) if i == 0 else (-1) ** i * _sigmoid_derivative(-x, i - 1)
    linear = a * x if i == 0 else a if i == 1 else 0.0
    return _weight(ctx) * (linear + b * softplus)


register("BinaryCrossEntropyBackward0", _pointwise(_bce))
register("BinaryCrossEntropyWithLogitsBackward0", _pointwise(_bce_with_logits))

# ---------------------------------------------------------------- nll_loss


def _nll(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    cd = 1 if len(shape) >= 2 else 0  # the class dim
    along = [shape[cd]] + [1] * (len(shape) - cd - 1)  # a vector over classes, broadcast against x
    target = ctx.saved("target").unsqueeze(cd)
    classes = torch.arange(shape[cd], device=ctx.device).view(along)
    picked = ((target == classes) & (target != signed(ctx.saved("ignore_index")))).to(ctx.dtype)
    if ctx.has("weight"):
        picked = picked * ctx.saved("weight").view(along)
    reduction = ctx.saved("reduction")
    if reduction == MEAN:  # torch divides by the summed weight of the picked classes, saved as total_weight
        picked = picked / ctx.saved("total_weight")
    x = lab.dims(shape)
    return x[:cd] + x[cd + 1:] if reduction == NONE else (), x, [(picked, x)]


_nll_rule = linear_map(_nll, lambda ctx, slot: -1.0)
register("NllLossBackward0", _nll_rule)
register("NllLoss2DBackward0", _nll_rule)  # inputs with spatial dims: torch views them as (N, C, H, W)


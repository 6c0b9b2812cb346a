"""Elementwise math: closed-form k-th derivatives from what torch saved.

Where torch saved the result ``y`` (exp, sqrt, ...) the derivative is
written in ``y``; where it saved the input ``x`` (log, sin, ...), in ``x``.
abs is piecewise smooth: its derivatives are those of the active piece,
``sign(x)`` then zero, as torch's are.
"""

import math

import numpy as np
import torch

from xa.registry import register

from .families import elementwise, elementwise2


def _falling(p: float, k: int) -> float:
    """``p (p-1) ... (p-k+1)``: the k-th derivative's constant for ``x^p``."""
    out = 1.0
    for j in range(k):
        out *= p - j
    return out


def _integer(p) -> bool:
    return float(p).is_integer() and p >= 0


register("ExpBackward0", elementwise(lambda ctx, k: ctx.saved("result")))
register("Exp2Backward0", elementwise(lambda ctx, k: ctx.saved("result") * math.log(2.0) ** k))
register("Expm1Backward0", elementwise(lambda ctx, k: ctx.saved("result") + 1.0))
register("LogBackward0", elementwise(lambda ctx, k: (-1) ** (k - 1) * math.factorial(k - 1) * ctx.saved("self") ** -k))
register("Log2Backward0", elementwise(
    lambda ctx, k: (-1) ** (k - 1) * math.factorial(k - 1) * ctx.saved("self") ** -k / math.log(2.0)))
register("Log1PBackward0", elementwise(
    lambda ctx, k: (-1) ** (k - 1) * math.factorial(k - 1) * (1.0 + ctx.saved("self")) ** -k))
register("SinBackward0", elementwise(lambda ctx, k: torch.sin(ctx.saved("self") + k * math.pi / 2)))
register("CosBackward0", elementwise(lambda ctx, k: torch.cos(ctx.saved("self") + k * math.pi / 2)))
# sqrt: y = x^(1/2), so x^(1/2 - k) = y^(1 - 2k); rsqrt: y = x^(-1/2), x^(-1/2 - k) = y^(1 + 2k)
register("SqrtBackward0", elementwise(lambda ctx, k: _falling(0.5, k) * ctx.saved("result") ** (1 - 2 * k)))
register("RsqrtBackward0", elementwise(lambda ctx, k: _falling(-0.5, k) * ctx.saved("result") ** (1 + 2 * k)))
# reciprocal: y = 1/x, d^k = (-1)^k k! x^-(k+1) = (-1)^k k! y^(k+1)
register("ReciprocalBackward0", elementwise(
    lambda ctx, k: (-1) ** k * math.factorial(k) * ctx.saved("result") ** (k + 1)))
register("AbsBackward0", elementwise(lambda ctx, k: torch.sign(ctx.saved("self")) if k == 1 else None))


def _pow_scalar_exponent(ctx, k):
    p = ctx.saved("exponent")
    if _integer(p) and k > p:
        return None  # a polynomial of degree p: zero by structure
    return _falling(float(p), k) * ctx.saved("self") ** (float(p) - k)


register("PowBackward0", elementwise(_pow_scalar_exponent))


def _pow_tensors(ctx, i, j):
    """``d^i/dx^i d^j/dp^j x^p = sum_m C(j, m) F_i^(m)(p) log(x)^(j-m) x^(p-i)``, ``F_i`` the falling factorial."""
    x, p = ctx.saved("self"), ctx.saved("exponent")
    falling = np.array([1.0])
    for r in range(i):
        falling = np.polynomial.polynomial.polymul(falling, [-r, 1.0])
    log_x = torch.log(x)
    total = None
    for m in range(j + 1):
        coeffs = np.polynomial.polynomial.polyder(falling, m) if m else falling
        if not np.any(coeffs):
            continue
        poly = sum(float(c) * p**n for n, c in enumerate(coeffs))
        term = math.comb(j, m) * poly * log_x ** (j - m)
        total = term if total is None else total + term
    return None if total is None else total * x ** (p - i)


def _pow_scalar_base(ctx, i, j):
    # c ** p with a number c: only the exponent is an input (slot 0)
    return ctx.saved("result") * math.log(ctx.saved("self")) ** i


def _div(ctx, i, j):
    """``y = a / b``: linear in ``a``; ``d^j/db^j b^-1 = (-1)^j j! b^-(j+1)``."""
    if i >= 2:
        return None
    b = ctx.saved("other").to(ctx.dtype)  # a count saved as an integer tensor (cross_entropy smoothing)
    inv = (-1) ** j * math.factorial(j) * b ** -(j + 1)
    return inv if i == 1 else ctx.saved("self") * inv


register("PowBackward1", elementwise2(_pow_tensors))
register("PowBackward2", elementwise2(_pow_scalar_base))
register("DivBackward0", elementwise2(_div))

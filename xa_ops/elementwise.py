"""Pointwise operators: each is its k-th derivative, as a function of what torch saved.

One input (:func:`~xa_ops.families.elementwise`): the derivative is one
tensor shaped like the output whose labels every port shares -- a
diagonal, never built. Two inputs broadcast against each other
(:func:`~xa_ops.families.elementwise2`: div, pow, where, prelu): the mixed
partial ``d^(i+j) f / dx0^i dx1^j``.

Where torch saved the result ``y`` (exp, sqrt, tanh, ...) the derivative is
written in ``y``; where it saved the input ``x`` (log, sin, ...), in ``x``.
Smooth activations without a handy closed form are written as the torch
expression of the function and differentiated k times in forward mode
(:func:`~xa_ops.families.taylor`). Piecewise ones (relu, abs, leaky_relu,
hardtanh, clamp, where, prelu) have the derivatives of the active piece, as
torch's: the slope where the piece is linear, zero beyond.
"""

import math

import numpy as np
import torch

from xa.registry import register

from .families import elementwise, elementwise2, polynomial_in_result, taylor

# ---------------------------------------------------------------- tanh, sigmoid, relu

def _relu(ctx, k):
    # The derivative of the active piece, as torch's own: 1 where y > 0, else 0.
    return (ctx.saved("result") > 0).to(ctx.dtype) if k == 1 else None


register("TanhBackward0", elementwise(polynomial_in_result((1.0, 0.0, -1.0))))  # tanh' = 1 - y^2
register("SigmoidBackward0", elementwise(polynomial_in_result((0.0, 1.0, -1.0))))  # s' = s - s^2
register("ReluBackward0", elementwise(_relu))

# ---------------------------------------------------------------- exp, log, trigonometry, powers

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

# ---------------------------------------------------------------- activations

def _elu(ctx, x):
    alpha, scale, input_scale = (float(ctx.saved(n)) for n in ("alpha", "scale", "input_scale"))
    return scale * torch.where(x > 0, x, alpha * torch.expm1(input_scale * x))


def _celu(ctx, x):
    alpha = float(ctx.saved("alpha"))
    return torch.where(x > 0, x, alpha * torch.expm1(x / alpha))


def _gelu(ctx, x):
    if ctx.saved("approximate") == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softplus(ctx, x):
    beta, threshold = float(ctx.saved("beta")), float(ctx.saved("threshold"))
    # torch switches to the identity above the threshold; so do its derivatives
    return torch.where(beta * x > threshold, x, torch.log1p(torch.exp(beta * x)) / beta)


def _softplus_unit(x):
    return torch.where(x > 20.0, x, torch.log1p(torch.exp(x)))


register("EluBackward0", elementwise(taylor(_elu)))  # elu and selu
register("CeluBackward0", elementwise(taylor(_celu)))
register("GeluBackward0", elementwise(taylor(_gelu)))
register("SiluBackward0", elementwise(taylor(lambda ctx, x: x * torch.sigmoid(x))))
register("MishBackward0", elementwise(taylor(lambda ctx, x: x * torch.tanh(_softplus_unit(x)))))
register("SoftplusBackward0", elementwise(taylor(_softplus)))
register("LogSigmoidBackward0", elementwise(taylor(lambda ctx, x: -_softplus_unit(-x))))
register("ErfBackward0", elementwise(taylor(lambda ctx, x: torch.erf(x))))
register("TanBackward0", elementwise(polynomial_in_result((1.0, 0.0, 1.0))))  # tan' = 1 + y^2


def _leaky_relu(ctx, k):
    if k > 1:
        return None
    x = ctx.saved("self")
    return torch.where(x > 0, 1.0, float(ctx.saved("negative_slope"))).to(ctx.dtype)


def _hardtanh(ctx, k):
    if k > 1:
        return None
    x = ctx.saved("self")
    return ((x > float(ctx.saved("min_val"))) & (x < float(ctx.saved("max_val")))).to(ctx.dtype)


def _clamp(ctx, k):
    if k > 1:
        return None
    x = ctx.saved("self")
    inside = torch.ones_like(x, dtype=torch.bool)
    if ctx.has("min"):  # clamp_min and clamp_max save only their own bound
        inside = inside & (x >= ctx.saved("min"))
    if ctx.has("max"):
        inside = inside & (x <= ctx.saved("max"))
    return inside.to(ctx.dtype)


register("LeakyReluBackward0", elementwise(_leaky_relu))
register("HardtanhBackward0", elementwise(_hardtanh))  # hardtanh, relu6
register("ClampBackward1", elementwise(_clamp))
register("ClampMinBackward0", elementwise(_clamp))  # x.clamp_min(c); vmap of clamp(min=c) records it too
register("ClampMaxBackward0", elementwise(_clamp))


def _prelu(ctx, i, j):
    """``y = x if x > 0 else w x``, ``w`` broadcast (torch saves it viewed to x's rank)."""
    x, w = ctx.saved("self"), ctx.saved("weight")
    positive = x > 0
    if (i, j) == (1, 0):
        return torch.where(positive, torch.ones((), dtype=ctx.dtype, device=x.device), w)
    if (i, j) == (0, 1):
        return torch.where(positive, torch.zeros((), dtype=ctx.dtype, device=x.device), x)
    if (i, j) == (1, 1):
        return (~positive).to(ctx.dtype)
    return None


def _where(ctx, i, j):
    if i + j > 1:
        return None
    cond = ctx.saved("condition")
    return (cond if i else ~cond).to(ctx.dtype)


register("PreluKernelBackward0", elementwise2(_prelu))
register("WhereBackward0", elementwise2(_where))

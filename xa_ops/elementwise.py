"""Pointwise operators: each is its k-th derivative, as a function of what torch saved.

One input (:func:`~xa.families.elementwise`): the derivative is one
tensor shaped like the output whose labels every port shares -- a
diagonal, never built. Two inputs broadcast against each other
(:func:`~xa.families.elementwise2`: div, pow, where, prelu): the mixed
partial ``d^(i+j) f / dx0^i dx1^j``.

Where torch saved the result ``y`` (exp, sqrt, tanh, ...) the derivative is
written in ``y``; where it saved the input ``x`` (log, sin, ...), in ``x``.
Smooth activations without a handy closed form are written as the torch
expression of the function and differentiated k times in forward mode
(:func:`~xa.families.taylor`). Piecewise ones (relu, abs, leaky_relu,
hardtanh, clamp, where, prelu) have the derivatives of the active piece, as
torch's: the slope where the piece is linear, zero beyond.
"""

import itertools
import math
from functools import lru_cache

import numpy as np
import torch

from xa.errors import UnsupportedOperatorError
from xa.factor import LabelMaker, normalize_dim, planned
from xa.families import (
    elementwise,
    elementwise2,
    elementwise_n,
    polynomial_in_result,
    taylor,
    taylor_partial,
    weighted_sum,
)
from xa.registry import register

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
register("DivBackward1", weighted_sum(lambda ctx: (1.0 / float(ctx.saved("other")),)))  # x / c, c a Python number

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
def _silu(ctx, k):
    """``d^k (x s(x)) = k s^(k-1) + x s^(k)``, ``s`` the sigmoid, its derivatives polynomials in ``s``:
    ``s' = t = s - s^2``, ``s'' = t - 2 t s``. ``s`` and ``t`` are computed once per node for every order."""

    def out(key, x):  # the plan's own memory for this factor where the run has it (ctx.out), else None
        return ctx.out(("silu", key), x.shape, x.dtype)

    def sigmoid_and_slope(x):
        s = torch.sigmoid(x, out=out("s", x))
        return s, torch.addcmul(s, s, s, value=-1, out=out("t", x))

    def build():
        x = ctx.saved("self").to(ctx.dtype)
        s, t = ctx.memo("sigmoid", lambda: sigmoid_and_slope(x))
        if k == 1:
            return torch.addcmul(s, x, t, out=out(1, x))
        if k == 2:
            return torch.addcmul(torch.mul(t, 2, out=out("2t", x)), x,
                                 torch.addcmul(t, t, s, value=-2, out=out("t - 2ts", x)), out=out(2, x))
        return torch.addcmul(_SIGMOID(_Result(s), k - 1) * k, x, _SIGMOID(_Result(s), k))

    return planned(ctx, ctx.out_shape, build)


register("SiluBackward0", elementwise(_silu))
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

# ---------------------------------------------------------------- hyperbolic, inverse trigonometric, special functions


def _log_base(base: float):
    """``log_b(x)``: ``(-1)^(k-1) (k-1)! x^-k / ln b``."""
    return lambda ctx, k: (-1) ** (k - 1) * math.factorial(k - 1) * ctx.saved("self") ** -k / math.log(base)


def _logit(ctx, k):
    """``log(x / (1 - x))``: ``(k-1)! ((-1)^(k-1) x^-k + (1 - x)^-k)``; with eps, torch clamps x to
    ``[eps, 1 - eps]`` first, so every derivative is zero outside (both ends inside, as torch's)."""
    x = ctx.saved("self")
    value = math.factorial(k - 1) * ((-1) ** (k - 1) * x**-k + (1.0 - x) ** -k)
    if ctx.has("eps"):
        eps = float(ctx.saved("eps"))
        value = torch.where((x < eps) | (x > 1.0 - eps), torch.zeros((), dtype=value.dtype, device=x.device), value)
    return value


def _hardswish(ctx, k):
    """``x relu6(x + 3) / 6``; torch's pieces: ``x / 3 + 1/2`` on ``[-3, 3]``, then ``1/3`` inside ``(-3, 3)``."""
    x = ctx.saved("self")
    if k == 1:
        one, zero = torch.ones((), dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(x < -3.0, zero, torch.where(x <= 3.0, x / 3.0 + 0.5, one))
    if k == 2:
        return ((x > -3.0) & (x < 3.0)).to(ctx.dtype) / 3.0
    return None


def _mask(inside):
    """A first derivative that is the 0/1 ``inside(ctx, x)`` times a constant, zero beyond: piecewise linear ops."""
    return lambda ctx, k: inside(ctx, ctx.saved("self")).to(ctx.dtype) if k == 1 else None


def _shrunk(ctx, x):
    lambd = float(ctx.saved("lambd"))
    return (x > lambd) | (x < -lambd)


def _zero(ctx, k):
    # floor, ceil, round, trunc, sign: piecewise constant. sgn of a complex input is not.
    if ctx.has("self") and ctx.saved("self").is_complex():
        raise UnsupportedOperatorError(f"{ctx.name}: sgn of a complex tensor is not supported")
    return None


register("SinhBackward0", elementwise(lambda ctx, k: (torch.cosh if k % 2 else torch.sinh)(ctx.saved("self"))))
register("CoshBackward0", elementwise(lambda ctx, k: (torch.sinh if k % 2 else torch.cosh)(ctx.saved("self"))))
register("AtanBackward0", elementwise(taylor(lambda ctx, x: torch.atan(x))))
register("AsinBackward0", elementwise(taylor(lambda ctx, x: torch.asin(x))))
register("AcosBackward0", elementwise(taylor(lambda ctx, x: torch.acos(x))))
register("AsinhBackward0", elementwise(taylor(lambda ctx, x: torch.asinh(x))))
register("AcoshBackward0", elementwise(taylor(lambda ctx, x: torch.acosh(x))))
register("AtanhBackward0", elementwise(taylor(lambda ctx, x: torch.atanh(x))))
register("ErfcBackward0", elementwise(taylor(lambda ctx, x: torch.erfc(x))))
register("ErfinvBackward0", elementwise(taylor(lambda ctx, x: torch.erfinv(x))))
register("SincBackward0", elementwise(taylor(lambda ctx, x: torch.sinc(x))))
register("Log10Backward0", elementwise(_log_base(10.0)))
register("LogitBackward0", elementwise(_logit))
# lgamma' = digamma = polygamma(0), polygamma(n)' = polygamma(n + 1)
register("LgammaBackward0", elementwise(lambda ctx, k: torch.special.polygamma(k - 1, ctx.saved("self"))))
register("DigammaBackward0", elementwise(lambda ctx, k: torch.special.polygamma(k, ctx.saved("self"))))
register("PolygammaBackward0", elementwise(
    lambda ctx, k: torch.special.polygamma(int(ctx.saved("n")) + k, ctx.saved("self"))))
register("HardswishBackward0", elementwise(_hardswish))
register("HardsigmoidBackward0", elementwise(  # relu6(x + 3) / 6: torch's slope 1/6 inside (-3, 3)
    lambda ctx, k: ((ctx.saved("self") > -3.0) & (ctx.saved("self") < 3.0)).to(ctx.dtype) / 6.0 if k == 1 else None))
register("ThresholdBackward0", elementwise(_mask(lambda ctx, x: x > float(ctx.saved("threshold")))))
register("HardshrinkBackward0", elementwise(_mask(_shrunk)))
register("SoftshrinkBackward0", elementwise(_mask(_shrunk)))
register("NanToNumBackward0", elementwise(_mask(lambda ctx, x: torch.isfinite(x))))
for _name in ("SgnBackward0", "SignBackward0", "FloorBackward0", "CeilBackward0", "TruncBackward0",
              "RoundBackward0", "RoundBackward1"):
    register(_name, elementwise(_zero))

# ---------------------------------------------------------------- two and three inputs


def _selection(x_loses, y_loses):
    """maximum / minimum (and fmax / fmin, the same formula): the one-hot of the selected input,
    a tie split evenly as torch does; every higher order is zero."""

    def deriv(ctx, i, j):
        if i + j > 1:
            return None
        x, y = ctx.saved("self"), ctx.saved("other")
        share = torch.where(x == y, 0.5, 1.0).to(ctx.dtype)
        return share * ~(x_loses(x, y) if i else y_loses(x, y))

    return deriv


def _xlogy(ctx, i, j):
    """``x log y``: ``log y`` (torch: 0 where ``x == 0`` and ``y <= 0``), then ``d^j/dy^j log y`` times ``x`` or 1."""
    if i > 1:
        return None
    x, y = ctx.saved("self"), ctx.saved("other")
    if j == 0:
        return torch.xlogy(torch.ones((), dtype=y.dtype, device=y.device), y).masked_fill((x == 0) & (y <= 0), 0.0)
    log_j = (-1) ** (j - 1) * math.factorial(j - 1) * y**-j
    return log_j if i else x * log_j


def _xlogy_number(ctx, k):
    """``c log y``, ``c`` a number: only ``y`` (slot 0) is an input."""
    c, y = float(ctx.saved("self")), ctx.saved("other")
    return c * (-1) ** (k - 1) * math.factorial(k - 1) * y**-k


def _xlogy_number_other(ctx, k):
    """``x log c``, ``c`` a number: linear; torch's slope is 0 where ``x == 0`` unless ``c > 0``."""
    if k > 1:
        return None
    x, c = ctx.saved("self"), float(ctx.saved("other"))
    slope = torch.xlogy(torch.ones_like(x), torch.tensor(c, dtype=x.dtype, device=x.device))
    return slope if c > 0 else slope.masked_fill(x == 0, 0.0)


_SIGMOID = polynomial_in_result((0.0, 1.0, -1.0))  # s' = s - s^2


def _sigmoid_derivative(z, m: int):
    """``s^(m)(z)`` of the sigmoid ``s``, as the polynomial in ``s`` of :func:`polynomial_in_result`."""
    return torch.sigmoid(z) if m == 0 else _SIGMOID(_Result(torch.sigmoid(z)), m)


class _Result:
    """A stand-in ctx whose saved result is ``y``."""

    def __init__(self, y):
        self.y = y

    def saved(self, name):
        return self.y


def _logaddexp(scale: float):
    """``log_b(b^x + b^y) = y + sp(u ln b) / ln b``, ``u = x - y``, ``sp`` the softplus, ``scale = ln b``:
    ``d^i/dx^i d^j/dy^j = (-1)^j scale^(i+j-1) s^(i+j-1)(u scale)``, plus 1 for ``d/dy``."""

    def deriv(ctx, i, j):
        u = (ctx.saved("self") - ctx.saved("other")) * scale
        value = (-1) ** j * scale ** (i + j - 1) * _sigmoid_derivative(u, i + j - 1)
        return value + 1.0 if (i, j) == (0, 1) else value

    return deriv


def _lerp(ctx, counts):
    """``x + w (e - x)``: ``1 - w``, ``w``, ``e - x``; ``d^2/dx dw = -1``, ``d^2/de dw = 1``."""
    nx, ne, nw = counts
    if nw > 1 or nx + ne > 1:
        return None
    one = torch.ones((), dtype=ctx.dtype, device=ctx.device)
    if nw == 0:
        w = ctx.saved("weight")
        return 1.0 - w if nx else w
    if nx + ne == 0:
        return ctx.saved("end") - ctx.saved("self")
    return -one if nx else one


def _lerp_number(ctx):
    w = ctx.saved("weight")
    if isinstance(w, complex):
        raise UnsupportedOperatorError(f"{ctx.name}: a complex weight is not supported")
    return (1.0 - float(w), float(w))


def _value(ctx):
    value = ctx.saved("value")
    if isinstance(value, complex):
        raise UnsupportedOperatorError(f"{ctx.name}: a complex value= is not supported")
    return float(value)


def _addcmul(ctx, counts):
    """``x + v t1 t2``."""
    nx, n1, n2 = counts
    if nx:
        return torch.ones((), dtype=ctx.dtype, device=ctx.device) if counts == (1, 0, 0) else None
    if n1 > 1 or n2 > 1:
        return None
    v = _value(ctx)
    if n1 and n2:
        return torch.full((), v, dtype=ctx.dtype, device=ctx.device)
    return v * ctx.saved("tensor2" if n1 else "tensor1")


def _addcdiv(ctx, counts):
    """``x + v t1 / t2``: ``d^j/dt2^j t2^-1 = (-1)^j j! t2^-(j+1)``, times ``v`` and ``t1`` or 1."""
    nx, n1, n2 = counts
    if nx:
        return torch.ones((), dtype=ctx.dtype, device=ctx.device) if counts == (1, 0, 0) else None
    if n1 > 1:
        return None
    inv = _value(ctx) * (-1) ** n2 * math.factorial(n2) * ctx.saved("tensor2") ** -(n2 + 1)
    return inv if n1 else ctx.saved("tensor1") * inv


@lru_cache(maxsize=None)
def _tie_share(kind: str) -> float:
    """The share of a tie between ``x`` and a tensor bound that torch gives the bound: 0.5 from torch 2.14
    on (split evenly), 0 before (``x`` takes it all). Asked of torch itself, once."""
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    b = torch.ones(1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = {"clamp": lambda: torch.clamp(x, b, b + 1.0), "min": lambda: x.clamp_min(b),
             "max": lambda: x.clamp_max(b)}[kind]()
        (gb,) = torch.autograd.grad(y.sum(), b)
    return float(gb.item())


def _clamp_tensors(ctx, counts, kind="clamp"):
    """``clamp(x, lo, hi)`` with tensor bounds (either may be absent): the one-hot of the piece torch picks,
    ties as the running torch shares them (:func:`_tie_share`): ``x`` on a bound shares with it, unless
    ``lo == hi`` (then ``x`` takes it all); with ``lo > hi`` the result is ``hi``."""
    if sum(counts) > 1:
        return None
    slot = counts.index(1)
    x = ctx.saved("self")
    lo = ctx.saved("min") if ctx.has("min") else None
    hi = ctx.saved("max") if ctx.has("max") else None
    dtype = ctx.dtype
    half = _tie_share(kind)
    if hi is None or lo is None:
        bound = lo if hi is None else hi
        below, above = (x > bound, x < bound) if hi is None else (x < bound, x > bound)
        tie = (x == bound).to(dtype)
        return below.to(dtype) + tie * (1.0 - half) if slot == 0 else above.to(dtype) + tie * half
    ordered, equal, crossed = lo < hi, lo == hi, lo > hi
    at_lo, at_hi = (x == lo).to(dtype), (x == hi).to(dtype)
    if slot == 0:
        share = torch.where(equal, torch.ones((), dtype=dtype, device=x.device), 1.0 - half * at_lo - half * at_hi)
        return ((lo <= x) & (x <= hi)).to(dtype) * share
    if slot == 1:
        return (~crossed).to(dtype) * ((x < lo).to(dtype) + half * at_lo * ordered)
    return crossed.to(dtype) + (~crossed).to(dtype) * ((x > hi).to(dtype) + half * at_hi * ordered)


def _clamp_bound(name):
    """clamp_min / clamp_max with a tensor bound: ``clamp`` with one bound."""

    def deriv(ctx, i, j):
        if i + j > 1:
            return None
        counts = (i, j, 0) if name == "min" else (i, 0, j)
        return _clamp_tensors(ctx, counts, name)

    return deriv


def _copysign(ctx, i, j):
    """``|x| sign(y)``: ``result / x`` in ``x`` (0 where ``x == 0``, as torch's), zero in ``y`` (torch's)."""
    if i != 1 or j:
        return None
    x, y = ctx.saved("self"), ctx.saved("result")
    return torch.where(x == 0, torch.zeros((), dtype=y.dtype, device=y.device), y / x)


def _fmod(rounding):
    """``x - y q`` with ``q`` the rounded quotient, piecewise constant: ``1`` in ``x``, ``-q`` in ``y``."""

    def deriv(ctx, i, j):
        if i + j > 1:
            return None
        if i:
            return torch.ones((), dtype=ctx.dtype, device=ctx.device)
        return -torch.div(ctx.saved("self"), ctx.saved("other"), rounding_mode=rounding)

    return deriv


register("MaximumBackward0", elementwise2(_selection(lambda x, y: x < y, lambda x, y: x > y)))
register("FmaxBackward0", elementwise2(_selection(lambda x, y: x < y, lambda x, y: x > y)))
register("MinimumBackward0", elementwise2(_selection(lambda x, y: x > y, lambda x, y: x < y)))
register("FminBackward0", elementwise2(_selection(lambda x, y: x > y, lambda x, y: x < y)))
register("XlogyBackward0", elementwise2(_xlogy))
register("XlogyBackward1", elementwise(_xlogy_number))
register("XlogyBackward2", elementwise(_xlogy_number_other))
register("LogaddexpBackward0", elementwise2(_logaddexp(1.0)))
register("Logaddexp2Backward0", elementwise2(_logaddexp(math.log(2.0))))
register("LerpBackward0", weighted_sum(_lerp_number))  # x + w (end - x), w a number
register("LerpBackward1", elementwise_n(_lerp))
register("AddcmulBackward0", elementwise_n(_addcmul))
register("AddcdivBackward0", elementwise_n(_addcdiv))
register("ClampBackward0", elementwise_n(_clamp_tensors))
register("ClampMinBackward1", elementwise2(_clamp_bound("min")))
register("ClampMaxBackward1", elementwise2(_clamp_bound("max")))
register("CopysignBackward0", elementwise2(_copysign))
register("CopysignBackward1", elementwise2(_copysign))
# by a number: x minus a piecewise constant, slope 1
register("FmodBackward0", weighted_sum(lambda ctx: (1.0,)))
register("RemainderBackward0", weighted_sum(lambda ctx: (1.0,)))
register("FmodBackward1", elementwise2(_fmod("trunc")))
register("RemainderBackward1", elementwise2(_fmod("floor")))
register("HypotBackward0", elementwise2(taylor_partial(lambda ctx, x, y: torch.hypot(x, y), ("self", "other"))))
register("Atan2Backward0", elementwise2(taylor_partial(lambda ctx, x, y: torch.atan2(x, y), ("self", "other"))))

# ---------------------------------------------------------------- glu


def _glu(ctx, slots):
    """``y = a s(b)`` with ``(a, b)`` the halves of ``x`` along ``dim`` and ``s`` the sigmoid.

    Each x port splits ``dim`` into a label of size 2 (which half) and the output's label along it, so
    the derivative is one operand over the output's labels and the k half labels:
    ``a s^(k)(b)`` with every index in ``b``, ``s^(k-1)(b)`` with one in ``a``, zero with two.
    """
    k = len(slots)
    x = ctx.saved("self").to(ctx.dtype)
    d = normalize_dim(ctx.saved("dim"), x.dim())
    h = x.shape[d] // 2
    a, b = x.narrow(d, 0, h), x.narrow(d, h, h)
    by_count = [a * _sigmoid_derivative(b, k), _sigmoid_derivative(b, k - 1)]  # indices in a: none, one
    zero = torch.zeros_like(a)
    entries = [by_count[halves.count(0)] if halves.count(0) < 2 else zero
               for halves in itertools.product((0, 1), repeat=k)]
    derivative = torch.stack(entries, -1).reshape(*a.shape, *([2] * k))
    lab = LabelMaker()
    y = lab.dims(a.shape)
    halves = lab.dims([2] * k)
    ports = [y[:d] + (t, y[d]) + y[d + 1:] for t in halves]
    return lab.factor(y, ports, [(derivative, y + halves)])


register("GluBackward0", _glu)

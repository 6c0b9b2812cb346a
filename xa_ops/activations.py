"""Activations beyond the core set.

Smooth ones are written as the torch expression of the function and
differentiated k times in forward mode (:func:`~xa_ops.families.taylor`),
with the parameters torch saved on the node. Piecewise-linear ones
(leaky_relu, hardtanh, clamp, where, prelu) have the derivatives of the
active piece, as torch's: the slope where the piece is linear, zero beyond.
"""

import math

import torch

from xa.registry import register

from .families import elementwise, elementwise2, polynomial_in_result, taylor


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
    if ctx.saved("min") is not None:
        inside = inside & (x >= ctx.saved("min"))
    if ctx.saved("max") is not None:
        inside = inside & (x <= ctx.saved("max"))
    return inside.to(ctx.dtype)


register("LeakyReluBackward0", elementwise(_leaky_relu))
register("HardtanhBackward0", elementwise(_hardtanh))  # hardtanh, relu6
register("ClampBackward1", elementwise(_clamp))


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

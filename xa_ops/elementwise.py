"""Elementwise activations: each is its k-th derivative, as a function of what torch saved."""

from xa.registry import register

from .families import elementwise, polynomial_in_result


def _relu(ctx, k):
    # The derivative of the active piece, as torch's own: 1 where y > 0, else 0.
    return (ctx.saved("result") > 0).to(ctx.dtype) if k == 1 else None


register("TanhBackward0", elementwise(polynomial_in_result((1.0, 0.0, -1.0))))  # tanh' = 1 - y^2
register("SigmoidBackward0", elementwise(polynomial_in_result((0.0, 1.0, -1.0))))  # s' = s - s^2
register("ReluBackward0", elementwise(_relu))

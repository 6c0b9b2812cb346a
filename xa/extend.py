"""Rules for your own operators, built from the same families as xa's own.

A rule describes one torch node (``grad_fn.name()``, e.g. ``"CubeBackward"``
for a ``torch.autograd.Function`` called ``Cube``): asked for a sorted tuple
of input slots, it returns that local derivative as a :class:`Factor`, or
``None`` where it is zero by structure. Most operators are one family call:

    import xa.extend as xe

    # y = x ** 3 elementwise, x saved with ctx.save_for_backward(x)
    def cube(ctx, k):
        (x,) = ctx.saved("tensors")
        return {1: 3 * x**2, 2: 6 * x, 3: 6 * torch.ones_like(x)}.get(k)

    xe.register("CubeBackward", xe.elementwise(cube))

``ctx`` gives ``saved(name)`` (torch's ``_saved_<name>`` attributes, or
``"tensors"`` for a custom Function), ``out_shape``, ``in_shapes``,
``dtype``, ``device`` and ``node`` (torch's node, where a custom Function's
``ctx.<attr>`` values live; they are part of the plan's key). While
planning (``ctx.planning``) saved tensors are zeros of the right shape and
dtype: compute with them, never branch on their values (a factor whose
structure differs at execution raises ``xa.RuleError``). ``xa.extend.planned``
skips building a costly operand while planning.
"""

from .factor import Factor, LabelMaker, broadcast_port, planned, reshape_ports  # noqa: F401
from .families import (  # noqa: F401
    bilinear,
    einsum_ports,
    elementwise,
    elementwise2,
    linear,
    polynomial_in_result,
    taylor,
    weighted_sum,
)
from .registry import register, supported, unregister  # noqa: F401

__all__ = [
    "register", "unregister", "supported", "Factor", "LabelMaker", "broadcast_port", "reshape_ports", "planned",
    "elementwise", "polynomial_in_result", "taylor", "elementwise2", "linear", "weighted_sum",
    "bilinear", "einsum_ports",
]

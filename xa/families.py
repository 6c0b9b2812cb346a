"""Rule families: most operators are one line built from these.

* :func:`elementwise` -- ``y = f(x)`` applied entrywise; the rule gives
  ``f^(k)`` as a tensor shaped like ``y`` and the factor ties that tensor's
  labels to the ``y`` port and every ``x`` port (a diagonal, never built).
* :func:`polynomial_in_result` -- ``f^(k)`` for functions whose first
  derivative is a polynomial ``g`` in the result (tanh: ``1 - y^2``), by
  ``P_1 = g``, ``P_(k+1) = P_k' g``.
* :func:`taylor` -- ``f^(k)`` of any elementwise function written with
  torch ops, by nesting forward-mode ``jvp`` k times (gelu, softplus, ...).
* :func:`elementwise2` -- ``y = f(x0, x1)`` entrywise with broadcasting
  (div, pow): the rule gives the mixed partial ``d^(i+j) f / dx0^i dx1^j``;
  :func:`elementwise_n` the same for any number of inputs (lerp, addcmul),
  and :func:`taylor_partial` any such partial of a torch expression of
  ``f`` by nested forward-mode ``jvp`` (atan2, hypot).
* :func:`linear_map` -- every linear operator (views, sums, indexing,
  pooling, dropout): a relabelling of the ports plus 0/1 operands where it
  is not one, and a coefficient; every order >= 2 is zero. :func:`linear`
  (relabelling only) and :func:`weighted_sum` (``y = sum_i c_i x_i`` with
  broadcasting: add, sub) are two common shapes of it.
* :func:`bilinear` -- ``y = B(x0, x1)`` given by the ports of the three
  tensors (mul, mm, bmm, dot, ...): the first derivative in one slot is
  the other slot's saved value, the mixed second derivative is the
  identity wiring, everything else is zero.
* :func:`composite` -- an operator whose derivatives are dense along a dim
  (softmax, layer norm, attention), described as the small graph of simpler
  nodes torch could have recorded (:class:`Piece`); :mod:`xa.composite`
  expands it when a graph's rules are resolved, and its dense rule serves
  where it declines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import jvp

from .errors import UnsupportedOperatorError
from .factor import LabelMaker, broadcast_port, planned

# ---------------------------------------------------------------- elementwise


def elementwise(deriv: Callable) -> Callable:
    """Rule for a unary elementwise op; ``deriv(ctx, k)`` is ``f^(k)`` or ``None`` for zero.

    Example:
        >>> import xa.extend as xe
        >>> sin = xe.elementwise(lambda ctx, k: torch.sin(ctx.saved("self") + k * torch.pi / 2))   # sin^(k)
        >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward(torch.sin(x).sum(), order=2, configurations={"SinBackward0": sin})
        >>> torch.allclose(x.xgrad[1][0], torch.diag(-torch.sin(x.detach())))   # the Hessian: diag(-sin x)
        True
    """

    def rule(ctx, slots):
        value = deriv(ctx, len(slots))
        if value is None:
            return None
        lab = LabelMaker()
        labels = lab.dims(ctx.out_shape)
        return lab.factor(labels, [labels] * len(slots), [(value, labels)])

    return rule


def polynomial_in_result(g: tuple) -> Callable:
    """``deriv(ctx, k)`` for ``f' = g(y)``, ``g`` given by its coefficients, lowest first.

    Example:
        >>> import xa.extend as xe
        >>> tanh = xe.elementwise(xe.polynomial_in_result((1.0, 0.0, -1.0)))  # tanh' = 1 - y^2
        >>> x = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward(torch.tanh(x).sum(), order=2, configurations={"TanhBackward0": tanh})
        >>> y = torch.tanh(x.detach())
        >>> torch.allclose(x.xgrad[1][0], torch.diag(-2 * y * (1 - y ** 2)))   # tanh'' = -2 y (1 - y^2)
        True
    """

    @lru_cache(maxsize=None)
    def poly(k: int) -> tuple:
        p = np.array(g, dtype=float)
        for _ in range(k - 1):
            p = np.polynomial.polynomial.polymul(np.polynomial.polynomial.polyder(p), g)
        return tuple(float(c) for c in p)

    def deriv(ctx, k):
        y = ctx.saved("result")
        coeffs = poly(k)
        if len(coeffs) == 1:
            return torch.full_like(y, coeffs[0])
        # Horner's scheme, skipping zero coefficients (1 - y^2: two passes); in place on one fresh tensor,
        # or out of place where autograd records (in place, it would copy each value it overwrites)
        inplace = not (torch.is_grad_enabled() and y.requires_grad)
        # (into the plan's own memory for this order where the run has it: ctx.out)
        out = ctx.out(("poly", k), y.shape, y.dtype) if inplace and hasattr(ctx, "out") else None
        acc = torch.mul(y, coeffs[-1], out=out)
        for c in reversed(coeffs[1:-1]):
            if c:
                acc = acc.add_(c) if inplace else acc + c
            acc = acc.mul_(y) if inplace else acc * y
        if coeffs[0]:
            acc = acc.add_(coeffs[0]) if inplace else acc + coeffs[0]
        return acc

    return deriv


def taylor(fn: Callable, saved: str = "self") -> Callable:
    """``deriv(ctx, k)`` for ``y = fn(ctx, x)``, ``x`` the saved input, by nested forward-mode AD.

    Exact to rounding, like any closed form; costs ``2^k`` evaluations of
    ``fn`` on the input, small next to the contractions that use the result.

    Example:
        >>> import xa.extend as xe
        >>> sin = xe.elementwise(xe.taylor(lambda ctx, z: torch.sin(z)))   # SinBackward0 saves "self"
        >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward(torch.sin(x).sum(), order=3, configurations={"SinBackward0": sin})
        >>> torch.allclose(x.xgrad[2][0].diagonal(dim1=0, dim2=1).diagonal(), -torch.cos(x.detach()))
        True
    """

    def deriv(ctx, k):
        def build():
            g = lambda z: fn(ctx, z)
            for _ in range(k):
                g = (lambda h: lambda z: jvp(h, (z,), (torch.ones_like(z),))[1])(g)
            return g(ctx.saved(saved).to(ctx.dtype))

        return planned(ctx, ctx.out_shape, build)

    return deriv


def elementwise2(deriv: Callable) -> Callable:
    """Rule for ``y = f(x0, x1)`` entrywise; ``deriv(ctx, i, j)`` is ``d^(i+j) f / dx0^i dx1^j`` or ``None``.

    Example:
        >>> import math, xa.extend as xe
        >>> def div(ctx, i, j):                             # d^(i+j) (a / b) / da^i db^j
        ...     a, b = ctx.saved("self"), ctx.saved("other")
        ...     return None if i > 1 else (a if i == 0 else 1) * (-1) ** j * math.factorial(j) / b ** (j + 1)
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> b = torch.tensor([2.0, 4.0], dtype=torch.float64, requires_grad=True)
        >>> H = xa.mixed((a / b).sum(), (a, b), configurations={"DivBackward0": xe.elementwise2(div)})
        >>> H[0].tolist()                                   # d^2 / da db = diag(-1 / b^2)
        [[-0.25, 0.0], [0.0, -0.0625]]
    """

    def rule(ctx, slots):
        return _entrywise(ctx, slots, deriv(ctx, slots.count(0), slots.count(1)))

    return rule


def _entrywise(ctx, slots, value):
    """The factor of an entrywise derivative ``value`` (broadcast to ``y``) over ``slots``, or ``None``."""
    if value is None:
        return None
    lab = LabelMaker()
    y = lab.dims(ctx.out_shape)
    ports = [broadcast_port(lab, y, ctx.out_shape, ctx.in_shapes[s]) for s in slots]
    return lab.factor(y, ports, [(value.expand(ctx.out_shape), y)])


def elementwise_n(deriv: Callable) -> Callable:
    """Rule for ``y = f(x0, .., x_(m-1))`` entrywise with broadcasting.

    ``deriv(ctx, counts)`` is the mixed partial ``d^|counts| f / dx0^counts[0] .. dx_(m-1)^counts[m-1]``
    (a tensor that broadcasts to ``y``), or ``None`` where it is zero.
    """

    def rule(ctx, slots):
        return _entrywise(ctx, slots, deriv(ctx, tuple(slots.count(s) for s in range(len(ctx.in_shapes)))))

    return rule


def taylor_partial(fn: Callable, saved: tuple) -> Callable:
    """``deriv(ctx, *counts)`` for ``y = fn(ctx, x0, x1, ..)`` entrywise, the ``x`` the saved inputs named ``saved``.

    The inputs are broadcast to ``y``; the partial is nested forward-mode ``jvp``, ``counts[t]`` times
    along input ``t`` (each a unit tangent): exact to rounding, ``2^k`` evaluations of ``fn``. Use with
    :func:`elementwise2` (``deriv(ctx, i, j)``) or, through ``lambda ctx, c: deriv(ctx, *c)``,
    :func:`elementwise_n`.
    """

    def deriv(ctx, *counts):
        missing = [n for n in saved if not ctx.has(n)]
        if missing:  # torch saves an input only where a gradient needs it: a constant operand may be gone
            raise UnsupportedOperatorError(
                f"{ctx.name}: torch did not save its input {', '.join(map(repr, missing))} (it does not require "
                "grad here), and the derivatives depend on its value; let it require grad, or register a rule")

        def build():
            xs = [ctx.saved(n).to(ctx.dtype).expand(ctx.out_shape).contiguous() for n in saved]
            g = lambda *zs: fn(ctx, *zs)
            for t, count in enumerate(counts):
                for _ in range(count):
                    g = _along(g, t)
            return g(*xs)

        return planned(ctx, ctx.out_shape, build)

    return deriv


def _along(h: Callable, t: int) -> Callable:
    """``z -> d/ds h(z with z[t] + s)``: one unit forward-mode derivative along input ``t``."""

    def g(*zs):
        def along(z):
            return h(*zs[:t], z, *zs[t + 1:])

        return jvp(along, (zs[t],), (torch.ones_like(zs[t]),))[1]

    return g


# ---------------------------------------------------------------- linear


def linear_map(build: Callable, coef: Callable = lambda ctx, slot: 1.0, multi_output: bool = False) -> Callable:
    """Rule for ``y = sum_t c_t A_t x_t``: every derivative of order >= 2, mixed ones included, is zero.

    Args:
        build: ``build(ctx, lab, slot) -> (y labels, x labels, operands)``: ``A_t``
            as a relabelling of the ports, with ``(tensor, labels)`` operands
            where it is not one (a 0/1 selection, a window, a mask).
        coef: ``coef(ctx, slot)``, the scalar ``c_t`` (read at execution).
        multi_output: the rule reads ``ctx.output`` (split, unbind).
    """

    def rule(ctx, slots):
        if len(slots) > 1:
            return None
        lab = LabelMaker()
        y, x, operands = build(ctx, lab, slots[0])
        return lab.factor(y, [x], operands, coef=coef(ctx, slots[0]))

    rule.multi_output = multi_output
    return rule


def linear(ports: Callable, coef: float = 1.0) -> Callable:
    """Rule for a one-input linear map that only relabels: ``ports(ctx, lab)`` returns ``(y_labels, x_labels)``.

    Example:
        >>> import xa.extend as xe
        >>> def t_ports(ctx, lab):                          # x.t(): y[j, i] = x[i, j]
        ...     i, j = lab.dims(ctx.in_shapes[0])
        ...     return (j, i), (i, j)
        >>> x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
        >>> c = torch.arange(6, dtype=torch.float64).reshape(3, 2)
        >>> sup = xa.backward((x.t() * c).sum(), order=1, configurations={"TBackward0": xe.linear(t_ports)})
        >>> x.xgrad[0].reshape(2, 3).tolist()               # c.T
        [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    return linear_map(lambda ctx, lab, slot: (*ports(ctx, lab), ()), lambda ctx, slot: coef)


def weighted_sum(coefs: Callable) -> Callable:
    """Rule for ``y = sum_i c_i x_i`` (inputs broadcast to ``y``); ``coefs(ctx)`` gives the ``c_i``.

    Example:
        >>> import xa.extend as xe
        >>> sub = xe.weighted_sum(lambda ctx: (1.0, -ctx.saved("alpha")))   # a - alpha * b
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> b = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)     # broadcast to a's shape
        >>> sup = xa.backward(((a - b) ** 2).sum(), order=2, configurations={"SubBackward0": sub})
        >>> a.xgrad[0].tolist(), b.xgrad[0].tolist(), b.xgrad[1].tolist()   # 2 (a - b), -2 sum(a - b), 2 + 2
        ([[-4.0, -2.0]], [[6.0]], [[[4.0]]])
    """

    def build(ctx, lab, slot):
        out = lab.dims(ctx.out_shape)
        return out, broadcast_port(lab, out, ctx.out_shape, ctx.in_shapes[slot]), ()

    return linear_map(build, lambda ctx, slot: coefs(ctx)[slot])


# ---------------------------------------------------------------- bilinear


def bilinear(ports: Callable, saved: tuple, coef: Callable = lambda ctx: 1.0, slot_offset: int = 0) -> Callable:
    """Rule for ``y = coef * B(x0, x1)``.

    Args:
        ports: ``ports(ctx, lab) -> (y, x0, x1)`` labels, one per dim of each tensor.
        saved: how to read the saved values of ``x0`` and ``x1``: a name for
            ``ctx.saved``, or a function of ``ctx``.
        coef: the scalar in front, read from the node (addmm's ``alpha``).
        slot_offset: index of ``x0`` among the node's inputs (addmm's
            matrices are its slots 1 and 2).

    Example:
        >>> import xa.extend as xe
        >>> mm = xe.bilinear(xe.einsum_ports("ik,kj->ij", ("self", "mat2")), saved=("self", "mat2"))
        >>> A = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
        >>> B = torch.tensor([[3.0], [4.0]], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward((A @ B).sum(), order=1, configurations={"MmBackward0": mm})
        >>> A.xgrad[0].tolist(), B.xgrad[0].tolist()        # d/dA = B.T, d/dB = A.T
        ([[3.0, 4.0]], [[1.0, 2.0]])
        >>> xa.mixed((A @ B).sum(), (A, B), configurations={"MmBackward0": mm})[0].tolist()   # identity wiring
        [[1.0, 0.0], [0.0, 1.0]]
    """

    def rule(ctx, slots) -> Optional[object]:
        rel = tuple(s - slot_offset for s in slots)
        if rel not in ((0,), (1,), (0, 1)):
            return None
        lab = LabelMaker()
        y, x0, x1 = ports(ctx, lab)
        c = coef(ctx)
        if rel == (0,):
            return lab.factor(y, [x0], [(_read(ctx, saved[1]), x1)], c)
        if rel == (1,):
            return lab.factor(y, [x1], [(_read(ctx, saved[0]), x0)], c)
        return lab.factor(y, [x0, x1], coef=c)

    return rule


def _read(ctx, how):
    return how(ctx) if callable(how) else ctx.saved(how)


def einsum_ports(spec: str, saved: tuple, first_slot: int = 0) -> Callable:
    """``ports`` for a bilinear map written as an einsum, e.g. ``"ik,kj->ij"`` for ``mm``.

    Sizes come from the output and from whichever input shapes are known
    (an input that does not require grad is known by its saved value).
    ``first_slot`` is the node input slot of the first operand.

    Example:
        >>> import xa.extend as xe
        >>> mv = xe.bilinear(xe.einsum_ports("ij,j->i", ("self", "vec")), saved=("self", "vec"))
        >>> M = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
        >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward((M @ v).sum(), order=1, configurations={"MvBackward0": mv})
        >>> v.xgrad[0].tolist(), M.xgrad[0].tolist()        # M's column sums; v in every row of M
        ([[4.0, 6.0]], [[1.0, -1.0, 1.0, -1.0]])
    """
    lhs, out = spec.split("->")
    ins = lhs.split(",")

    def ports(ctx, lab):
        size = dict(zip(out, ctx.out_shape))
        for slot, letters in enumerate(ins):
            shape = ctx.in_shapes[first_slot + slot]
            if shape is None:
                shape = ctx.saved(saved[slot]).shape
            size.update(zip(letters, shape))
        label = {ch: lab.new(n) for ch, n in size.items()}
        return tuple(tuple(label[ch] for ch in part) for part in (out, ins[0], ins[1]))

    return ports


# ---------------------------------------------------------------- composites


@dataclass
class Piece:
    """One value of a composite's graph.

    ``name``: the torch node whose rule describes it; ``inputs``: per slot,
    ``("in", slot)`` (the composite's own input slot), ``("piece", k)`` (an
    earlier piece) or ``None`` (a constant); ``saved``: the attributes its
    rule reads; ``what``: a few words for explain and error messages.
    """

    name: str
    shape: tuple
    inputs: tuple
    saved: dict = field(default_factory=dict)
    what: str = ""


class Composite:
    """A rule that is, where it pays, the small graph :attr:`pieces` returns (see :func:`composite`)."""

    def __init__(self, dense: Callable, pieces: Callable, entries: Optional[Callable] = None):
        self.dense, self.pieces, self.entries = dense, pieces, entries
        self.multi_output = getattr(dense, "multi_output", False)

    def __call__(self, ctx, slots):
        return self.dense(ctx, slots)

    def __repr__(self) -> str:
        return f"composite({getattr(self.dense, '__name__', self.dense)!r})"


def composite(dense: Callable, pieces: Callable, entries: Optional[Callable] = None) -> Composite:
    """Rule for an operator that is a composition of simpler nodes (softmax: ``exp``, ``sum``, ``div``).

    Args:
        dense: the rule of the whole node, its dense factors; used where the
            pieces decline and where the node is small.
        pieces: ``pieces(ctx) -> [Piece, ...]``, the last piece being the node's
            output, or ``None``/``[]`` to keep the node whole.
        entries: ``entries(ctx, order) -> int``, the entries of the dense factors
            at ``order``: a node whose dense factors are small
            (``<= xa.composite.DENSE_LIMIT``) stays whole. ``None``: always expand.
    """
    return Composite(dense, pieces, entries)


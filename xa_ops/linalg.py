"""Linear algebra beyond products: ``linalg.solve`` as ``inv(A) @ B``.

torch's own second derivatives of ``linalg_solve_ex`` (reverse then forward mode) are not symmetric
in ``A``, so the generic fallback refuses it; ``linalg_inv_ex``'s are right (checked against
``d^2 Y = Y dA Y dB Y + Y dB Y dA Y``). So a solve with one matrix ``A`` and ``left=True`` is
the composite of the inverse (through the generic fallback, its ``A`` recovered from the saved
inverse) and a matrix-vector or matrix-matrix product; anything else goes to the fallback,
which refuses it with its reason.
"""

from __future__ import annotations

import torch

from xa.fallback import fallback_rule
from xa.families import Piece, composite
from xa.registry import register


def _solve_pieces(ctx):
    A, X = ctx.saved("A").to(ctx.dtype), ctx.saved("result").to(ctx.dtype)
    if A.dim() != 2 or not ctx.saved("left") or X.dim() not in (1, 2):
        return None
    inverse = torch.linalg.inv(A)
    B = A @ X
    product = ("MvBackward0", {"self": inverse, "vec": B}) if X.dim() == 1 else \
        ("MmBackward0", {"self": inverse, "mat2": B})
    return [
        Piece("LinalgInvExBackward0", tuple(A.shape), (("in", 0),), {"inverse": inverse}, "inverse"),
        Piece(product[0], tuple(X.shape), (("piece", 0), ("in", 1)), product[1], "inverse @ B"),
    ]


def _solve(ctx, slots):
    return fallback_rule("LinalgSolveExBackward0")(ctx, slots)


_solve.multi_output = True
register("LinalgSolveExBackward0", composite(_solve, _solve_pieces))

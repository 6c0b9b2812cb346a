"""xa's operator rules; importing this package registers them all.

Rules are grouped by family -- the shape their derivatives share -- so the
first guess for an operator is the right file, and every overload of one
torch operator (``mul`` by a tensor and by a number) is in the same file:

* ``elementwise``: pointwise math and activations, one input or two
  broadcast ones (tanh, tan, exp, log, sin, pow, div, gelu, relu, clamp, where, atan, maximum, lerp,
  addcmul, hypot, glu).
* ``linear``: relabelling linear maps (view, permute, expand, sum, mean,
  diagonal, trace, add, sub, neg, masked_fill, dropout, casts, tril, triu, diag_embed, cumsum).
* ``indexing``: selections and joins (select, slice, gather, index, cat,
  stack, repeat, pad, flip, roll, embedding, take, split, unbind).
* ``bilinear``: products (mul, mm, mv, dot, bmm, addmm, baddbmm).
* ``reductions``: operators along a dim (softmax, log_softmax,
  logsumexp, prod, max, min, amax, amin, median, kthvalue, mode, var, std,
  vector norms).
* ``convolution``: convolutions and pooling; ``normalization``: layer,
  group and batch norm; ``attention``: scaled_dot_product_attention;
  ``losses``: mse, smooth_l1, huber, bce, nll.

The families the rules are built from are the engine's (:mod:`xa.families`).
"""

from . import (  # noqa: F401
    attention,
    bilinear,
    convolution,
    elementwise,
    indexing,
    linalg,
    linear,
    losses,
    normalization,
    reductions,
)

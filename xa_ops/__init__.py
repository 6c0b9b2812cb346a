"""xa's operator rules, one module per family; importing this registers them all."""

from . import (  # noqa: F401
    activations,
    attention,
    bilinear,
    convolution,
    elementary,
    elementwise,
    indexing,
    linalg,
    linear,
    losses,
    normalization,
    reductions,
    special,
    split,
)

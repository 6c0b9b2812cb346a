"""xa's operator rules, one module per family; importing this registers them all."""

from . import (  # noqa: F401
    activations,
    bilinear,
    convolution,
    elementary,
    elementwise,
    indexing,
    linalg,
    linear,
    losses,
    reductions,
    special,
    split,
)

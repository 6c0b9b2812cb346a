"""xa's operator rules, one module per family; importing this registers them all."""

from . import activations, bilinear, elementary, elementwise, indexing, linalg, linear, reductions, special, split  # noqa: F401

"""xa's operator rules, one module per family; importing this registers them all."""

from . import activations, bilinear, elementary, elementwise, linear, special, split  # noqa: F401

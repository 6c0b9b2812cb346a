"""xa's operator rules, one module per family; importing this registers them all."""

from . import bilinear, elementwise, linear, special  # noqa: F401

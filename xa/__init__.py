"""xa: exact partial derivatives of any order for PyTorch graphs.

Run an ordinary forward pass, then ``xa.backward(source, order=3)``: every
leaf that requires grad receives ``.xgrad``, a tuple whose k-th entry is the
k-th derivative of ``source.flatten()`` with respect to ``leaf.flatten()``.
"""

import xa_ops as _xa_ops  # noqa: E402,F401  (registers the built-in rules)

from .api import Superset, backward
from .errors import (
    GraphFreedError,
    GraphModifiedError,
    MemoryBudgetError,
    RegistryError,
    RuleError,
    SourceError,
    TargetError,
    UnsupportedOperatorError,
    XaError,
)
from .explain import explain
from .factor import Factor, LabelMaker
from .registry import register, supported

__all__ = [
    "backward", "explain", "Superset", "Factor", "LabelMaker", "register", "supported",
    "XaError", "UnsupportedOperatorError", "SourceError", "TargetError", "GraphFreedError",
    "GraphModifiedError", "MemoryBudgetError", "RuleError", "RegistryError",
]
__version__ = "0.1.0"

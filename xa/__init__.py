"""xa: exact partial derivatives of any order for PyTorch graphs.

Run an ordinary forward pass, then ``xa.backward(source, order=3)``: every
leaf that requires grad receives ``.xgrad``, a tuple whose k-th entry is the
k-th derivative of ``source.flatten()`` with respect to ``leaf.flatten()``.
"""

import torch as _torch

OLDEST_TORCH = (2, 11)  # rules read the attributes torch saves on its graph; their names change between releases


def _torch_version(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _torch_version(_torch.__version__) < OLDEST_TORCH:
    raise ImportError(
        f"xa needs torch >= {'.'.join(map(str, OLDEST_TORCH))} (it is tested on 2.11 and 2.14); this is torch "
        f"{_torch.__version__}: pip install -U torch"
    )

import xa_ops as _xa_ops  # noqa: E402,F401  (registers the built-in rules)

from . import queries  # noqa: E402
from .api import (  # noqa: E402
    Superset,
    backward,
    biharmonic,
    clear_partials,
    diagonal,
    differential_operator,
    directional,
    laplacian,
    mixed,
    partials,
)
from .arena import release_buffers  # noqa: E402
from .errors import (  # noqa: E402
    BatchMixingError,
    GraphFreedError,
    GraphModifiedError,
    MemoryBudgetError,
    QueryError,
    RegistryError,
    RuleError,
    SamplingError,
    SourceError,
    TargetError,
    UnsupportedOperatorError,
    XaError,
)
from .explain import explain  # noqa: E402
from .factor import Factor, LabelMaker  # noqa: E402
from .registry import register, supported  # noqa: E402

__all__ = [
    "backward", "clear_partials", "explain", "laplacian", "biharmonic", "partials", "differential_operator",
    "directional", "mixed", "diagonal", "release_buffers",
    "queries", "QueryError", "Superset", "Factor", "LabelMaker", "register", "supported",
    "XaError", "BatchMixingError", "UnsupportedOperatorError", "SourceError", "TargetError", "GraphFreedError",
    "GraphModifiedError", "MemoryBudgetError", "RuleError", "RegistryError",
    "SamplingError",
]
__version__ = "0.1.0"

"""Typed errors raised at xa's public surface.

Every error is an :class:`XaError`; where a built-in exception already
names the kind of mistake (a wrong type, a bad value), the error derives
from it too, so ``except ValueError`` keeps working for callers that do
not know about xa.
"""


class XaError(Exception):
    """Base class of every error xa raises on purpose."""


class UnsupportedOperatorError(XaError, NotImplementedError):
    """The graph holds a torch node that has no registered rule."""


class SourceError(XaError, ValueError):
    """The source tensor cannot be differentiated (no ``grad_fn``, not a tensor)."""


class TargetError(XaError, ValueError):
    """The requested ``target`` is not something the source depends on."""


class GraphFreedError(XaError, RuntimeError):
    """The saved tensors of the graph were freed by an earlier ``.backward()``."""


class GraphModifiedError(XaError, RuntimeError):
    """A tensor saved by the graph was modified in place after the forward pass."""


class MemoryBudgetError(XaError, MemoryError):
    """The plan needs more memory than the budget, even one source row at a time."""


class RuleError(XaError, RuntimeError):
    """An operator rule returned something inconsistent with its node."""


class BatchMixingError(XaError, ValueError):
    """With ``batch_dim=``, a node of the graph couples samples (a sum or softmax over the batch, ...)."""


class RegistryError(XaError, KeyError):
    """A rule was registered twice without ``override=True``."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class QueryError(XaError, ValueError):
    """A query names what the leaf does not have: an entry out of range, a coefficient of the wrong shape."""

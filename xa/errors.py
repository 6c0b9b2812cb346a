"""Typed errors raised at xa's public surface.

Every error is an :class:`XaError`; where a built-in exception already
names the kind of mistake (a wrong type, a bad value), the error derives
from it too, so ``except ValueError`` keeps working for callers that do
not know about xa.
"""


class XaError(Exception):
    """Base class of every error xa raises on purpose.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> try:
        ...     xa.backward(x, order=1)                     # a leaf: nothing to differentiate
        ... except xa.XaError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        SourceError True
    """


class UnsupportedOperatorError(XaError, NotImplementedError):
    """The graph holds a torch node that has no registered rule.

    Example:
        >>> class Twice(torch.autograd.Function):          # no rule registered for TwiceBackward
        ...     forward = staticmethod(lambda ctx, x: 2 * x)
        ...     backward = staticmethod(lambda ctx, grad: 2 * grad)
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> xa.backward(Twice.apply(x).sum(), order=1)
        Traceback (most recent call last):
            ...
        xa.errors.UnsupportedOperatorError: no rule for torch node TwiceBackward (output shape [2]), ...
    """


class SourceError(XaError, ValueError):
    """The source tensor cannot be differentiated (no ``grad_fn``, not a tensor).

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> xa.backward(x, order=1)
        Traceback (most recent call last):
            ...
        xa.errors.SourceError: source has no grad_fn: it is a leaf; ...
    """


class TargetError(XaError, ValueError):
    """The requested ``target`` is not something the source depends on.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> other = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> xa.backward(torch.tanh(x).sum(), order=1, target=other)
        Traceback (most recent call last):
            ...
        xa.errors.TargetError: the source does not depend on target (a tensor of shape [1], a leaf)
    """


class GraphFreedError(XaError, RuntimeError):
    """The saved tensors of the graph were freed by an earlier ``.backward()``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> y = torch.tanh(x).sum()
        >>> y.backward()                                    # frees the saved tensors
        >>> xa.backward(y, order=1)
        Traceback (most recent call last):
            ...
        xa.errors.GraphFreedError: the saved tensors of TanhBackward0 (...) were freed by an earlier backward(); ...
    """


class GraphModifiedError(XaError, RuntimeError):
    """A tensor saved by the graph was modified in place after the forward pass.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> h = x * 2
        >>> y = (h * h).sum()                               # saves h
        >>> with torch.no_grad():
        ...     _ = h.add_(1)
        >>> xa.backward(y, order=2)
        Traceback (most recent call last):
            ...
        xa.errors.GraphModifiedError: a tensor saved by MulBackward0 (...) was modified in place ...
    """


class MemoryBudgetError(XaError, MemoryError):
    """The plan needs more memory than the budget, even one source row at a time.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> try:
        ...     xa.backward(torch.tanh(x).sum(), order=2, max_memory=8)      # bytes
        ... except xa.MemoryBudgetError as e:
        ...     print(isinstance(e, MemoryError), "over max_memory=8 B" in str(e), hasattr(x, "xgrad"))
        True True False
    """


class RuleError(XaError, RuntimeError):
    """An operator rule returned something inconsistent with its node.

    Example:
        >>> def wrong_port(ctx, slots):                     # a port of 7 entries for an input of 2
        ...     lab = xa.LabelMaker()
        ...     return lab.factor(lab.dims(ctx.out_shape), [lab.dims((7,))])
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> xa.backward(torch.tanh(x).sum(), order=1, configurations={"TanhBackward0": wrong_port})
        Traceback (most recent call last):
            ...
        xa.errors.RuleError: the rule for TanhBackward0 (slots (0,)): port of slot 0 covers 7 entries, ...
    """


class BatchMixingError(XaError, ValueError):
    """With ``batch_dim=``, a node of the graph couples samples (a sum or softmax over the batch, ...).

    Example:
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
        >>> xa.backward(torch.softmax(X, dim=0), order=1, batch_dim=0)      # a softmax over the samples
        Traceback (most recent call last):
            ...
        xa.errors.BatchMixingError: SoftmaxBackward0 at SoftmaxBackward0[2, 2] couples samples: ...
    """


class RegistryError(XaError, KeyError):
    """A rule was registered twice without ``override=True``.

    Example:
        >>> try:
        ...     xa.register("TanhBackward0", lambda ctx, slots: None)       # xa has one
        ... except xa.RegistryError as e:
        ...     print(isinstance(e, KeyError), e)
        True a rule for 'TanhBackward0' is already registered; pass override=True to replace it
    """

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class QueryError(XaError, ValueError):
    """A query names what the leaf does not have: an entry out of range, a coefficient of the wrong shape.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> xa.partials(torch.tanh(x).sum(), x, [(5,)])     # x has entries 0 and 1
        Traceback (most recent call last):
            ...
        xa.errors.QueryError: partials: the multi-index (5,) names an entry outside the leaf's 2 entries ...
    """


class SamplingError(XaError, ValueError):
    """A randomized estimate (``samples=``) was asked with a bad argument: ``samples``, ``distribution``, ``generator``.

    Also raised for a distribution that gives no unbiased estimate of what is asked (Rademacher
    directions for the biharmonic).

    Example:
        >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        >>> u = torch.tanh(x).sum(1, keepdim=True)
        >>> xa.laplacian(u, x, batch_dim=0, samples=0)
        Traceback (most recent call last):
            ...
        xa.errors.SamplingError: xa.laplacian: samples must be a positive int ... got 0
    """

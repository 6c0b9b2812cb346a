"""The rule registry: torch node name -> rule.

A rule is ``rule(ctx, slots) -> Factor | None``: ``ctx`` is the
:class:`~xa.capture.NodeCtx` of one node, ``slots`` a sorted tuple of input
slot indices (repeats allowed, length >= 1), and the result the local
derivative over those slots, or ``None`` where it is zero by structure.
"""

from __future__ import annotations

from typing import Callable, Optional

from .errors import RegistryError
from .factor import Factor

Rule = Callable[..., Optional[Factor]]

_RULES: dict[str, Rule] = {}


def register(name: str, rule: Rule, *, override: bool = False) -> Rule:
    """Register ``rule`` for the torch node called ``name`` (e.g. ``"TanhBackward0"``).

    Args:
        name: the ``grad_fn.name()`` torch records for the operator.
        rule: ``rule(ctx, slots) -> Factor | None``.
        override: replace an existing rule instead of raising.

    Returns:
        The rule, so that ``register`` can be used as a decorator helper.

    Raises:
        RegistryError: ``name`` already has a rule and ``override`` is false.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"rule name must be a non-empty str, got {name!r}")
    if not callable(rule):
        raise TypeError(f"rule for {name!r} must be callable, got {type(rule).__name__}")
    if name in _RULES and not override:
        raise RegistryError(f"a rule for {name!r} is already registered; pass override=True to replace it")
    _RULES[name] = rule
    return rule


def lookup(name: str) -> Optional[Rule]:
    return _RULES.get(name)


def supported() -> list[str]:
    """The sorted names of every torch node xa has a rule for."""
    return sorted(_RULES)

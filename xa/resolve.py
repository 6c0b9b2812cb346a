"""Rule resolution: which rule describes each node of a captured graph, for one call.

In order: a rule the user swapped in for the call (``configurations=``), the
registry's (:mod:`xa.registry`), the generic fallback (:mod:`xa.fallback`;
never for a custom ``torch.autograd.Function``, which is the user's own
operator). A node whose rule is a composite (:func:`xa.families.composite`)
is then replaced, in the graph, by its pieces (:mod:`xa.composite`) -- at the
call's order only where its dense factors would be large -- and the pieces'
rules are resolved in turn.
"""

from __future__ import annotations

import dataclasses

from .capture import Graph, is_custom
from .composite import expand
from .fallback import fallback_rule
from .registry import lookup


def resolve(graph: Graph, overrides: dict, order: int | None = None) -> dict:
    """The rule of every node name in ``graph`` (``None`` where there is none), ``overrides`` first.

    Composite nodes are expanded into their pieces here, in ``graph``; a node the fallback
    describes gets a label saying so (explain shows it, and the graph's signature holds it).
    """

    def rules_of_names():
        return {v.name: overrides.get(v.name) or lookup(v.name)
                or (None if v.fn is not None and is_custom(v.fn) else fallback_rule(v.name))
                for v in graph.values if v.leaf is None}

    rules = rules_of_names()
    if expand(graph, rules, order):
        rules = rules_of_names()
    for n, v in enumerate(graph.values):
        through = getattr(rules.get(v.name), "fallback", None)
        if through is not None and v.leaf is None and "fallback" not in v.label:
            mark = f"(fallback: dense, aten::{through})"
            graph.values[n] = dataclasses.replace(v, label=f"{v.label or v.name} {mark}")
            graph.forget_signature()
    return rules

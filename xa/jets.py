"""The forward direction: jets ``d^k v / dL^k`` pushed from one leaf up to the source.

For a leaf ``L`` and every value ``v`` that depends on it, the jet
``J_v[k] = d^k v / dL^k`` is a dense tensor ``(*v.shape, n_L, ..., n_L)``.
``J_L[1]`` is the identity (never stored) and ``J_L[k] = 0`` for ``k >= 2``.
For ``y = f(x_1 .. x_m)``, Faa di Bruno in the forward direction reads

    J_y[k] = sum over set partitions P of {1..k}, and over a slot a_B for
             every block B of P:  d^|P| y / dx_(a_B ...)  contracted with
             prod over B: J_(x_(a_B))[|B|] at the positions of B

Written out term by term, like the backward direction, so every jet is
exactly symmetric. A value read by two operators (fan-out) needs nothing
special here: each consumer reads the same jet. The jet of the source is
the answer, already in xa's layout ``(s, n_L, ..., n_L)``.

Blocks cost ``n_v * n_L^k`` instead of backprop's ``s * n_v^k``: the right
way round for a small leaf feeding a wide network (a PINN's input).
"""

from __future__ import annotations

from itertools import product

from .capture import Graph
from .terms import PlanFactors, Step, TermLabels, compile_term, set_partitions

IDENTITY = "identity"


def jet_key(leaf: int, value: int, k: int) -> tuple:
    return ("jet", leaf, value, k)


def build_forward(graph: Graph, order: int, rules: dict, leaves: tuple) -> tuple:
    """Steps computing the jets of each leaf in ``leaves``: ``(steps, block_shapes, results)``."""
    steps, shapes, results = [], {}, {}
    for leaf in leaves:
        leaf_steps = _leaf_steps(graph, order, leaf, rules, shapes)
        steps.extend(leaf_steps)
        results[leaf] = [jet_key(leaf, 0, k) for k in range(1, order + 1)]
        for key in results[leaf]:
            shapes.setdefault(key, graph.source_shape + graph.values[leaf].shape * key[3])
    _retire_after_last_read(steps, {k for keys in results.values() for k in keys})
    return steps, shapes, results


def _depends_on(graph: Graph, leaf: int) -> list:
    reach = [False] * len(graph.values)
    for i in reversed(graph.order):
        reach[i] = i == leaf or any(j is not None and reach[j] for j in graph.values[i].inputs)
    return reach


def _leaf_steps(graph, order, leaf, rules, shapes) -> list:
    reach = _depends_on(graph, leaf)
    n_leaf = graph.values[leaf].numel
    jets = {leaf: {1: IDENTITY}}  # value -> {order k: block key or IDENTITY}
    steps = []
    for y in reversed(graph.order):
        v = graph.values[y]
        if v.leaf is not None or not reach[y]:
            continue
        inputs = tuple(i if i is not None and reach[i] else None for i in v.inputs)
        slots = [s for s, i in enumerate(inputs) if i is not None]
        factor = PlanFactors(graph, y, graph.rule(y, rules), graph.ctx(y, planning=True), inputs)
        step = Step(y, v.name)
        jets[y] = {}
        for k in range(1, order + 1):
            target = jet_key(leaf, y, k)
            for p in range(1, k + 1):
                for part in set_partitions(tuple(range(k)), p):
                    for choice in product(slots, repeat=p):
                        if any(len(b) not in jets[inputs[a]] for b, a in zip(part, choice)):
                            continue
                        pairs = sorted(zip(choice, part), key=lambda t: t[0])
                        f = factor(tuple(a for a, _ in pairs))
                        if f is None:
                            continue
                        step.terms.append(_jet_term(graph, leaf, n_leaf, y, k, f, pairs, inputs, jets, target))
                        jets[y][k] = target
            if target in jets[y].values():
                shapes[target] = v.shape + graph.values[leaf].shape * k
        factor.finish(step)
        steps.append(step)
    return steps


def _jet_term(graph, leaf, n_leaf, y, k, f, pairs, inputs, jets, target):
    lab = TermLabels()
    slots = tuple(a for a, _ in pairs)
    shift, operands = lab.adopt(f, slots)
    positions: dict = {}
    sources = []
    for (a, block), port in zip(pairs, f.ins):
        port = tuple(shift[i] for i in port)
        key = jets[inputs[a]][len(block)]
        if key == IDENTITY:  # d leaf / d leaf: the position is the leaf's own port
            positions[block[0]] = port
            continue
        fresh = [lab.new(n_leaf) for _ in block]
        for pos, label in zip(block, fresh):
            positions[pos] = (label,)
        sources.append((key, port + tuple(fresh)))
    out = [shift[i] for i in f.out]
    for pos in range(k):
        out.extend(positions[pos])
    return compile_term(lab, sources, operands, [slots], out, target)


def _retire_after_last_read(steps: list, keep: set) -> None:
    last: dict = {}
    for index, step in enumerate(steps):
        for term in step.terms:
            for key, _ in term.sources:
                last[key] = index
    for key, index in last.items():
        if key not in keep:
            steps[index].retire.append(key)



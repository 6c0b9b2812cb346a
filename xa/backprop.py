"""Backprop: the joint partial blocks of the source, contracted from the source down.

The mathematics (see DESIGN.md, section 4). Backprop keeps, for the
current frontier of the graph, the joint partial blocks
``D[M] = d^k S / du_1 ... du_k`` over multisets ``M = {u_1 .. u_k}`` of
frontier values, each a dense tensor ``(*S.shape, *u_1.shape, ...)``,
symmetric under swapping two positions that hold the same value.

Processing ``y = f(x_1 .. x_m)`` (all of ``y``'s consumers done) replaces
every block holding ``y`` p times and other values ``V`` by its
multivariate Faa di Bruno expansion. For a target multiset ``M'``
(``q >= p`` positions reached through ``f``'s input slots, plus ``V``),
the chain rule for ``S(z) = G(f(slots(z)), V(z))`` sums over

1. which positions of ``M'`` are the ``V`` positions of ``D[M]`` (a value
   that is both in ``V`` and an input of ``f`` -- fan-out -- gets every
   choice),
2. which input slot each remaining position goes through (``x * x`` has
   the same value in two slots),
3. every set partition of those positions into ``p`` blocks, block ``B``
   contributing the rule's local derivative ``d^|B| y / dx_(slots of B)``.

Every term is written out (no grouping by multiplicity), so each block is
exactly symmetric by construction and no symmetrisation pass is needed.
A target block is kept only if some requested value (a leaf, the target,
a retained tensor) is an ancestor of every value in it; for a chain this
leaves exactly the pure blocks ``D[x^k]``.

A term is one einsum over the incoming block and the factors' operands
(:mod:`xa.terms`).
"""

from __future__ import annotations

import math
from itertools import combinations, combinations_with_replacement, product

from .batch import BatchFactors, Batching, operand_views
from .capture import Graph
from .errors import QueryError
from .factor import split_label
from .terms import PlanFactors, Step, TermLabels, compile_term, set_partitions


def ancestry(graph: Graph, requested: set) -> list:
    """For each value, the requested values it reaches (itself included)."""
    reach: list = [frozenset()] * len(graph.values)
    for i in reversed(graph.order):
        v = graph.values[i]
        acc = {i} if i in requested else set()
        for j in v.inputs:
            if j is not None:
                acc |= reach[j]
        reach[i] = frozenset(acc)
    return reach


def build_backward(graph: Graph, order: int, rules: dict, requested: tuple, retained: tuple,
                   rows: int | None = None, batch: Batching | None = None, mixed: tuple = (),
                   tied: tuple = ()) -> tuple:
    """Steps of backprop to ``order``: ``(steps, block_shapes, results)``.

    ``results`` maps each requested value to the keys of its blocks for
    k = 1..order; a retained value's blocks are snapshot by its step. ``rows`` plans over a chunk of that many source
    rows, whose one-hot block ``(rows, *source.shape)`` is given at execution;
    without it the source's own block is the identity, never built. With ``batch``
    every block is per sample, ``(samples, *S.shape', *u_1.shape', ...)`` (``'``: the
    sample dim left out of a batched value), the sample label tied through every term.
    ``mixed`` lists joint blocks of requested leaves to keep too (sorted multisets of
    value indices, ``(A, B)`` for ``d^2 S / dA dB``); ``results[("mixed", M)]`` is ``[M]``.
    ``tied`` lists leaves whose positions are tied in every block: a block holding one of them
    ``j`` times keeps only its diagonal ``d^j S / dL_i^j`` (the leaf's dims once), and every term
    writing it computes only that (:mod:`xa.diag`; the other positions stay dense). Only order
    ``order`` of a tied leaf is kept: its lower orders are left out (``None`` when read).
    """
    N = order
    wanted = set(requested) | set(retained)
    reach = ancestry(graph, wanted)
    if batch is None:
        lead = graph.source_shape if rows is None else (rows,)
        s_numel = math.prod(lead)

        def shape_of(u):
            return graph.values[u].shape
    else:
        lead = (batch.size,) + batch.shape(graph, 0)
        s_numel = batch.numel(graph, 0)

        def shape_of(u):
            return batch.shape(graph, u)

    groups = {frozenset(ms) for ms in mixed}
    tied = frozenset(tied)

    def keep(m):
        if tied and len(m) < N and all(u in tied for u in m):
            return False  # a tied leaf's lower orders: only the diagonal of order N is asked (xa.diag)
        common = reach[m[0]]
        for u in m[1:]:
            common = common & reach[u]
        # a joint block of leaves asked together: each value reaches one of them
        return bool(common) or any(all(reach[u] & g for u in m) for g in groups)

    def block_shape(m):
        dims, seen = [], set()
        for u in m:
            if u in tied:  # a tied leaf's positions share one set of dims
                if u in seen:
                    continue
                seen.add(u)
            dims.extend(shape_of(u))
        return lead + tuple(dims)

    live = {(0,): None}  # block keys
    shapes = {} if rows is None else {(0,): (rows,) + graph.source_shape}
    steps = []
    for y in graph.order:
        v = graph.values[y]
        holding = [m for m in live if y in m]
        if not holding:
            continue
        snapshot = y in retained
        if v.leaf is not None or not (reach[y] - {y}):
            if snapshot:
                steps.append(Step(y, v.title, snapshot=True))
            continue
        inputs = tuple(i if i is not None and reach[i] else None for i in v.inputs)
        factor = PlanFactors(graph, y, graph.rule(y, rules), graph.ctx(y, planning=True), inputs)
        sampled = None if batch is None else BatchFactors(graph, batch, y, inputs, factor)
        step = Step(y, v.title, snapshot=snapshot)
        for m in holding:
            for term in _expand(graph, m, y, inputs, N, keep, factor, s_numel, rows is None, sampled, tied):
                if term.target not in live:
                    live[term.target] = True
                    shapes[term.target] = block_shape(term.target)
                step.terms.append(term)
        factor.finish(step)
        for m in holding:
            del live[m]
        step.retire = [m for m in holding if m != (0,) or rows is not None]
        steps.append(step)

    results = {i: [(i,) * k for k in range(1, N + 1)] for i in requested}
    results.update({("mixed", ms): [ms] for ms in mixed})
    for keys in results.values():
        for k in keys:
            shapes.setdefault(k, block_shape(k))
    return steps, shapes, results


def _expand(graph, m, y, inputs, N, keep, factor, s_numel, identity, sampled, tied=frozenset()):
    p = m.count(y)
    V = tuple(u for u in m if u != y)
    nodes = sorted({i for i in inputs if i is not None})
    slots_of = {z: [s for s, i in enumerate(inputs) if i == z] for z in nodes}
    for q in range(p, N - len(V) + 1):
        for through in combinations_with_replacement(nodes, q):
            target = tuple(sorted(V + through))
            if not keep(target):
                continue
            groups: dict = {}
            for pos, z in enumerate(target):
                groups.setdefault(z, []).append(pos)
            vchoices = [combinations(groups[z], V.count(z)) for z in groups]
            for vpick in product(*vchoices):
                vpos = {z: list(c) for z, c in zip(groups, vpick)}
                taken = {pos for c in vpick for pos in c}
                rest = [pos for pos in range(len(target)) if pos not in taken]
                for slots in product(*(slots_of[target[pos]] for pos in rest)):
                    for part in set_partitions(tuple(range(len(rest))), p):
                        blocks = []
                        for members in part:
                            members = sorted(members, key=lambda t: slots[t])
                            f = factor(tuple(slots[t] for t in members))
                            if f is None:
                                break
                            blocks.append((f, [rest[t] for t in members], tuple(slots[t] for t in members)))
                        else:
                            yield _term(graph, m, y, V, vpos, target, blocks, s_numel, identity, sampled, tied)


def _term(graph, m, y, V, vpos, target, blocks, s_numel, identity, sampled, tied=frozenset()):
    lab = TermLabels()
    sample = None if sampled is None else lab.new(sampled.batch.size)
    resolved = []
    for f, positions, slots in blocks:
        p, ins_p = None, (None,) * len(slots)
        if sampled is not None:
            f, p, ins_p = sampled.get(slots)
        resolved.append((f, p, ins_p, positions, slots))
    ties = {u for u in tied if target.count(u) > 1}
    if ties:  # every port of a tied leaf split alike, so that its positions can share labels
        resolved = _refine(graph, y, resolved, target, ties)
    out_of_pos: dict = {}
    y_ports, operands, factors, views = [], [], [], []
    tied_sample: dict = {}  # each factor's own sample label -> the term's
    for f, p, ins_p, positions, slots in resolved:
        shift, f_operands = lab.adopt(f, slots)
        ps = None if p is None else shift[p]
        if ps is not None:
            tied_sample[ps] = sample
        if sampled is not None:
            views.extend(operand_views(f, f_operands, ps))
        y_ports.append(tuple(shift[i] for i in f.out if shift[i] != ps))
        for pos, port, pin in zip(positions, f.ins, ins_p):
            out_of_pos[pos] = tuple(shift[i] for i in port if pin is None or i != pin)
        operands.extend(f_operands)
        factors.append(slots)
    root: dict = dict(tied_sample)
    canon: dict = {}  # a tied leaf -> the labels all its positions share
    for u in sorted(ties):
        ports = [out_of_pos[pos] for pos in range(len(target)) if target[pos] == u and pos in out_of_pos]
        if ports:
            canon[u] = ports[0]
            for port in ports[1:]:  # identify label for label: the term walks the diagonal
                for a, b in zip(port, ports[0]):
                    _union(root, a, b)
    if root:
        def sub(labels):
            return tuple(_find(root, lb) for lb in labels)
        operands = [(ref, sub(labels)) for ref, labels in operands]
        y_ports = [sub(port) for port in y_ports]
        out_of_pos = {pos: sub(port) for pos, port in out_of_pos.items()}
        canon = {u: sub(port) for u, port in canon.items()}
    lead = [] if sample is None else [sample]
    sources = []
    if identity and m == (0,):  # the source's own block is the identity: its labels are the y port's
        a = y_ports[0]
    else:
        a = (lab.new(s_numel),)
        d_labels = lead + list(a)
        yi = 0
        vi: dict = {}
        for u in m:
            if u == y:
                d_labels.extend(y_ports[yi])
                yi += 1
                continue
            n = graph.values[u].numel if sampled is None else sampled.batch.numel(graph, u)
            if u in tied:  # one set of labels for all the leaf's positions, in the block and the target
                if u not in canon:
                    canon[u] = (lab.new(n),)
                if vi.get(u, 0) == 0:
                    d_labels.extend(canon[u])
                labels = canon[u]
            else:
                labels = (lab.new(n),)
                d_labels.extend(labels)
            pos = vpos[u][vi.get(u, 0)]
            vi[u] = vi.get(u, 0) + 1
            out_of_pos[pos] = labels
        sources.append((m, tuple(d_labels)))
    out = lead + list(a)
    for pos in range(len(target)):
        if target[pos] in tied and pos > 0 and target[pos - 1] == target[pos]:
            continue  # a tied leaf's dims once (its positions are adjacent: the target is sorted)
        out.extend(out_of_pos[pos])
    term = compile_term(lab, sources, operands, factors, out, target, unit_sums=True)
    if sampled is not None:
        term.views = tuple(views)
    return term


def _find(root: dict, label: int) -> int:
    while root.get(label, label) != label:
        label = root[label]
    return label


def _union(root: dict, a: int, b: int) -> None:
    a, b = _find(root, a), _find(root, b)
    if a != b:
        root[a] = b


def _refine(graph, y, resolved, target, ties) -> list:
    """The factors with their labels split so that every port of a tied leaf has the same sizes.

    A port is a row-major split of the leaf's entries; two ports of one leaf may split them
    differently (``(4, 3)`` and ``(12,)``): each is split at the other's boundaries, a reshape
    of every operand that carries the label (:func:`xa.factor.split_label`).
    """
    resolved = [list(r) for r in resolved]
    for u in sorted(ties):
        for _ in range(64):
            ports = [(r, t) for r in resolved for t, pos in enumerate(r[3]) if target[pos] == u]
            seqs = [_port_sizes(r, t) for r, t in ports]
            if len({tuple(sz for _, sz in q) for q in seqs}) <= 1:
                break
            cuts = set()
            for q in seqs:
                acc = 1
                for _, sz in q:
                    acc *= sz
                    cuts.add(acc)
            changed = False
            for (r, _), q in zip(ports, seqs):
                acc = 1
                for label, sz in q:
                    inside = sorted(c for c in cuts if acc < c < acc * sz)
                    if inside:
                        first = inside[0] // acc
                        if inside[0] % acc or sz % first:
                            raise QueryError(
                                f"xa.diagonal: {graph.values[y].title} reads the leaf through ports that split "
                                "its entries in ways no common reshape fits; direction='forward' computes it")
                        r[0] = split_label(r[0], label, (first, sz // first))
                        changed = True
                        break
                    acc *= sz
                if changed:
                    break
            if not changed:
                break
    return [tuple(r) for r in resolved]


def _port_sizes(r, t) -> list:
    """``(label, size)`` along port ``t`` of a resolved factor, its sample label left out."""
    f, _, ins_p = r[0], r[1], r[2]
    pin = ins_p[t]
    return [(lb, f.sizes[lb]) for lb in f.ins[t] if pin is None or lb != pin]

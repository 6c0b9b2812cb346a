"""Execute: run a plan on the tensors torch saved.

Each step asks the node's rule for its factors once (now with the real
saved tensors; operands and coefficients both come from here, and each
factor's structure is checked against the plan's), runs every term's
cached contraction, adds the result into a strided view of its target
block, and frees the blocks that died with the node. Nothing here looks at
a tensor's values to decide what to do.
"""

from __future__ import annotations

import math

import opt_einsum as oe
import torch

from . import fold, jets
from .capture import Graph
from .factor import broadcast_shapes
from .plan import Plan
from .terms import NodeFactors


def run(plan: Plan, graph: Graph, rules: dict, blocks: dict | None = None, first: int = 0,
        factors: dict | None = None, seeds: dict | None = None, slices=None, arena=None,
        budget: float | None = None) -> tuple[dict, dict]:
    """Run ``plan`` from the initial ``blocks``; returns ``(blocks, retained)`` keyed like the plan's results.

    Under grad mode every operation is out of place, so torch's autograd records the derivatives as functions
    of the saved tensors (which hang on the user's graph): the results can be trained on. Under
    ``torch.no_grad()`` blocks are written in place and the results are plain data.
    A per-sample plan over a chunk of samples reads samples ``first`` on of every factor;
    ``factors`` (a dict) keeps the rules' factors from one chunk to the next.
    ``seeds`` holds a query's values (directions, weights: :mod:`xa.queries`), read here, never planned on.
    A sliced chunk's plan builds factors from the chunk's slices of the saved tensors: ``slices``
    (:class:`Slices`) takes them, else they are narrowed.
    Without autograd the plan's large blocks and temporaries are written into its arena (:mod:`xa.arena`),
    or ``arena``'s (the chunks of one call share the first chunk's plan's), which ``budget`` makes room for.
    """
    record = torch.is_grad_enabled()
    buffers = None
    if not record and plan.layout is not None:
        spare = None if budget is None else budget - plan.need_bytes()
        buffers = (plan.arena if arena is None else arena).claim(plan.layout, graph.device, budget, spare)
    try:
        return _run(plan, graph, rules, blocks, first, factors, seeds, slices, buffers)
    finally:
        if buffers is not None:
            buffers.done()


def _run(plan, graph, rules, blocks, first, factors, seeds, slices, buffers) -> tuple[dict, dict]:
    dtype, device = graph.dtype, graph.device
    record = torch.is_grad_enabled()
    blocks = {} if blocks is None else blocks
    retained: dict = {}
    for at, step in enumerate(plan.steps):
        if step.snapshot:
            kept = [blocks.get((step.value,) * k) for k in range(1, plan.order + 1)]
            if step.value == 0:  # the source's own first block: the identity, or this chunk's rows of it
                s = math.prod(graph.source_shape)
                if plan.batch is not None:
                    s = plan.batch.numel(graph, 0)
                    kept[0] = torch.eye(s, dtype=dtype, device=device).expand(plan.batch.size, s, s)
                else:
                    kept[0] = blocks[(0,)] if (0,) in blocks else torch.eye(s, dtype=dtype, device=device)
            retained[step.value] = kept
        if not step.terms:
            continue
        # every chunk's plan has the same steps in the same order, the same factors (all samples)
        node = None if factors is None else factors.get(at)
        if node is None:
            rule = graph.rule(step.value, rules)
            if step.value in plan.folds:  # it reads a permutation's input directly (xa.fold)
                rule = fold.wrap(rule, plan.folds[step.value])
            # in a sliced chunk of samples, the factors the plan built from slices are built from this chunk's
            sliced = None if step.cut is None else graph.ctx(step.value, planning=False, cut=step.cut, first=first,
                                                              slices=slices)
            whole = graph.ctx(step.value, planning=False)
            if buffers is not None:  # the rules' factors written into the arena's memory (ctx.out)
                for ctx, part in ((whole, "whole"), (sliced, "sliced")):
                    if ctx is not None:
                        ctx.outs = buffers.factors(at, part)
            node = NodeFactors(step, rule, whole, sliced)
            if factors is not None:
                factors[at] = node
        gathered: dict = {}  # this step's reads at sub-multi-indices, shared by its terms (xa.jets)
        for m, term in enumerate(step.terms):
            operands = []
            for n, (key, view) in enumerate(term.sources):
                gather = None if term.gathers is None else term.gathers[n]
                if gather is None:
                    block = blocks[key]
                    operands.append(block if block.shape == view else block.reshape(view))
                    continue
                axis, before, spec, number = gather
                operand = gathered.get(number)
                if operand is None:
                    source = blocks[key].reshape(view[:axis] + (before,) + view[axis + 1:])
                    into = _buffer(buffers, (at, None, ("gather", number)), dtype, view)
                    operand = gathered[number] = torch.index_select(
                        source, axis, jets.index(*spec[:3], device, spec[3]), **({} if into is None else {"out": into}))
                operands.append(operand)
            for n, ref in enumerate(term.operands):
                if isinstance(ref[0], str):  # a constant: the leaf's identity jet read at a[pos], a query's values
                    size = None if plan.batch is None else plan.batch.size
                    operand = jets.constant(ref, seeds, dtype, device, first, size)
                    operands.append(operand.reshape(term.shapes[len(operands)]))
                    continue
                slots, k = ref
                operand = node[slots].operands[k][0].to(dtype)
                if term.views is not None and term.views[n] is not None:
                    operand = _sample_view(operand, term.views[n], plan.batch, first)
                shape = term.shapes[len(operands)]
                if operand.shape != shape:  # a label of size one left out (unit_sums), a label split (xa.backprop)
                    operand = operand.reshape(shape)
                operands.append(operand)
            coef = node.coef(term)
            target = blocks.get(term.target)
            if term.broadcast is not None:
                if record:
                    _record_product(term, coef, operands, blocks, plan)
                else:
                    _broadcast_product(term, coef, operands, target, blocks, plan, dtype, device,
                                       buffers, (at, m))
                continue
            if term.expr is not None:
                outs = copies = None
                if not record:  # (every step that can writes into a buffer, new where the arena has none)
                    outs = [None] * len(term.expr.steps)
                if buffers is not None:
                    steps = len(term.expr.steps)
                    outs = [_buffer(buffers, (at, m, ("inter", i)), dtype) for i in range(steps - 1)]
                    last = "block" if target is None and term.full else "result"
                    outs.append(_buffer(buffers, (at, m, last), dtype))
                    copies = [tuple(_buffer(buffers, (at, m, ("copy", i, j)), dtype) for j in (0, 1))
                              for i in range(steps)]
                result = term.expr(*operands, backend="torch", outs=outs, copies=copies)
            else:
                result = torch.ones((), dtype=dtype, device=device)
            if record:
                _record(term, coef, result, blocks, plan)
                continue
            if target is None and term.full and term.expr is not None:
                # The first contribution covers the whole block in its order: it becomes the
                # block, unless it shares memory with an operand (a block read, a saved tensor).
                if not term.alias and any(_overlap(result, op) for op in operands):
                    result = result.clone()
                # kept in the layout the contraction gave (a matmul may give it transposed): a later
                # term that adds into it makes it contiguous first (_view), a read reshapes it
                block = result.reshape(plan.block_shapes[term.target])
                if coef != 1.0:
                    block.mul_(coef)
                blocks[term.target] = block
                continue
            _view(term, blocks, plan, dtype, device, _buffer(buffers, (at, m, "block"), dtype)).add_(
                result.reshape(term.result_shape), alpha=coef)
        for key in step.retire:
            blocks.pop(key, None)
    return blocks, retained


class Slices:
    """The chunks' slices of the saved tensors, for a call that runs in chunks of ``sizes`` samples in turn.

    Under autograd, each saved tensor is split once (one ``split`` node, made by the first chunk that reads
    it, which saves nothing) and each chunk reads its piece: the backward then puts the pieces' gradients
    together once. A narrow per chunk would give each chunk's gradient as a zero-filled tensor of all
    samples, one pass over the whole saved tensor per chunk. Without autograd a narrow is a plain view.
    """

    def __init__(self, sizes: list):
        self.sizes = list(sizes)
        self.index, at = {}, 0
        for n, size in enumerate(self.sizes):
            self.index[at] = n
            at += size
        self.made: dict = {}

    def __call__(self, tensor: torch.Tensor, dim: int, first: int, count: int) -> torch.Tensor:
        if not torch.is_grad_enabled() or tensor.shape[dim] != sum(self.sizes):
            return tensor.narrow(dim, first, count)
        key = (same(tensor), dim)
        hit = self.made.get(key)
        if hit is None:  # (the tensor is kept with its pieces: its id stays its own)
            hit = self.made[key] = (tensor, tensor.split(self.sizes, dim))
        return hit[1][self.index[first]]


def same(tensor: torch.Tensor) -> tuple:
    """A key equal for two unpackings of one saved tensor (two nodes that saved the same value): its memory,
    layout and place in autograd. A split of one serves both, and its gradient is counted once."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.grad_fn if tensor.grad_fn is not None else id(tensor), tensor.output_nr)


def gradient_bytes(plan: Plan, graph: Graph) -> int:
    """What the backward of a recorded run in chunks of samples holds beyond one chunk's tape, in bytes.

    Each saved tensor the chunks read that carries the samples and requires grad gets its gradient of
    all samples, put together from the chunks' and held until the backward has run every chunk, plus the
    largest of them once more (the split's backward concatenates its pieces). A factor built from all
    samples and narrowed (a node that cannot be cut) gets a gradient of all samples in every chunk.
    (A shared one, a weight, gets a gradient of its own size, as the parameter's ``.grad``: not counted.)
    """
    batch, provenance = plan.batch, graph.provenance()
    seen: dict = {}
    narrowed = 0
    for step in plan.steps:
        if not step.terms:
            continue
        where = provenance[step.value]
        for name, item in graph.values[step.value].saved.items():
            pairs = zip(item, where.get(name) or (None,) * len(item)) if isinstance(item, tuple) else \
                [(item, where.get(name))]
            for t, j in pairs:
                if isinstance(t, torch.Tensor) and t.requires_grad and j is not None and batch.at[j] is not None:
                    seen[same(t)] = t.numel() * t.element_size()
        if step.cut is None or len(step.sliced) < len(step.structure):
            narrowed = max(narrowed, step.factor_elements * plan.itemsize)
    return sum(seen.values()) + max(seen.values(), default=0) + narrowed


def _sample_view(operand, view, batch, first) -> torch.Tensor:
    """A factor operand with its labels split as planned, narrowed to the chunk's samples.

    One built from the chunk's slices (a sliced chunk, :func:`xa.batch.cut`) holds only them already.
    """
    shape, axes = view
    operand = operand.reshape(shape)
    if batch is not None and batch.size != batch.total:
        for axis in axes:
            # all samples' (times the items of a jet kept per item, xa.sparsity): narrowed to the chunk's
            if shape[axis] != batch.size and shape[axis] % batch.total == 0:
                per = shape[axis] // batch.total
                operand = operand.narrow(axis, first * per, batch.size * per)
    return operand


def _big_and_small(term, coef, operands, buffers=None, name=None) -> tuple:
    """A broadcast term's operands lined up on its output labels: ``(largest, product of the others or None,
    coef)``, the coefficient folded into the smallest operand where there is one (no pass over anything larger).

    The small operands' product is the term's scratch (plan.peak counts it), in the arena's buffers
    ``name + ("scaled",)`` and ``name + (("scratch", j),)`` where ``buffers`` has them.
    """
    parts = []
    for n, perm, shape in term.broadcast:  # smallest first
        op = operands[n] if perm is None else operands[n].permute(perm)
        parts.append(op if op.shape == shape else op.reshape(shape))
    big = parts.pop()
    small = None
    if parts:
        small = parts[0]
        if coef != 1.0:
            into = _buffer(buffers, name + ("scaled",), small.dtype, small.shape) if buffers else None
            small, coef = (small * coef if into is None else torch.mul(small, coef, out=into)), 1.0
        for j, p in enumerate(parts[1:]):
            into = None
            if buffers is not None:
                into = _buffer(buffers, name + (("scratch", j),), small.dtype, broadcast_shapes(small.shape, p.shape))
            small = small * p if into is None else torch.mul(small, p, out=into)
    return big, small, coef


def _buffer(buffers, name, dtype, shape=None) -> torch.Tensor | None:
    """The arena's buffer ``name`` of this run (flat, or viewed as ``shape``), or None: allocate as usual."""
    if buffers is None:
        return None
    hit = buffers.get(name, dtype)
    return hit if hit is None or shape is None else hit.view(shape)


def _broadcast_product(term, coef, operands, target, blocks, plan, dtype, device, buffers=None, name=None) -> None:
    """A term that sums no label: multiply the small operands, then one pass over the block.

    ``view += coef * big * small`` (``addcmul_``), or, for the first term of
    a block that it covers whole, ``block = big * (coef * small)`` written
    straight into fresh memory: the block is never zeroed nor copied.
    """
    big, small, coef = _big_and_small(term, coef, operands, buffers, name)
    into = _buffer(buffers, None if name is None else name + ("block",), dtype)
    if target is None and term.full and term.alias and small is None:  # a relabelled block: no copy
        block = big.reshape(plan.block_shapes[term.target])
        blocks[term.target] = block.mul_(coef) if coef != 1.0 else block
        return
    if target is None and term.full:
        shape = plan.block_shapes[term.target]
        block = torch.empty(shape, dtype=dtype, device=device) if into is None else into.view(shape)
        view = block.view(term.view_sizes)
        if small is None:
            torch.mul(big, coef, out=view)
        else:
            torch.mul(big, small, out=view)
        blocks[term.target] = block
        return
    view = _view(term, blocks, plan, dtype, device, into)
    if small is None:
        view.add_(big, alpha=coef)
    else:
        view.addcmul_(big, small)


def _record_product(term, coef, operands, blocks, plan) -> None:
    """:func:`_broadcast_product` out of place, so that autograd records it: the same arithmetic, the same numbers.

    A term that adds into part of its block (a diagonal) has both factors laid on the block with
    zeros elsewhere, and ``addcmul`` leaves those entries as they were.
    """
    big, small, coef = _big_and_small(term, coef, operands)
    shape = plan.block_shapes[term.target]
    old = blocks.get(term.target)
    if old is None and term.full:
        blocks[term.target] = (big * coef if small is None else big * small).reshape(shape)
        return
    if old is None:
        old = torch.zeros(shape, dtype=big.dtype, device=big.device)
    if term.full:
        view = old.reshape(term.view_sizes)
        new = torch.add(view, big, alpha=coef) if small is None else torch.addcmul(view, big, small)
        blocks[term.target] = new.reshape(shape)
        return
    big = _embed(big.expand(term.view_sizes), term, shape)
    if small is None:
        blocks[term.target] = torch.add(old, big, alpha=coef)
    else:
        blocks[term.target] = torch.addcmul(old, big, _embed(small.expand(term.view_sizes), term, shape))


def _record(term, coef, result, blocks, plan) -> None:
    """Add ``coef * result`` into its target block out of place, so that autograd records it.

    The same arithmetic as the in-place path, so the same numbers. The result is laid out on the
    term's distinct output labels (size one where it has none); a label the target repeats is a
    diagonal of the block, written by a product with identities.
    """
    shape = plan.block_shapes[term.target]
    result = result.reshape(term.result_shape)
    old = blocks.get(term.target)
    if term.full:
        if old is None:
            blocks[term.target] = (result * coef if coef != 1.0 else result).reshape(shape)
        else:
            blocks[term.target] = torch.add(old.reshape(term.view_sizes), result, alpha=coef).reshape(shape)
        return
    part = _embed(result.expand(term.view_sizes), term, shape)
    if old is None:
        blocks[term.target] = part * coef if coef != 1.0 else part
    else:
        blocks[term.target] = torch.add(old, part, alpha=coef)


def _embed(values, term, shape) -> torch.Tensor:
    """The block of ``shape`` that is ``values`` (on the term's distinct output labels) where the term writes.

    A label the target repeats walks a diagonal: products with identity matrices write it, no in-place
    write, so the block is differentiable at any order and made of operators xa has rules for.
    """
    letters = [oe.get_symbol(u) for u in range(len(term.view_sizes))]
    out, eyes, operands, seen = [], [], [], set()
    for size, u in zip(term.out_sizes, term.out_places):
        if u in seen:
            fresh = oe.get_symbol(len(letters) + len(eyes))
            eyes.append(letters[u] + fresh)
            operands.append(torch.eye(size, dtype=values.dtype, device=values.device))
            out.append(fresh)
        else:
            seen.add(u)
            out.append(letters[u])
    eq = "".join(letters) + "".join("," + e for e in eyes) + "->" + "".join(out)
    return torch.einsum(eq, values, *operands).reshape(shape)


def _view(term, blocks, plan, dtype, device, into=None) -> torch.Tensor:
    """The target block (zeros if this is its first term; in ``into`` if given), contiguous, seen through the
    term's output labels."""
    target = blocks.get(term.target)
    if target is None:
        shape = plan.block_shapes[term.target]
        target = torch.zeros(shape, dtype=dtype, device=device) if into is None else into.view(shape).zero_()
        blocks[term.target] = target
    elif not target.is_contiguous():  # the first term's layout: the view's strides are row-major
        target = target.contiguous()
        blocks[term.target] = target
    return target.as_strided(term.view_sizes, term.view_strides)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory may overlap: the same storage and overlapping byte ranges (an arena holds
    many buffers in one storage; two of them never overlap)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return _start(a) < _start(b) + _extent(b) and _start(b) < _start(a) + _extent(a)


def _start(t: torch.Tensor) -> int:
    return t.data_ptr() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0 and n) * t.element_size()


def _extent(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

"""Arenas: a cached plan's buffers, laid out once and reused from call to call.

A plan knows the shape of every block and every large temporary it makes, and
when each is made and freed. :func:`layout` walks the plan as
:func:`xa.execute.run` does without autograd and gives each buffer of at least
:data:`MIN_BYTES` an offset in one flat arena, two buffers sharing bytes only
when their lifetimes do not meet (greedy by size, as a static memory planner).
The first run of the plan allocates the arena; every later run -- the next
call, the next chunk or cache tile of samples -- writes into the same memory,
so a warm call asks the system for no large block, and takes no page fault
for one.

Never in the arena: what is handed to the user (results, retained partials,
and any block a result is a relabelling of: a later call must not overwrite
them), and everything of a run that autograd records (any tensor may be
saved for the backward, and torch's ``out=`` operations are not recorded).
What the rules build (factors: values of the call) lives beside the layout:
a rule that writes a factor into ``ctx.out(key, shape)`` gets memory of the
arena's own for that node and key (:class:`xa.factor.FactorMemory`), made at the first
call and written again at every later one, where the run's budget has room
for it to stay between calls; it is never shared with anything else, so
factors kept across cache tiles stay whole. A plan's arena serves one run at
a time; a second, concurrent one allocates as before.

Arenas are held by their plans, so they die with them (the plan cache keeps
256); at most :data:`HELD` plans hold one at a time (the least recently used
gives it up), a call under a budget first frees others' that would take it
over, and :func:`release_buffers` frees them all.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch

from .factor import FactorMemory, broadcast_shapes

MIN_BYTES = FactorMemory.MIN_BYTES  # smaller buffers come from the allocator (glibc serves them from its heap)
ALIGN = 4096
HELD = 4  # plans holding an arena at once
ENABLED = True  # False: every run allocates as it goes (the tests compare the two)


@dataclass
class Layout:
    """Where each buffer of a plan's run lives: ``slots[name] = (offset, bytes)`` in an arena of ``total`` bytes.

    A name is ``(step, term, role)``: ``role`` is ``"block"`` (the term's target, made by
    it), ``"result"`` (the term's einsum output, added into its block), ``("inter", i)``
    (step ``i`` of its path) or ``("gather", j)`` (the step's read ``j`` at sub-multi-indices,
    term ``None``). ``peak`` is the run's entries at the worst moment with the arena held
    whole: the arena plus what else is alive then (factors, results, small buffers).
    Two slots whose ``spans`` meet never share a byte.
    """

    slots: dict = field(default_factory=dict)
    total: int = 0
    peak: int = 0
    spans: dict = field(default_factory=dict)  # name -> (made, freed): when each slot's buffer is alive


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(plan, expanded: int = 0) -> Layout:
    """Lay out ``plan``'s buffers (:class:`Layout`); ``plan`` is a :class:`xa.plan.Plan` with its aliases marked,
    ``expanded`` the entries of its forward results expanded to every ordering at the end."""
    itemsize = plan.itemsize
    buffers: list = []  # [name, entries, start, end, escapes, placeable]
    alive: dict = {}  # buffer -> keys of blocks held in it
    block_of: dict = {}  # block key -> buffer index, None for memory not made in a buffer
    live: set = set()  # block keys alive
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def make(name, entries, placeable=True) -> int:
        buffers.append([name, entries, tick(), None, False, placeable])
        return len(buffers) - 1

    def end(b) -> None:
        if b is not None and buffers[b][3] is None:
            buffers[b][3] = tick()

    def drop(key) -> None:
        live.discard(key)
        b = block_of.pop(key, None)
        if b is not None:
            alive[b].discard(key)
            if not alive[b]:
                end(b)

    def hold(key, b) -> None:
        live.add(key)
        block_of[key] = b
        if b is not None:
            alive.setdefault(b, set()).add(key)

    if (0,) in plan.block_shapes:
        hold((0,), None)  # the seed: given, not made
    for n, step in enumerate(plan.steps):
        if step.snapshot:  # retained partials are handed out as they are now
            for key in ((step.value,) * k for k in range(1, plan.order + 1)):
                if block_of.get(key) is not None:
                    buffers[block_of[key]][4] = True
        gathered: dict = {}
        # the step's factors and what the rules allocate to build them: the rules' own memory
        factors = make((n, None, "factors"), step.factor_elements + step.workspace, False) if step.terms else None
        for m, term in enumerate(step.terms):
            for (_, view), g in zip(term.sources, term.gathers or ()):
                if g is not None and g[3] not in gathered:
                    gathered[g[3]] = make((n, None, ("gather", g[3])), math.prod(view))
            shape = plan.block_shapes[term.target]
            first = term.target not in live
            if term.broadcast is not None:
                # the small operands' product: scaled by the coefficient (if it is not one), then one by one
                small = [part for _, _, part in term.broadcast[:-1]]
                product = None
                if small:
                    product = make((n, m, "scaled"), math.prod(small[0]))
                    at = small[0]
                    for j, part in enumerate(small[1:]):
                        at = broadcast_shapes(at, part)
                        was, product = product, make((n, m, ("scratch", j)), math.prod(at))
                        end(was)
                if first and term.full and term.alias and len(term.broadcast) == 1:
                    hold(term.target, block_of.get(term.sources[0][0]))
                elif first:
                    hold(term.target, make((n, m, "block"), math.prod(shape)))
                end(product)
                continue
            path = term.expr
            outs = [None] * (len(path.steps) if path is not None else 0)
            if path is not None:
                stack = [None] * len(term.shapes)  # the operands: nothing of them is made here
                for i, (inds, _) in enumerate(path.steps):
                    used = [stack.pop(x) for x in inds]
                    # a tensordot's operands lined up (copied where their labels move)
                    used += [make((n, m, ("copy", i, j)), c) for j, c in enumerate(path.copies[i]) if c]
                    last = i == len(path.steps) - 1
                    if last and first and term.full:
                        if path.writes[i]:
                            outs[i] = make((n, m, "block"), math.prod(shape))
                        elif term.alias:  # a relabelling of its one source (a view): the same memory
                            outs[i] = block_of.get(term.sources[0][0])
                        else:  # torch.einsum's own tensor becomes the block
                            outs[i] = make((n, m, "block"), math.prod(shape), False)
                    else:
                        outs[i] = make((n, m, "result" if last else ("inter", i)), math.prod(path.shapes[i]),
                                       path.writes[i])
                    for u in used:
                        end(u)
                    stack.append(outs[i])
            if first and term.full and path is not None:
                hold(term.target, outs[-1])
                continue
            if first:  # zeros, then the term adds into them
                hold(term.target, make((n, m, "block"), math.prod(shape)))
            if outs:
                end(outs[-1])  # the result, once added
        for b in gathered.values():
            end(b)
        end(factors)
        for key in step.retire:
            drop(key)
    for keys in plan.results.values():
        for key in keys:
            if block_of.get(key) is not None:
                buffers[block_of[key]][4] = True
    if expanded:  # forward results are expanded to every ordering of their rows at the end
        make(("expanded",), expanded, False)
    last = tick()
    placed: list = []  # (offset, bytes, start, end)
    slots: dict = {}
    spans: dict = {}
    arena_entries: dict = {}
    for name, entries, start, stop, escapes, placeable in sorted(buffers, key=lambda b: (-b[1], b[2])):
        nbytes = entries * itemsize
        if escapes or not placeable or nbytes < MIN_BYTES:
            continue
        stop = last if stop is None else stop
        offset = 0
        for o, size, _, _ in sorted((p for p in placed if p[2] < stop and start < p[3]), key=lambda p: p[0]):
            if offset + nbytes <= o:
                break
            offset = max(offset, o + _aligned(size))
        placed.append((offset, nbytes, start, stop))
        slots[name] = (offset, nbytes)
        spans[name] = (start, stop)
        arena_entries[name] = entries
    total = max((o + _aligned(size) for o, size, _, _ in placed), default=0)
    # the worst moment: the arena whole, and every other buffer alive then (small ones, results)
    events = []
    for name, entries, start, stop, _, _ in buffers:
        if name not in arena_entries:
            events.append((start, entries))
            events.append((last if stop is None else stop, -entries))
    worst = current = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        current += d
        worst = max(worst, current)
    return Layout(slots, total, -(-total // itemsize) + worst, spans)


class Arena:
    """The memory of one plan's :class:`Layout`, made at its first run, per device; one run at a time."""

    def __init__(self):
        self.storage: dict = {}  # device -> uint8 tensor
        self.views: dict = {}  # (device, layout id, dtype) -> (layout, {name: flat view}), made once per storage
        self.factors = FactorMemory()  # the rules' factors (ctx.out)
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.layout_bytes + self.factor_bytes

    @property
    def layout_bytes(self) -> int:
        return sum(t.numel() for t in self.storage.values())

    @property
    def factor_bytes(self) -> int:
        return self.factors.nbytes

    def claim(self, lay: Layout, device, budget=None, spare=None) -> "Buffers | None":
        """The plan's buffers for one run, or None (the arena is in use, or the layout is empty).

        ``spare``: bytes the run's budget leaves beside what the run needs (None: no budget); the rules'
        factors stay in the arena between calls only within it.
        """
        if not ENABLED or not lay.slots or not self.lock.acquire(blocking=False):
            return None
        device = torch.device(device)
        held = self.storage.get(device)
        if held is None or held.numel() < lay.total:
            self.storage.pop(device, None)
            self.views.clear()
            _make_room(self, lay.total, budget)
            held = self.storage[device] = torch.empty(lay.total, dtype=torch.uint8, device=device)
        _touch(self)
        return Buffers(self, held, lay, device, spare)

    def release(self) -> int:
        n = self.nbytes
        self.storage.clear()
        self.views.clear()
        self.factors.clear()
        return n


class Buffers:
    """One run's view of an arena: ``get(name, dtype)`` gives the buffer of ``name`` or None."""

    def __init__(self, arena: Arena, storage: torch.Tensor, lay: Layout, device, spare=None):
        self.arena, self.storage, self.slots = arena, storage, lay.slots
        self.layout, self.key, self.views = lay, (device, id(lay)), None
        self.spare = spare

    def factors(self, step: int, part: str):
        """``ctx.out``'s source for the rule of step ``step`` (``part``: all samples, or a chunk's slices)."""
        return partial(self.arena.factors.get, self.key[0], step, part, self.spare)

    def get(self, name, dtype) -> torch.Tensor | None:
        """The buffer ``name`` as a flat tensor of ``dtype``, or None (not in the arena)."""
        if name not in self.slots:
            return None
        if self.views is None:  # the views are made once per storage, layout and dtype (a call walks them all)
            held = self.arena.views.get(self.key + (dtype,))
            if held is None or held[0] is not self.layout:
                held = self.arena.views[self.key + (dtype,)] = (self.layout, {})
            self.views = held[1]
        hit = self.views.get(name)
        if hit is None:
            offset, nbytes = self.slots[name]
            hit = self.views[name] = self.storage[offset:offset + nbytes].view(dtype)
        return hit

    def done(self) -> None:
        self.arena.lock.release()


_HELD: "OrderedDict[int, weakref.ref]" = OrderedDict()  # id -> arena, least recently used first


def _touch(arena: Arena) -> None:
    key = id(arena)
    _HELD.pop(key, None)
    _HELD[key] = weakref.ref(arena, lambda _, key=key: _HELD.pop(key, None))
    while len(_HELD) > HELD:
        _, ref = _HELD.popitem(last=False)
        old = ref()
        if old is not None and old is not arena:
            old.release()


def _make_room(arena: Arena, need: int, budget) -> None:
    """Free the least recently used other arenas while they and ``need`` bytes would exceed ``budget``."""
    if budget is None:
        return
    for key in list(_HELD):
        others = sum(a.nbytes for a in (r() for r in _HELD.values()) if a is not None and a is not arena)
        if others + need <= budget:
            return
        old = _HELD[key]()
        if old is not None and old is not arena:
            old.release()


def held_bytes() -> int:
    """Bytes the arenas of all plans hold now."""
    return sum(a.nbytes for a in (r() for r in list(_HELD.values())) if a is not None)


def release_buffers() -> int:
    """Free the buffers cached plans keep from call to call; returns how many bytes were held.

    A plan run without autograd (``create_graph=False``, ``torch.no_grad()``) keeps its large
    blocks and temporaries in one arena, so that its next call (or the next chunk of samples)
    allocates nothing large and takes no page fault. The arena is held until the plan leaves
    the cache, until more than four plans hold one (the least recently used gives it up), or
    until this function: call it when a process that ran xa has large memory to give back and
    no more calls to make soon. The next call allocates the arena again.

    Example:
        >>> x = torch.randn(512, 3, dtype=torch.float64, requires_grad=True)
        >>> u = torch.tanh(x @ torch.ones(3, 64, dtype=torch.float64)).sum(1)
        >>> lap = xa.laplacian(u, x, batch_dim=0, create_graph=False)   # its jets in the plan's arena
        >>> xa.release_buffers() > 0, xa.release_buffers()
        (True, 0)
    """
    n = 0
    for ref in list(_HELD.values()):
        arena = ref()
        if arena is not None:
            n += arena.release()
    _HELD.clear()
    return n

"""Factors: the local derivatives of one operator as small tensor networks.

A rule describes ``y = f(x_1, ..., x_m)``. Asked for the slots
``(i_1, ..., i_j)`` it returns ``d^j y / dx_i1 ... dx_ij`` as a
:class:`Factor`:

* ``out`` labels the ``y`` port, ``ins[t]`` the port of the t-th requested
  slot. A port is a sequence of labels whose sizes multiply to the numel
  of that tensor, read in row-major order: a port may split or merge the
  tensor's dims (that is how ``view`` stays a relabelling) and may leave
  out dims of size one.
* ``operands`` are tensors with one label per dim.
* The factor's value is ``coef`` times the product of the operands, with
  every label that appears on two ports or operands tied (equal), and a
  label that appears on a port alone ranging freely (broadcast).

So an elementwise derivative is one vector whose labels are shared by the
``y`` port and every ``x`` port, a linear map such as ``mm`` is its matrix
operand with one label shared with the identity, and a permutation is no
tensor at all. A rule returns ``None`` for a derivative that is zero by
structure; the engine never builds such terms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import BatchMixingError

Labels = tuple  # a tuple of label ids


@dataclass(frozen=True)
class Factor:
    """One local derivative ``d^j y / dx_i1 ... dx_ij`` as a tensor network.

    Args:
        out: labels of the ``y`` port.
        ins: labels of each requested input slot's port, in the order the
            slots were requested.
        operands: ``(tensor, labels)`` pairs, one label per tensor dim.
        sizes: ``sizes[label]`` is the extent of each label id.
        coef: a scalar multiplying the whole network (read at execution,
            like the operands: it may come from saved values).
        workspace: entries the rule allocates for a while to build the
            operands, beyond the operands themselves (a dense derivative
            computed with nested ``jacfwd``); the memory model counts it.

    Example:
        >>> def sin_d1(ctx, slots):                         # d sin(x) / dx = cos(x): label 0 on y, x and cos(x)
        ...     cos = torch.cos(ctx.saved("self"))          # (a diagonal, never built; order 1 only)
        ...     return xa.Factor(out=(0,), ins=((0,),), sizes=ctx.out_shape, operands=((cos, (0,)),))
        >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward(torch.sin(x).sum(), order=1, configurations={"SinBackward0": sin_d1})
        >>> torch.allclose(x.xgrad[0][0], torch.cos(x.detach()))
        True
    """

    out: Labels
    ins: tuple
    sizes: tuple
    operands: tuple = ()
    coef: float = 1.0
    workspace: int = 0


@dataclass
class LabelMaker:
    """Hands out fresh label ids and records their sizes.

    Example:
        >>> lab = xa.LabelMaker()
        >>> i, j = lab.dims((3, 4))
        >>> k = lab.new(5)
        >>> (i, j, k), lab.sizes
        ((0, 1, 2), [3, 4, 5])
    """

    sizes: list = field(default_factory=list)

    def new(self, size: int) -> int:
        self.sizes.append(int(size))
        return len(self.sizes) - 1

    def dims(self, shape: Sequence[int]) -> Labels:
        return tuple(self.new(s) for s in shape)

    def factor(self, out, ins, operands=(), coef=1.0, workspace=0) -> Factor:
        return Factor(
            out=tuple(out),
            ins=tuple(tuple(p) for p in ins),
            sizes=tuple(self.sizes),
            operands=tuple((t, tuple(lbl)) for t, lbl in operands),
            coef=float(coef),
            workspace=int(workspace),
        )


class FactorMemory:
    """Memory of a plan's own for the factors its rules write through ``ctx.out`` (held by its arena, :mod:`xa.arena`).

    One flat tensor per (device, step, part, key, dtype), made at the first call that asks for it and handed to
    every later one: never shared between two factors, so factors kept across the cache tiles of a call stay
    whole. ``part`` tells a rule's view of all samples (``"whole"``) from a chunk's slices (``"sliced"``).
    """

    MIN_BYTES = 128 * 2**10  # a smaller factor comes from the allocator (glibc serves it from its heap)

    def __init__(self):
        self.held: dict = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.held.values())

    def get(self, device, step: int, part: str, spare, key, shape, dtype) -> torch.Tensor | None:
        """The factor's memory viewed as ``shape``, or None: under :attr:`MIN_BYTES`, or more than the ``spare``
        bytes the call's budget leaves beside what it needs would be held (``spare`` None: no budget)."""
        n = math.prod(shape)
        if n * dtype.itemsize < self.MIN_BYTES:
            return None
        name = (device, step, part, key, dtype)
        held = self.held.get(name)
        if held is None or held.numel() < n:
            grow = n * dtype.itemsize - (0 if held is None else held.numel() * held.element_size())
            if spare is not None and self.nbytes + grow > spare:
                return None
            held = self.held[name] = torch.empty(n, dtype=dtype, device=device)
        return held[:n].view(shape)

    def clear(self) -> None:
        self.held.clear()


def broadcast_shapes(*shapes) -> tuple:
    """The shape torch broadcasts ``shapes`` to (``torch.broadcast_shapes`` imports sympy on first use)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for d, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1:
                out[d] = size
    return tuple(out)


def broadcast_port(lab: LabelMaker, out_labels: Labels, out_shape, in_shape) -> Labels:
    """Labels of an input that torch broadcast to ``out_shape``.

    Dims are aligned from the right; a dim the input shares with the output
    shares its label, a dim of size one that was stretched gets a fresh
    label of size one.

    Example:
        >>> import xa.extend as xe
        >>> lab = xe.LabelMaker()
        >>> y = lab.dims((2, 3))                            # the output's labels: (0, 1)
        >>> xe.broadcast_port(lab, y, (2, 3), (3,)), xe.broadcast_port(lab, y, (2, 3), (1, 3)), lab.sizes
        ((1,), (2, 1), [2, 3, 1])
    """
    out_shape = tuple(out_shape)
    in_shape = tuple(in_shape)
    offset = len(out_shape) - len(in_shape)
    labels = []
    for d, size in enumerate(in_shape):
        if size == out_shape[offset + d]:
            labels.append(out_labels[offset + d])
        else:
            labels.append(lab.new(size))
    return tuple(labels)


def reshape_ports(lab: LabelMaker, in_shape, out_shape) -> tuple:
    """Port labels for ``x.view(out_shape)``: the same labels on both sides.

    Dims of size one are left out; the remaining dims are cut into the
    shortest runs whose products agree on both sides. A run that is a single
    dim on one side is labelled by the other side's dims (a split or merge);
    a run with several dims on both sides gets one label for the whole run.

    Example:
        >>> import xa.extend as xe
        >>> lab = xe.LabelMaker()
        >>> xe.reshape_ports(lab, (2, 3, 4), (6, 1, 4)), lab.sizes         # 6 is split as 2 x 3, 1 left out
        (((0, 1, 2), (0, 1, 2)), [2, 3, 4])
        >>> lab = xe.LabelMaker()
        >>> xe.reshape_ports(lab, (2, 3), (3, 2)), lab.sizes                # no common cut: one label of 6
        (((0,), (0,)), [6])
    """
    a = [s for s in in_shape if s != 1]
    b = [s for s in out_shape if s != 1]
    xs, ys = [], []
    i = j = 0
    while i < len(a) or j < len(b):
        ra, rb = [a[i]], [b[j]]
        i, j = i + 1, j + 1
        pa, pb = ra[0], rb[0]
        while pa != pb:
            if pa < pb:
                ra.append(a[i])
                pa *= a[i]
                i += 1
            else:
                rb.append(b[j])
                pb *= b[j]
                j += 1
        if len(ra) == 1 or len(rb) == 1:
            labels = lab.dims(ra if len(ra) >= len(rb) else rb)
        else:
            labels = (lab.new(pa),)
        xs.extend(labels)
        ys.extend(labels)
    return tuple(xs), tuple(ys)


def port_numel(factor: Factor, port: Labels) -> int:
    return math.prod(factor.sizes[label] for label in port)


def planned(ctx, shape, build):
    """``build()``, or while planning a ``meta`` tensor of ``shape``: a costly operand is made only to run.

    Example:
        >>> import xa.extend as xe
        >>> devices = []
        >>> def sin_k(ctx, k):                              # d^k sin(x) = sin(x + k pi / 2)
        ...     value = xe.planned(ctx, ctx.out_shape, lambda: torch.sin(ctx.saved("self") + k * torch.pi / 2))
        ...     devices.append(value.device.type)
        ...     return value
        >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> sup = xa.backward(torch.sin(x).sum(), order=1, configurations={"SinBackward0": xe.elementwise(sin_k)})
        >>> devices[0], devices[-1], torch.allclose(x.xgrad[0][0], torch.cos(x.detach()))   # planned, then run
        ('meta', 'cpu', True)
    """
    if ctx.planning:
        return torch.empty(shape, dtype=ctx.dtype, device="meta")
    return build()


def signed(value):
    """A saved int64 that torch hands back as unsigned (``-1`` as ``2**64 - 1``); ``None`` stays ``None``."""
    return value - 2**64 if value is not None and value >= 2**63 else value


def normalize_dim(dim: int, ndim: int) -> int:
    """Wrap ``dim`` into ``range(ndim)``; torch stores negative dims as unsigned."""
    return signed(dim) % max(ndim, 1)


# ---------------------------------------------------------------- relabelling a factor's ports


def port_labels(factor: Factor, port: tuple) -> tuple:
    return factor.out if port[0] == "out" else factor.ins[port[1]]


def split_at(factor: Factor, port: tuple, boundary: int, where: str) -> Factor:
    """Split the label of ``port`` that straddles ``boundary`` (a prefix product of the port's sizes).

    ``port`` is ``("out",)`` or ``("ins", slot)``. Where the boundary cuts no label whole
    (a sample dim that does not line up with the node's dims), :class:`BatchMixingError` names ``where``.
    """
    acc = 1
    for label in port_labels(factor, port):
        n = factor.sizes[label]
        if acc < boundary < acc * n:
            first = boundary // acc
            if boundary % acc or n % first:
                raise BatchMixingError(f"{where}: the sample dim does not line up with the dims of this node")
            return split_label(factor, label, (first, n // first))
        acc *= n
    return factor


def split_label(factor: Factor, label: int, pieces: tuple) -> Factor:
    """Replace ``label`` everywhere by new labels of sizes ``pieces`` (row-major): a reshape."""
    sizes = list(factor.sizes)
    new = tuple(range(len(sizes), len(sizes) + len(pieces)))
    sizes.extend(pieces)

    def sub(labels):
        out = []
        for lb in labels:
            out.extend(new if lb == label else (lb,))
        return tuple(out)

    return relabel(factor, sub, sizes)


def relabel(factor: Factor, sub, sizes: list) -> Factor:
    """``factor`` with every port and operand's labels rewritten by ``sub``: each operand reshaped to match."""
    operands = []
    for tensor, labels in factor.operands:
        labels2 = sub(labels)
        operands.append((tensor.reshape([sizes[i] for i in labels2]), labels2))
    return dataclasses.replace(factor, out=sub(factor.out), ins=tuple(sub(p) for p in factor.ins), sizes=tuple(sizes),
                   operands=tuple(operands))


def join(factor: Factor, run: tuple, where: str) -> Factor:
    """Replace the labels ``run`` by one new label wherever they appear, always together and in this order
    (the samples of a per-sample plan laid out over several dims, :mod:`xa.batch`)."""
    sizes = list(factor.sizes)
    new = len(sizes)
    sizes.append(math.prod(factor.sizes[i] for i in run))

    def sub(labels):
        out, i = [], 0
        while i < len(labels):
            if labels[i] in run:
                if tuple(labels[i:i + len(run)]) != run:
                    raise BatchMixingError(
                        f"{where}: the samples are laid out over several dims that this node does not keep "
                        "together; per-sample derivatives need them kept together, in order"
                    )
                out.append(new)
                i += len(run)
            else:
                out.append(labels[i])
                i += 1
        return tuple(out)

    return relabel(factor, sub, sizes)

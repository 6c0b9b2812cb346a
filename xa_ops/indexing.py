"""Indexing, joining and splitting: select, slice, index_select, gather, advanced indexing, cat, stack,
repeat, pad, flip, roll, embedding, take, masked_select, split, chunk, unbind.

Each of these is linear in each input, ``y = A_t x_t``: the first derivative
in slot ``t`` is ``A_t`` and every order >= 2 (mixed ones included) is zero.
``A_t`` is a relabelling where it can be -- ``repeat`` reads
``y[.., a n + b, ..] = x[.., b, ..]``, so the ``y`` port splits that dim
into ``(a, b)`` and ``a`` broadcasts -- and otherwise a 0/1 selection
tensor along the one dim the operator touches, every other dim's label
shared by the ``y`` and ``x`` ports (``l`` labels the ``x`` dim):

* ``select(dim, i)``:          ``e[l] = [l == i]``, ``y`` has no dim there;
* ``slice(dim, s, _, k)``:     ``S[i, l] = [l == s + i k]`` (``narrow``: ``k = 1``);
* ``index_select(dim, j)``:    ``S[i, l] = [l == j_i]``;
* ``gather(dim, j)``:          ``G[y.., l] = [l == j[y..]]``, and ``S[i, l] = [i == l]``
  on a dim where ``j`` is shorter than ``x``;
* ``x[j_1, .., j_m]``:         ``O_r[b.., l_r] = [l_r == j_r[b..] mod n_r]`` for each
  indexed dim ``r``, ``b`` the broadcast index dims of ``y``, tied across the ``O_r``;
* ``cat(dim)``, slot ``t``:     ``E[i, l] = [i == o_t + l]``, ``o_t`` the sizes before ``x_t``;
* ``stack(dim)``, slot ``t``:   ``e[s] = [s == t]`` on the new dim;
* ``pad`` (constant):          ``P[i, l] = [i == l + p]`` per padded dim, ``p`` its left pad
  (a negative pad crops);
* ``embedding(j)``:            ``O[b.., v] = [v == j[b..]] [v != padding_idx]`` on the weight's rows;
* ``flip(dims)``:              ``R[i, l] = [l == n - 1 - i]`` per flipped dim;
* ``roll(shifts, dims)``:      ``R[i, l] = [l == (i - s) mod n]`` per rolled dim (the flattened tensor
  when no dims are given);
* ``take(j)``:                 ``O[b.., l] = [l == j[b..] mod N]`` on the flattened ``x``;
* ``masked_select(m)``:        ``O[k, l..] = [l.. is the k-th true entry of m]``, ``x`` broadcast to ``m``;
* ``split``, ``chunk``:         output ``o`` is the slice ``[start_o, start_o + len_o)`` along ``dim``;
* ``unbind(dim)``:             output ``o`` is ``e[l] = [l == o]``.

An operator with several outputs (split, unbind) gives one value per
output the graph reads; its rule reads ``ctx.output``.

The selection tensors are built with ``torch.arange`` on ``ctx.device``
from saved ints and index tensors, so the same code runs on the stand-ins
of planning; nothing branches on an index's values.
"""

import math

import torch

from xa.errors import UnsupportedOperatorError
from xa.factor import broadcast_port, broadcast_shapes, normalize_dim, signed
from xa.families import linear, linear_map
from xa.registry import register


def _one_hot(index, size: int, ctx):
    """``[index[..] == l]`` as ``ctx.dtype``, shaped ``(*index.shape, size)``; ``index`` a tensor or an int."""
    index = torch.as_tensor(index, device=ctx.device)
    return (index.unsqueeze(-1) == torch.arange(size, device=ctx.device)).to(ctx.dtype)


# ---------------------------------------------------------------- one entry or a strided range along a dim


def _select(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    d = normalize_dim(ctx.saved("dim"), len(shape))
    x = lab.dims(shape)
    e = _one_hot(signed(ctx.saved("index")) % shape[d], shape[d], ctx)
    return x[:d] + x[d + 1:], x, [(e, (x[d],))]


def _strided(ctx, lab, d, start, step):
    """``y = x[.., start::step, ..]`` along ``d``, as long as ``y`` is."""
    shape = ctx.in_shapes[0]
    x = lab.dims(shape)
    y = x[:d] + (lab.new(ctx.out_shape[d]),) + x[d + 1:]
    picked = start + step * torch.arange(ctx.out_shape[d], device=ctx.device)
    return y, x, [(_one_hot(picked, shape[d], ctx), (y[d], x[d]))]


def _slice(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    d = normalize_dim(ctx.saved("dim"), len(shape))
    step = ctx.saved("step")
    # start is saved as written (negative, past the end): wrap and clamp it like Python's slice.
    start = slice(signed(ctx.saved("start")), None, step).indices(shape[d])[0]
    return _strided(ctx, lab, d, start, step)


def _narrow_copy(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    d = normalize_dim(ctx.saved("dim"), len(shape))
    return _strided(ctx, lab, d, signed(ctx.saved("start")) % max(shape[d], 1), 1)


register("SelectBackward0", linear_map(_select))
register("SliceBackward0", linear_map(_slice))
register("NarrowCopyBackward0", linear_map(_narrow_copy))

# ---------------------------------------------------------------- entries picked by an index tensor


def _index_select(ctx, lab, slot):
    shape = ctx.in_shapes[0] or (1,)  # a 0-d input is read as one entry (a port of size one)
    out_shape = ctx.out_shape or (1,)
    d = normalize_dim(ctx.saved("dim"), len(shape))
    x = lab.dims(shape)
    y = x[:d] + (lab.new(out_shape[d]),) + x[d + 1:]
    s = _one_hot(ctx.saved("index").reshape(-1), shape[d], ctx)  # a 0-d index keeps a dim of size one
    return y, x, [(s, (y[d], x[d]))]


def _gather(ctx, lab, slot):
    shape = ctx.in_shapes[0] or (1,)  # a 0-d input (and index) is read as one entry
    out_shape = ctx.out_shape or (1,)
    d = normalize_dim(ctx.saved("dim"), len(shape))
    y = lab.dims(out_shape)
    x, operands = [], []
    for k, (n, m) in enumerate(zip(shape, out_shape)):
        if k == d:
            x.append(lab.new(n))
        elif n == m:
            x.append(y[k])
        else:  # the index is shorter than x here: y reads x's first m entries
            x.append(lab.new(n))
            operands.append((_one_hot(torch.arange(m, device=ctx.device), n, ctx), (y[k], x[k])))
    operands.append((_one_hot(ctx.saved("index").reshape(out_shape), shape[d], ctx), y + (x[d],)))
    return y, tuple(x), operands


def _by_indices(ctx, lab, slot):
    """sort, topk along a dim: the input read at torch's saved ``indices`` along ``dim``."""
    shape = tuple(ctx.in_shapes[0]) or (1,)  # a 0-d input is one entry
    index = ctx.saved("indices")
    if not ctx.in_shapes[0]:
        index = index.reshape(1)
    d = normalize_dim(ctx.saved("dim"), len(shape))
    x = lab.dims(shape)
    if index.dim() == len(shape):  # sort, topk, keepdim: the output keeps the dim, its own length
        y = tuple(x[k] if k != d else lab.new(index.shape[d]) for k in range(len(shape)))
    else:
        y = tuple(x[k] for k in range(len(shape)) if k != d)
    return y, x, [(_one_hot(index, shape[d], ctx), y + (x[d],))]


def _index(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    # One index (or None, a full slice) per dim of x; a boolean mask stands for the k dims it covers.
    per_dim = []
    for entry in ctx.saved("indices"):
        if entry is None or entry.dtype not in (torch.bool, torch.uint8):
            per_dim.append(entry)
        elif ctx.planning:  # its nonzero count is in y's shape, which is all planning needs
            per_dim.extend([torch.zeros((), dtype=torch.long)] * entry.dim())
        else:
            per_dim.extend(entry.nonzero().unbind(1))
    per_dim += [None] * (len(shape) - len(per_dim))
    indexed = [k for k, j in enumerate(per_dim) if j is not None]
    # torch puts the broadcast index dims where the indexed dims were if those are adjacent, else first.
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    at = indexed[0] if adjacent else 0
    nb = len(ctx.out_shape) - (len(shape) - len(indexed))
    y = lab.dims(ctx.out_shape)
    b, rest = y[at:at + nb], iter(y[:at] + y[at + nb:])
    x, operands = [], []
    for k, j in enumerate(per_dim):
        if j is None:
            x.append(next(rest))
            continue
        x.append(lab.new(shape[k]))
        j = (j.to(ctx.device) % shape[k]).expand(ctx.out_shape[at:at + nb])  # negative indices wrap
        operands.append((_one_hot(j, shape[k], ctx), b + (x[k],)))
    return y, tuple(x), operands


register("IndexSelectBackward0", linear_map(_index_select))
register("GatherBackward0", linear_map(_gather))
register("IndexBackward0", linear_map(_index))

# ---------------------------------------------------------------- joining and repeating


def _cat(ctx, lab, slot):
    d = normalize_dim(ctx.saved("dim"), len(ctx.out_shape))
    total = ctx.out_shape[d]
    sizes = [None if s is None else s[d] for s in ctx.in_shapes]
    # torch saves no sizes: an input that does not require grad is known only through the total.
    before, after = sizes[:slot], sizes[slot + 1:]
    if None not in before:
        offset = sum(before)
    elif None not in after:
        offset = total - sizes[slot] - sum(after)
    else:
        raise UnsupportedOperatorError(
            f"CatBackward0: input {slot} sits between inputs that do not require grad, and torch does not save "
            "their sizes, so its offset in the output is unknown; nest the cat so that constants are on one side "
            "only, e.g. cat([c0, cat([x, c1])])"
        )
    y = lab.dims(ctx.out_shape)
    x = y[:d] + (lab.new(sizes[slot]),) + y[d + 1:]
    embed = _one_hot(offset + torch.arange(sizes[slot], device=ctx.device), total, ctx)
    return y, x, [(embed, (x[d], y[d]))]


def _stack(ctx, lab, slot):
    d = normalize_dim(ctx.saved("dim"), len(ctx.out_shape))
    y = lab.dims(ctx.out_shape)
    e = _one_hot(slot, ctx.out_shape[d], ctx)
    return y, y[:d] + y[d + 1:], [(e, (y[d],))]


def _repeat(ctx, lab):
    repeats = ctx.saved("repeats")
    shape = ctx.in_shapes[0]
    shape = (1,) * (len(repeats) - len(shape)) + tuple(shape)  # repeat may add leading dims
    y, x = [], []
    for r, n in zip(repeats, shape):
        copy, entry = lab.new(r), lab.new(n)
        y += [copy, entry]  # row-major: y's index along this dim is copy * n + entry
        x.append(entry)
    return tuple(y), tuple(x)


register("CatBackward0", linear_map(_cat))
register("StackBackward0", linear_map(_stack))
register("RepeatBackward0", linear(_repeat))

# ---------------------------------------------------------------- padding, flipping, rolling


def _constant_pad(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    pad = [signed(p) for p in ctx.saved("pad")]
    x = list(lab.dims(shape))
    y, operands = list(x), []
    for k in range(len(pad) // 2):  # pad[2k], pad[2k + 1]: the left and right pads of dim -1 - k
        d = len(shape) - 1 - k
        if pad[2 * k] == 0 and pad[2 * k + 1] == 0:
            continue
        y[d] = lab.new(ctx.out_shape[d])
        source = torch.arange(ctx.out_shape[d], device=ctx.device) - pad[2 * k]  # out of range: a padded entry
        operands.append((_one_hot(source, shape[d], ctx), (y[d], x[d])))
    return tuple(y), tuple(x), operands


def _flip(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    x = list(lab.dims(shape))
    y, operands = list(x), []
    for d in sorted({normalize_dim(d, len(shape)) for d in ctx.saved("dims")}):
        y[d] = lab.new(shape[d])
        source = shape[d] - 1 - torch.arange(shape[d], device=ctx.device)
        operands.append((_one_hot(source, shape[d], ctx), (y[d], x[d])))
    return tuple(y), tuple(x), operands


def _roll(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    shifts = [signed(s) for s in ctx.saved("shifts")]
    dims = ctx.saved("dims")
    if not dims:  # roll the flattened tensor: one label on each port
        sizes = [math.prod(shape)]
        x = [lab.new(sizes[0])]
        total = {0: sum(shifts)}
    else:
        sizes = list(shape)
        x = list(lab.dims(shape))
        total = {}
        for s, d in zip(shifts, dims):  # a dim named twice is rolled twice
            d = normalize_dim(d, len(shape))
            total[d] = total.get(d, 0) + s
    y, operands = list(x), []
    for d, s in sorted(total.items()):
        n = sizes[d]
        y[d] = lab.new(n)
        source = (torch.arange(n, device=ctx.device) - s) % max(n, 1)
        operands.append((_one_hot(source, n, ctx), (y[d], x[d])))
    return tuple(y), tuple(x), operands


register("ConstantPadNdBackward0", linear_map(_constant_pad))
register("FlipBackward0", linear_map(_flip))
register("RollBackward0", linear_map(_roll))

# ---------------------------------------------------------------- lookups: embedding, take, masked_select


def _embedding(ctx, lab, slot):
    if ctx.saved("scale_grad_by_freq"):
        raise UnsupportedOperatorError(
            "EmbeddingBackward0 with scale_grad_by_freq=True: torch scales the gradient by each index's count "
            "in the batch, which is not a derivative of the forward pass; use scale_grad_by_freq=False"
        )
    rows, width = ctx.in_shapes[0]
    y = lab.dims(ctx.out_shape)
    v = lab.new(rows)
    lookup = _one_hot(ctx.saved("indices"), rows, ctx)
    padding_idx = signed(ctx.saved("padding_idx"))
    if padding_idx >= 0:  # torch gives the padding row no gradient
        lookup = lookup * (torch.arange(rows, device=ctx.device) != padding_idx).to(ctx.dtype)
    return y, (v, y[-1]), [(lookup, y[:-1] + (v,))]


def _take(ctx, lab, slot):
    n = math.prod(ctx.in_shapes[0])
    y = lab.dims(ctx.out_shape)
    flat = lab.new(n)
    index = ctx.saved("index").to(ctx.device) % max(n, 1)  # negative indices wrap
    return y, (flat,), [(_one_hot(index, n, ctx), y + (flat,))]


def _masked_select(ctx, lab, slot):
    shape = ctx.in_shapes[0]
    mask = ctx.saved("mask")
    joint = broadcast_shapes(tuple(shape), tuple(mask.shape))
    (k,) = lab.dims(ctx.out_shape)
    m = lab.dims(joint)
    x = broadcast_port(lab, m, joint, shape)  # a dim x was broadcast along is summed over in the operand
    if ctx.planning:  # the number of true entries is in y's shape, which is all planning needs
        picked = torch.empty((ctx.out_shape[0], *joint), dtype=ctx.dtype, device="meta")
    else:
        where = mask.expand(joint).reshape(-1).nonzero().squeeze(1).to(ctx.device)
        picked = _one_hot(where, math.prod(joint), ctx).reshape(ctx.out_shape[0], *joint)
    return (k,), x, [(picked, (k, *m))]


register("EmbeddingBackward0", linear_map(_embedding))
register("TakeBackward0", linear_map(_take))
register("MaskedSelectBackward0", linear_map(_masked_select))

# ---------------------------------------------------------------- several outputs: split, chunk, unbind


def _dim(ctx):
    return normalize_dim(ctx.saved("dim"), len(ctx.in_shapes[0]))


def _split(ctx, lab, slot):
    return _strided(ctx, lab, _dim(ctx), ctx.output * ctx.saved("split_size"), 1)


def _split_with_sizes(ctx, lab, slot):
    return _strided(ctx, lab, _dim(ctx), sum(ctx.saved("split_sizes")[: ctx.output]), 1)


def _unbind(ctx, lab, slot):
    shape, d = ctx.in_shapes[0], _dim(ctx)
    x = lab.dims(shape)
    return x[:d] + x[d + 1:], x, [(_one_hot(ctx.output, shape[d], ctx), (x[d],))]


register("SplitBackward0", linear_map(_split, multi_output=True))
register("UnsafeSplitBackward0", linear_map(_split, multi_output=True))
register("SplitWithSizesBackward0", linear_map(_split_with_sizes, multi_output=True))
register("UnbindBackward0", linear_map(_unbind, multi_output=True))

# ---------------------------------------------------------------- values picked by a sort along a dim

for _name in ("SortBackward0", "TopkBackward0"):
    register(_name, linear_map(_by_indices))


def _max_unpool(spatial: int):
    """max_unpool: each input entry written at torch's saved index within its plane of the output."""

    def build(ctx, lab, slot):
        shape, out = tuple(ctx.in_shapes[0]), tuple(ctx.out_shape)
        lead = shape[: len(shape) - spatial]
        inside, outside = math.prod(shape[len(shape) - spatial:]), math.prod(out[len(out) - spatial:])
        lead_labels = lab.dims(lead)
        k, j = lab.new(inside), lab.new(outside)
        index = ctx.saved("indices").reshape(*lead, inside)
        return lead_labels + (j,), lead_labels + (k,), [(_one_hot(index, outside, ctx), lead_labels + (k, j))]

    return build


register("MaxUnpool2DBackward0", linear_map(_max_unpool(2)))
register("MaxUnpool3DBackward0", linear_map(_max_unpool(3)))

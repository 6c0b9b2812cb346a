"""Samples of the indexing and joining rules, each in every spelling users write.

These operators are linear, so each is composed with a nonlinear one (tanh,
sigmoid, a product) to make the higher orders non-trivial. Entries are
``(id, function of the inputs, input shapes, order)`` as in ``samples_core``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import xa_ops.indexing  # noqa: F401  (registers the rules until xa_ops imports the module itself)

torch.manual_seed(0)
C23 = torch.randn(2, 3, dtype=torch.float64)  # a constant input: does not require grad
C3 = torch.randn(3, dtype=torch.float64)
IDX = torch.tensor([2, 0, 2])  # repeats an entry: its derivative adds up
NEG = torch.tensor([-1, 0, -3])
ROWS = torch.tensor([[1], [0]])  # broadcasts against IDX to (2, 3)
GATHER = torch.tensor([[0, 3], [2, 2], [1, 0]])  # for x of shape (3, 4), dim 1
GATHER_SHORT = torch.tensor([[2, 0, 1], [1, 1, 0]])  # for x of shape (3, 4), dim 0: shorter on dim 1 too
FLAT = torch.tensor([5, 0, 11, 5])
MASK = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, False, True]])
MASK4 = torch.tensor([True, False, True, True])
TOKENS = torch.tensor([[1, 4, 1], [0, 3, 4]])  # rows of a (5, 3) weight, row 1 and 4 twice
EMBED = nn.Embedding(5, 3)
EMBED_PAD = nn.Embedding(5, 3, padding_idx=-1)  # stored as row 4: gets no gradient
TAKE = torch.tensor([[5, -1], [0, 5]])
MASK_ROW = torch.tensor([[True], [False], [True]])  # broadcasts against x of shape (3, 4)
# torch 2.11 records no derivative for narrow_copy (test_api checks xa refuses it there)
NARROW_COPY_RECORDED = torch.narrow_copy(torch.zeros(2, requires_grad=True), 0, 0, 1).grad_fn.name() != (
    "torch::autograd::NotImplemented")

_, UNPOOL2 = F.max_pool2d(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
                         2, return_indices=True)
_, UNPOOL3 = F.max_pool3d(torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(6),
                                      dtype=torch.float64), 2, return_indices=True)

CASES = [
    # -- cat: CatBackward0
    ("torch.cat", lambda a, b: torch.cat([a, b]).tanh(), [(2, 3), (3, 3)], 4),
    ("torch.cat dim=-1 three", lambda a, b, c: torch.cat((a, b, c), dim=-1).sigmoid(), [(2, 1), (2, 3), (2, 2)], 3),
    ("torch.cat fan-out", lambda x: torch.cat([x, x.tanh(), x], 1) * torch.cat([x, x, x * x], 1), [(2, 2)], 4),
    ("torch.cat constant first", lambda x: torch.cat([C23, x]).tanh(), [(1, 3)], 3),
    ("torch.cat constant last", lambda a, b: torch.cat([a, b, C23], 0).tanh(), [(1, 3), (2, 3)], 3),
    ("torch.cat 1d scalar source", lambda a, b: (torch.cat([a, b]) ** 2).sum().tanh(), [(2,), (3,)], 4),
    ("torch.concat", lambda a, b: torch.concat([a, b], 1).tanh(), [(2, 2), (2, 3)], 3),
    ("torch.concatenate", lambda a, b: torch.concatenate([a, b], axis=0).sigmoid(), [(2,), (3,)], 3),
    ("torch.hstack", lambda a, b: torch.hstack([a, b]).tanh(), [(2, 1), (2, 2)], 3),
    ("torch.vstack", lambda a, b: torch.vstack((a, b)).tanh(), [(3,), (3,)], 3),
    ("torch.dstack", lambda a, b: torch.dstack([a, b]).tanh(), [(2, 2), (2, 2)], 3),
    ("torch.column_stack", lambda a, b: torch.column_stack([a, b]).tanh(), [(3,), (3, 2)], 3),
    # -- stack: StackBackward0
    ("torch.stack", lambda a, b: torch.stack([a, b]).tanh(), [(3,), (3,)], 4),
    ("torch.stack dim=-1 fan-out", lambda a, b: torch.stack((a, b, a * b), dim=-1).sigmoid(), [(2, 3), (2, 3)], 3),
    ("torch.stack dim=1", lambda a, b: torch.stack([a, b], 1).tanh() * a.sum(), [(2, 2), (2, 2)], 3),
    ("torch.stack constant", lambda x: torch.stack([C3, x, x]).tanh(), [(3,)], 3),
    ("torch.stack scalars", lambda x: torch.stack([x[0] * x[1], x[1]]).tanh(), [(2,)], 4),
    # -- select and integer indexing: SelectBackward0
    ("x[1]", lambda x: x[1].tanh() * x[0], [(3, 4)], 4),
    ("x[:, -1]", lambda x: x[:, -1].sigmoid(), [(3, 4)], 3),
    ("x[..., 1]", lambda x: x[..., 1].tanh() * x[..., 0], [(2, 2, 3)], 3),
    ("x[1, 2] scalar", lambda x: x[1, 2].sin() * x, [(2, 3)], 4),
    ("x[0][-1]", lambda x: x[0][-1].tanh() * x[1].sum(), [(2, 3)], 3),
    ("x[tensor(1)]", lambda x: x[torch.tensor(1)].tanh(), [(3, 2)], 3),
    ("Tensor.select", lambda x: x.select(1, 2).tanh(), [(2, 3)], 3),
    ("torch.select neg", lambda x: torch.select(x, -1, -2).tanh(), [(2, 3)], 3),
    # -- slicing and narrow: SliceBackward0, NarrowCopyBackward0
    ("x[1:5:2]", lambda x: x[1:5:2].tanh(), [(6, 2)], 4),
    ("x[..., ::2] * x[..., 1::2]", lambda x: (x[..., ::2] * x[..., 1::2]).sigmoid(), [(2, 6)], 3),
    ("x[::3] uneven", lambda x: x[::3].tanh(), [(5,)], 3),
    ("x[-3:]", lambda x: x[-3:].tanh(), [(4, 2)], 3),
    ("x[:, -4:-1]", lambda x: x[:, -4:-1].tanh() * x[:, 1:], [(2, 4)], 3),
    ("x[1:9] past end", lambda x: x[1:9].tanh(), [(4,)], 3),
    ("x[:, None, 1:3]", lambda x: x[:, None, 1:3].tanh(), [(2, 4)], 3),
    ("x[:2, 1:]", lambda x: x[:2, 1:].tanh(), [(3, 3)], 3),
    ("Tensor.narrow", lambda x: x.narrow(1, 1, 2).tanh(), [(2, 4)], 4),
    ("torch.narrow neg dim", lambda x: torch.narrow(x, -1, 0, 2).sigmoid(), [(2, 3)], 3),
    *([
        ("torch.narrow_copy", lambda x: torch.narrow_copy(x, 0, 1, 2).tanh(), [(4, 2)], 4),
        ("Tensor.narrow_copy", lambda x: x.narrow_copy(-1, 2, 2).tanh() * x[:, :2], [(2, 4)], 3),
    ] if NARROW_COPY_RECORDED else []),
    # -- index_select: IndexSelectBackward0
    ("torch.index_select", lambda x: torch.index_select(x, 0, IDX).tanh(), [(4, 3)], 4),
    ("Tensor.index_select dim=-1", lambda x: x.index_select(-1, IDX).sigmoid() * x[:, :3], [(2, 4)], 3),
    # order 1 only: torch.func's forward mode (the reference's higher orders) rejects a 0-d index here
    ("index_select 0-d index", lambda x: x.index_select(1, torch.tensor(1)).tanh(), [(2, 3)], 1),
    # -- gather: GatherBackward0
    ("torch.gather", lambda x: torch.gather(x, 1, GATHER).tanh(), [(3, 4)], 4),
    ("Tensor.gather shorter index", lambda x: x.gather(0, GATHER_SHORT).sigmoid() * x[:2, :3], [(3, 4)], 3),
    ("torch.take_along_dim", lambda x: torch.take_along_dim(x, GATHER, dim=-1).tanh(), [(3, 4)], 3),
    ("take_along_dim flat", lambda x: torch.take_along_dim(x, FLAT).tanh(), [(3, 4)], 3),
    # -- repeat: RepeatBackward0
    ("Tensor.repeat", lambda x: x.repeat(2, 3).tanh(), [(2, 2)], 4),
    ("repeat new dims", lambda x: x.repeat(2, 1, 3).sigmoid().sum(0) * x.repeat(1, 3), [(2, 3)], 3),
    ("Tensor.tile", lambda x: x.tile(2).tanh(), [(2, 3)], 3),
    ("torch.tile", lambda x: torch.tile(x, (3, 1)).tanh(), [(3,)], 3),
    # -- contiguous: CloneBackward0 when it copies, no node when x is already contiguous
    ("contiguous copy", lambda x: x.t().contiguous().tanh() * x.t(), [(2, 3)], 4),
    ("contiguous no-op", lambda x: x.contiguous().tanh(), [(2, 3)], 3),
    # -- advanced indexing: IndexBackward0
    ("x[idx]", lambda x: x[IDX].tanh(), [(4, 3)], 4),
    ("x[:, idx]", lambda x: x[:, IDX].tanh() * x[:, :3], [(2, 4)], 3),
    ("x[[0, 2]] list", lambda x: x[[0, 2]].sigmoid(), [(3, 2)], 3),
    ("x[idx, 1] mixed", lambda x: x[IDX, 1].tanh(), [(4, 3, 2)], 3),
    ("x[rows, idx] broadcast", lambda x: x[ROWS, IDX].tanh(), [(2, 4, 2)], 3),
    ("x[idx, :, idx] apart", lambda x: x[IDX, :, IDX].tanh(), [(3, 2, 4)], 3),
    ("x[:, idx, idx] adjacent", lambda x: x[:, IDX, IDX].tanh(), [(2, 3, 3)], 3),
    ("x[..., neg]", lambda x: x[..., NEG].tanh(), [(2, 3)], 3),
    ("x[None, idx]", lambda x: x[None, IDX].tanh(), [(3, 2)], 3),
    ("x[mask]", lambda x: x[MASK].tanh(), [(3, 4)], 4),
    ("x[:, mask]", lambda x: x[:, MASK4].sigmoid() * x[:, :3], [(2, 4, 2)], 3),
    ("x[mask, idx]", lambda x: x[MASK4, IDX].tanh(), [(4, 3)], 3),
    # -- constant padding: ConstantPadNdBackward0
    ("F.pad", lambda x: F.pad(x, (1, 2)).tanh(), [(2, 3)], 4),
    ("F.pad two dims value", lambda x: F.pad(x, (0, 1, 2, 1), value=0.5).sigmoid() * 2, [(2, 3)], 3),
    ("F.pad negative crops", lambda x: F.pad(x, (-1, 1, 1, -1)).tanh() * x, [(3, 3)], 3),
    ("F.pad mode=constant 3d", lambda x: F.pad(x, (1, 0, 0, 0, 0, 1), mode="constant").tanh(), [(1, 2, 2)], 3),
    ("nn.ConstantPad1d", lambda x: nn.ConstantPad1d((2, 0), 1.5)(x).tanh(), [(2, 3)], 3),
    ("nn.ZeroPad2d", lambda x: (nn.ZeroPad2d(1)(x) ** 2).sum().tanh(), [(2, 2)], 4),
    ("torch.constant_pad_nd", lambda x: torch.constant_pad_nd(x, [0, 0, 1, 1]).tanh(), [(2, 2)], 3),
    # -- embedding: EmbeddingBackward0 (the weight is the input)
    ("F.embedding", lambda w: F.embedding(TOKENS, w).tanh(), [(5, 3)], 4),
    # torch.func's forward mode ignores padding_idx, so its higher orders lose symmetry once the padding row
    # also reaches y another way (or through a non-elementwise op after the lookup): keep those samples clear of it
    ("F.embedding padding_idx", lambda w: F.embedding(TOKENS, w.tanh(), padding_idx=1).sigmoid(), [(5, 3)], 4),
    ("nn.Embedding", lambda w: functional_call(EMBED, {"weight": w}, (TOKENS[0],)).tanh(), [(5, 3)], 3),
    ("nn.Embedding padding_idx=-1", lambda w: functional_call(EMBED_PAD, {"weight": w}, (TOKENS,)).tanh(), [(5, 3)], 3),
    ("torch.embedding 0-d", lambda w: (torch.embedding(w * w, torch.tensor(2)) * w).tanh(), [(5, 3)], 3),
    # -- flip: FlipBackward0
    ("torch.flip", lambda x: torch.flip(x, [0, -1]).tanh() * x, [(2, 3)], 4),
    ("Tensor.flip", lambda x: x.flip(1).sigmoid(), [(2, 3, 2)], 3),
    ("torch.fliplr", lambda x: torch.fliplr(x).tanh() * x, [(2, 3)], 3),
    ("torch.flipud", lambda x: torch.flipud(x * x).tanh(), [(3, 2)], 3),
    # -- roll: RollBackward0
    ("torch.roll", lambda x: torch.roll(x, (1, -2), (0, 1)).tanh() * x, [(3, 4)], 4),
    ("Tensor.roll", lambda x: x.roll(5, -1).sigmoid(), [(2, 3)], 3),
    ("torch.roll flattened", lambda x: torch.roll(x, 4).tanh() * x, [(2, 3)], 3),
    ("torch.roll same dim twice", lambda x: torch.roll(x, (1, 1), (0, 0)).tanh(), [(3, 2)], 3),
    # -- take and masked_select: TakeBackward0, MaskedSelectBackward0
    ("torch.take", lambda x: torch.take(x, TAKE).tanh(), [(3, 4)], 4),
    ("Tensor.take", lambda x: x.take(FLAT).sigmoid() * x[0], [(3, 4)], 3),
    ("torch.masked_select", lambda x: torch.masked_select(x, MASK).tanh(), [(3, 4)], 4),
    ("Tensor.masked_select broadcast mask", lambda x: x.masked_select(MASK_ROW).sigmoid(), [(3, 4)], 3),
    # -- fan-out among them
    ("pad flip roll fan-out",
     lambda x: (F.pad(x, (1, 1)).flip(-1) * torch.roll(F.pad(x, (2, 0)), 1)).tanh() + torch.take(x, FLAT[:2]).sum(),
     [(2, 3)], 4),
    ("embedding masked_select fan-out",
     lambda w: (F.embedding(TOKENS, w.flip(0)).masked_select(TOKENS.unsqueeze(-1) > 1)
                * w.roll(1).take(FLAT)[0]).tanh(),
     [(5, 3)], 3),
    # -- max_unpool: entries written at the indices of a max_pool of a constant
    ("F.max_unpool2d", lambda x: F.max_unpool2d(x, UNPOOL2, 2).tanh(), [(1, 2, 2, 2)], 3),
    ("F.max_unpool3d", lambda x: F.max_unpool3d(x, UNPOOL3, 2) * 2.0, [(1, 1, 2, 2, 2)], 3),

]

"""Samples of the operators with several outputs: split, chunk, unbind (each output its own value)."""

import torch

CASES = [
    ("split two pieces", lambda x: torch.tanh(x.split(2)[0]).sum() * x.split(2)[1], [(4, 2)], 4),
    ("split uneven, fan-out", lambda x: (lambda a, b, c: a.sum() * torch.tanh(b) + c.sum())(*torch.split(x, 2)),
     [(5,)], 4),
    ("split dim -1", lambda x: torch.split(x, 3, dim=-1)[1].sigmoid() * x.sum(), [(2, 5)], 3),
    ("split with sizes", lambda x: (lambda a, b: torch.tanh(a) @ b.T)(*x.split([1, 3], dim=0)), [(4, 2)], 3),
    ("chunk", lambda x: (lambda a, b: a * b)(*x.chunk(2, dim=1)), [(2, 4)], 4),
    ("torch.chunk odd", lambda x: torch.chunk(x, 2)[1].tanh(), [(5,)], 3),
    ("unbind", lambda x: (lambda a, b, c: a * b.tanh() - c)(*x.unbind(1)), [(2, 3)], 4),
    ("torch.unbind", lambda x: torch.unbind(x)[1].sigmoid().prod(), [(2, 3)], 3),
    ("unsafe_split", lambda x: x.unsafe_split(2)[1].tanh() * x.unsafe_split(2)[0], [(4,)], 3),
]

"""Samples of linear algebra: torch.einsum with any equation (it records permutes, bmm,
diagonals and sums), diagonal, trace, and batched / broadcast matmul."""

import torch

CASES = [
    ("einsum matmul", lambda a, b: torch.einsum("ij,jk->ik", a, b).tanh(), [(2, 3), (3, 2)], 4),
    ("einsum row dot", lambda a: torch.einsum("ij,ij->i", a, a.tanh()), [(2, 3)], 4),
    ("einsum batched", lambda a, b: torch.einsum("bij,jk->bik", a, b).sigmoid(), [(2, 2, 3), (3, 2)], 3),
    ("einsum three operands", lambda a, b, c: torch.einsum("i,ij,j->", a, b, c).tanh(), [(2,), (2, 3), (3,)], 4),
    ("einsum outer", lambda a: torch.einsum("i,j->ij", a, a.sin()), [(3,)], 4),
    ("einsum diagonal", lambda a: torch.einsum("ii->i", a).tanh() * a[0], [(3, 3)], 3),
    ("einsum trace", lambda a: torch.einsum("ii->", a @ a).sin(), [(3, 3)], 4),
    ("einsum transpose sum", lambda a: torch.einsum("ijk->kj", a).tanh(), [(2, 3, 2)], 3),
    ("torch.diagonal offset", lambda a: torch.diagonal(a, 1).tanh() * torch.diagonal(a, -1), [(3, 3)], 4),
    ("Tensor.diagonal dims", lambda a: a.diagonal(dim1=0, dim2=2).sigmoid(), [(2, 3, 2)], 3),
    ("torch.diagonal wide", lambda a: torch.diagonal(a).tanh() * a[:, 0], [(3, 4)], 3),  # was a wrong port
    ("torch.diagonal tall dims", lambda a: a.diagonal(dim1=1, dim2=0).exp(), [(4, 2, 3)], 2),
    ("torch.diag", lambda a: torch.diag(a * a).tanh(), [(3, 3)], 3),
    ("torch.trace", lambda a: torch.trace(a.tanh() @ a), [(3, 3)], 4),
    ("torch.trace wide", lambda a: torch.trace(a).sin() * a.sum(), [(2, 3)], 3),
    ("bmm", lambda a, b: torch.bmm(a, b).tanh(), [(2, 2, 3), (2, 3, 2)], 3),
    ("batched broadcast matmul", lambda a, b: torch.matmul(a, b).tanh(), [(3, 2, 3), (3, 2)], 3),
]

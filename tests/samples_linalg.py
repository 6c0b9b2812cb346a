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
    # -- triangles, diagonal embeddings, cumulative sums
    ("torch.tril", lambda a: torch.tril(a).tanh() * a, [(3, 3)], 3),
    ("Tensor.tril diagonal", lambda a: a.tril(-1).sin(), [(2, 3, 4)], 3),
    ("torch.triu diagonal", lambda a: torch.triu(a, 1).tanh() * a, [(3, 4)], 3),
    ("Tensor.triu", lambda a: (a @ a).triu().exp().sum(), [(3, 3)], 3),
    ("torch.diag_embed", lambda a: torch.diag_embed(a).tanh() * a.sum(), [(2, 3)], 3),
    ("diag_embed offset dims", lambda a: torch.diag_embed(a, offset=-1, dim1=0, dim2=2).sin(), [(2, 3)], 3),
    ("torch.diag vector", lambda a: torch.diag(a.tanh(), 1) @ torch.diag(a, 1), [(3,)], 4),
    ("torch.diagflat", lambda a: torch.diagflat(a).sigmoid(), [(2, 2)], 3),
    ("torch.cumsum", lambda a: torch.cumsum(a, 1).tanh(), [(2, 3)], 4),
    ("Tensor.cumsum neg dim", lambda a: a.cumsum(-1) * a, [(2, 2, 3)], 3),
    ("cumsum 0-d", lambda a: a.sum().cumsum(0).sin(), [(3,)], 3),
    ("torch.addbmm", lambda c, b1, b2: torch.addbmm(c, b1, b2, beta=0.5, alpha=2.0).tanh(),
     [(3, 2), (2, 3, 4), (2, 4, 2)], 3),
    # solve as inv(A) @ b (xa_ops/linalg.py); A near the identity keeps it well conditioned. torch's own
    # third derivatives of solve w.r.t. A are wrong (tests/test_composite.py checks order 3 against inv(A) @ b)
    ("torch.linalg.solve vector", lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3, dtype=a.dtype), b).sin(),
     [(3, 3), (3,)], 2),
    ("torch.linalg.solve matrix fan-out", lambda a: torch.linalg.solve(a + 3 * torch.eye(3, dtype=a.dtype), a) * a,
     [(3, 3)], 2),

]

"""Samples of the core operators, each in every spelling users write.

Each entry is ``(id, function of the inputs, input shapes, order)`` or, with an
input domain, ``(id, function, shapes, order, (low, high))``: inputs are then
drawn uniformly from that interval instead of from a standard normal.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
C34 = torch.randn(3, 4, dtype=torch.float64)
C4 = torch.randn(4, dtype=torch.float64)
LIN = nn.Linear(4, 3).double()
LIN_NOBIAS = nn.Linear(4, 3, bias=False).double()

CASES = [
    # -- activations
    ("torch.relu", lambda x: torch.relu(x) * x, [(3, 4)], 5),
    ("Tensor.relu", lambda x: x.relu() * x, [(3, 4)], 3),
    ("nn.ReLU", lambda x: nn.ReLU()(x) * x, [(3, 4)], 3),
    ("F.relu", lambda x: F.relu(x) * x, [(3, 4)], 3),
    ("torch.sigmoid", lambda x: torch.sigmoid(x), [(3, 4)], 5),
    ("Tensor.sigmoid", lambda x: x.sigmoid(), [(3, 2)], 3),
    ("nn.Sigmoid", lambda x: nn.Sigmoid()(x), [(3, 2)], 3),
    ("F.sigmoid", lambda x: F.sigmoid(x), [(3, 2)], 3),
    ("torch.tanh", lambda x: torch.tanh(x), [(3, 4)], 5),
    ("Tensor.tanh", lambda x: x.tanh(), [(3, 2)], 3),
    ("nn.Tanh", lambda x: nn.Tanh()(x), [(3, 2)], 3),
    ("F.tanh", lambda x: F.tanh(x), [(3, 2)], 3),
    ("torch.softmax dim=1", lambda x: torch.softmax(x, dim=1), [(2, 4)], 5),
    ("torch.softmax dim=0", lambda x: torch.softmax(x, 0), [(3, 2)], 4),
    ("softmax dim=-1 3d", lambda x: x.softmax(-1), [(2, 2, 3)], 3),
    ("nn.Softmax", lambda x: nn.Softmax(dim=0)(x), [(3, 2)], 3),
    ("F.softmax", lambda x: F.softmax(x, dim=-1), [(4,)], 4),
    # -- matrix products
    ("torch.addmm", lambda m, a, b: torch.addmm(m, a, b), [(2, 3), (2, 4), (4, 3)], 3),
    ("addmm alpha beta bcast", lambda m, a, b: torch.addmm(m, a, b, beta=0.5, alpha=2.0).tanh(),
     [(3,), (2, 4), (4, 3)], 4),
    ("torch.addmv alpha beta bcast", lambda m, a, v: torch.addmv(m, a, v, beta=0.5, alpha=2.0).tanh(),
     [(1,), (3, 4), (4,)], 3),
    # only the bias requires grad: torch saves neither the matrix nor the vector (nor their shapes)
    ("addmv constant matrix and vector", lambda m: torch.addmv(m, C34, C4).tanh() * m, [(3,)], 3),
    ("Tensor.addr", lambda m, a, b: m.addr(a, b, beta=2.0, alpha=-1.0).tanh(), [(3, 4), (3,), (4,)], 3),
    ("addr constant vectors", lambda m, a: torch.addr(m, a, C4).sigmoid() * m, [(3, 4), (3,)], 3),
    ("addr only the bias", lambda m: torch.addr(m, C4[:3], C4).sigmoid() * m, [(3, 4)], 3),
    ("torch.mm", lambda a, b: torch.mm(a, b).tanh(), [(2, 4), (4, 3)], 4),
    ("@ 2d", lambda a, b: (a @ b).sigmoid(), [(2, 4), (4, 3)], 3),
    ("matmul 1d@1d", lambda a, b: torch.matmul(a, b).tanh(), [(4,), (4,)], 5),
    ("matmul 2d@1d", lambda a, b: torch.matmul(a, b).tanh(), [(3, 4), (4,)], 4),
    ("matmul 1d@2d", lambda a, b: (a @ b).tanh(), [(4,), (4, 3)], 4),
    ("matmul batched", lambda a, b: (a @ b).tanh(), [(2, 3, 4), (2, 4, 2)], 3),
    ("matmul 3d@2d", lambda a, b: (a @ b).tanh(), [(2, 3, 4), (4, 2)], 3),
    ("matmul broadcast", lambda a, b: (a @ b).tanh(), [(2, 1, 2, 3), (3, 3, 2)], 3),
    ("Tensor.matmul", lambda a, b: a.matmul(b).tanh(), [(2, 3), (3, 2)], 3),
    ("Tensor.mm", lambda a, b: a.mm(b).tanh(), [(2, 3), (3, 2)], 3),
    ("F.linear", lambda x, w, b: F.linear(x, w, b).tanh(), [(2, 4), (3, 4), (3,)], 4),
    ("F.linear no bias", lambda x, w: F.linear(x, w).tanh(), [(2, 4), (3, 4)], 4),
    ("F.linear 1d", lambda x, w, b: F.linear(x, w, b).tanh(), [(4,), (3, 4), (3,)], 3),
    ("F.linear 3d", lambda x, w, b: F.linear(x, w, b).tanh(), [(2, 2, 4), (3, 4), (3,)], 3),
    ("nn.Linear", lambda x: LIN(x).tanh(), [(2, 4)], 4),
    ("nn.Linear no bias", lambda x: LIN_NOBIAS(x).tanh(), [(4,)], 4),
    # -- products
    ("* tensors", lambda a, b: a * b * a, [(3, 4), (3, 4)], 5),
    ("* broadcast", lambda a, b: a * b, [(3, 1), (4,)], 3),
    ("* number", lambda a: (a * 3.0).tanh() * 0.5, [(3,)], 4),
    ("torch.mul", lambda a, b: torch.mul(a, b).sigmoid(), [(2, 3), (3,)], 3),
    ("Tensor.mul const", lambda a: a.mul(C34).tanh(), [(3, 4)], 3),
    ("x * x", lambda x: x * x, [(4,)], 5),
    ("torch.prod all", lambda x: torch.prod(x), [(2, 3)], 5),
    ("Tensor.prod dim", lambda x: x.prod(1), [(2, 3)], 4),
    ("prod dim keepdim", lambda x: x.prod(0, keepdim=True), [(3, 2)], 3),
    ("prod with zero", lambda x: (x * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)).prod(), [(4,)], 4),
    # -- dropout in training mode: xa treats the mask as a constant, the reference gets the same mask
    # (tested separately below, where the mask is read back)
    # -- shapes
    ("permute", lambda x: x.permute(2, 0, 1).tanh() * x.permute(2, 0, 1), [(2, 3, 2)], 3),
    ("Tensor.t", lambda x: x.t().tanh().t() * x, [(2, 3)], 3),
    ("torch.t", lambda x: torch.t(x).sigmoid(), [(2, 3)], 3),
    (".T", lambda x: (x.T @ x).tanh(), [(3, 2)], 3),
    (".mT", lambda x: (x.mT @ x).tanh(), [(2, 3, 2)], 3),
    ("transpose", lambda x: x.transpose(0, 2).tanh(), [(2, 3, 2)], 3),
    ("torch.transpose neg dims", lambda x: torch.transpose(x, -1, -2).sigmoid() @ x, [(3, 3)], 3),
    ("view", lambda x: x.view(3, 2).tanh().view(-1), [(2, 3)], 3),
    ("view split dims", lambda x: x.view(2, 2, 3).softmax(1), [(4, 3)], 3),
    ("reshape", lambda x: torch.reshape(x, (3, 2)).sigmoid(), [(2, 3)], 3),
    ("reshape non-contiguous", lambda x: x.t().reshape(-1).tanh(), [(2, 3)], 3),
    ("flatten", lambda x: torch.flatten(x).tanh() * x.flatten(), [(2, 3)], 3),
    ("nn.Flatten", lambda x: nn.Flatten()(x).tanh(), [(2, 3, 2)], 3),
    ("unsqueeze squeeze", lambda x: x.unsqueeze(0).tanh().squeeze(0) * x, [(2, 3)], 3),
    ("expand", lambda x: x.expand(3, 4).tanh(), [(4,)], 3),
    ("aten.alias", lambda x: torch.ops.aten.alias(x).tanh() * x, [(3,)], 3),
    ("lazy clone", lambda x: torch._lazy_clone(x).sigmoid() * x.clone(), [(3,)], 3),
    ("squeeze variants", lambda x: x.unsqueeze(1).squeeze((1,)).unsqueeze(0).squeeze().tanh()
     * torch.squeeze(x.unsqueeze(-2), -2), [(2, 3)], 3),
    # -- sums
    ("+", lambda a, b: (a + b).tanh(), [(3, 4), (3, 4)], 4),
    ("+ broadcast", lambda a, b: (a + b).tanh(), [(3, 4), (4,)], 3),
    ("+ number", lambda a: (a + 2.0).tanh(), [(3,)], 4),
    ("torch.add alpha", lambda a, b: torch.add(a, b, alpha=2.5).sigmoid(), [(3,), (3,)], 3),
    ("Tensor.add", lambda a: a.add(C4).tanh(), [(4,)], 3),
    ("-", lambda a, b: (a - b).tanh(), [(3,), (2, 3)], 3),
    ("torch.sub alpha", lambda a, b: torch.sub(a, b, alpha=0.5).tanh(), [(3,), (3,)], 3),
    ("number - x", lambda a: (1.0 - a).sigmoid(), [(3,)], 3),
    ("torch.rsub", lambda a, b: torch.rsub(a, b, alpha=2.0).tanh(), [(3,), (3,)], 3),
    ("neg", lambda a: (-a).sigmoid() * -a, [(3,)], 3),
    ("torch.neg", lambda a: torch.neg(a).tanh(), [(3,)], 3),
    ("sum all", lambda x: x.tanh().sum(), [(2, 3)], 5),
    ("torch.sum dim", lambda x: torch.sum(x.tanh(), dim=1), [(2, 3)], 4),
    ("sum dims keepdim", lambda x: x.tanh().sum((0, 2), keepdim=True) * x.sum(-1, keepdim=True), [(2, 2, 3)], 3),
    # -- casts: a copy; the derivative is the cast back, the identity in the graph's dtype
    ("Tensor.to copy", lambda x: x.to(torch.float64, copy=True).tanh() * x, [(3,)], 3),
    ("Tensor.to device", lambda x: torch.sin(x).to(device=x.device, copy=True).sum(), [(2, 3)], 3),
    ("aten._to_copy", lambda x: torch.ops.aten._to_copy(x.sigmoid()) * x, [(3,)], 3),
    ("aten sub.Scalar", lambda x: torch.ops.aten.sub.Scalar(x, 2.0) * x, [(3,)], 3),
    ("Tensor.fill_ on a clone", lambda x: x.clone().fill_(2.0) * x + x.clone().fill_(1.0), [(3,)], 3),
    ("torch.fill", lambda x: torch.fill(x, 2.0) * x.sin(), [(3,)], 3),

]

"""Every operator, in every spelling users write, against torch.func up to order 5 (float64)."""

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close_to_torch

torch.manual_seed(0)
C34 = torch.randn(3, 4, dtype=torch.float64)
C4 = torch.randn(4, dtype=torch.float64)
LIN = nn.Linear(4, 3).double()
LIN_NOBIAS = nn.Linear(4, 3, bias=False).double()

# (id, function of the inputs, input shapes, order)
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
]


@pytest.mark.parametrize("name,f,shapes,order", CASES, ids=[c[0] for c in CASES])
def test_operator_matches_torch(name, f, shapes, order):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    assert_close_to_torch(f, inputs, order, tol=1e-9)


@pytest.mark.parametrize("spelling", ["F.dropout", "nn.Dropout", "native_dropout"])
def test_dropout_mask_is_a_constant(spelling):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(x)
    if spelling == "F.dropout":
        d = F.dropout(h, 0.4, training=True)
    elif spelling == "nn.Dropout":
        d = nn.Dropout(0.4).train()(h)
    else:
        d = torch.native_dropout(h, 0.4, True)[0]
    mask = (d != 0).to(torch.float64) / 0.6
    y = (d * h).sum() + d.prod()
    import xa

    xa.backward(y, 3)
    from reference import torch_partials

    ref = torch_partials(lambda z: (torch.tanh(z) * mask * torch.tanh(z)).sum() + (torch.tanh(z) * mask).prod(),
                         [x], 3)[0]
    for k in range(3):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-10, rtol=0)


def test_in_place_squeeze_and_unsqueeze():
    # torch.func cannot differentiate through in-place ops, so the reference is the out-of-place twin.
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = (x * 1.0).unsqueeze_(0).squeeze_(0).unsqueeze_(1).squeeze_((1,)).unsqueeze_(0).squeeze_().tanh()
    from reference import torch_partials

    import xa

    xa.backward(y, 3)
    ref = torch_partials(lambda z: z.tanh(), [x], 3)[0]
    for k in range(3):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-12, rtol=0)

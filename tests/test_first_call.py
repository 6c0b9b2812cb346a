"""The first call in a process plans on CPU stand-ins of the saved tensors, not meta tensors.

Rules used to run on meta tensors while planning, and torch's Python meta
kernels import ``torch._dynamo`` (and with it sympy and the inductor) on
first use: 1.5-4 s on the first call. The test checks that cause in a fresh
process, not a time, on the core operators and the losses. (Rules that run
torch.func at execution -- the ``taylor`` activations, the normalizations,
attention -- still import it there: torch.func's transforms do.)
"""

import subprocess
import sys

FIRST_CALL = r"""
import sys
import torch
import torch.nn.functional as F
import xa
before = set(sys.modules)
x = torch.randn(3, dtype=torch.float64, requires_grad=True)
W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
h = torch.tanh(W @ x) + W @ x
z = torch.softmax(torch.relu(h) * h, dim=0)[1:].sum() + F.mse_loss(h, torch.ones(4, dtype=torch.float64))
y = z + F.cross_entropy(h.reshape(1, 4), torch.tensor([2])) + torch.cat([x, h]).exp().mean()
xa.backward(y, 3)
assert x.xgrad[2].shape == (1, 3, 3, 3)
print(" ".join(sorted(set(sys.modules) - before)))
"""

HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "torch._subclasses.fake_tensor")


def test_first_call_imports_no_heavy_torch_subsystem():
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))

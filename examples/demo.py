"""Third derivatives of a small network with xa, checked against nested torch.func.

A 3-8-8-2 tanh network with a softmax output: xa.explain shows the plan,
xa.backward computes d^k y / dx^k and d^k y / dW1^k for k = 1, 2, 3 in one
pass, and nested jacrev/jacfwd recomputes them for comparison.
"""

import time

import torch
from torch.func import jacfwd, jacrev

import xa

torch.manual_seed(0)
dtype = torch.float64
x = torch.randn(3, dtype=dtype, requires_grad=True)
W1 = torch.randn(8, 3, dtype=dtype, requires_grad=True)
b1 = torch.randn(8, dtype=dtype)
W2 = torch.randn(8, 8, dtype=dtype) / 3
W3 = torch.randn(2, 8, dtype=dtype) / 3


def net(x, W1):
    h = torch.tanh(W1 @ x + b1)
    h = h + torch.tanh(W2 @ h)  # a residual: h is read twice (fan-out)
    return torch.softmax(W3 @ h, dim=0)


y = net(x, W1)
print("== xa.explain(y, order=3)")
xa.explain(y, order=3)

start = time.perf_counter()
xa.backward(y, order=3)
print(f"\n== xa.backward(y, order=3) took {time.perf_counter() - start:.3f}s")
for name, leaf in (("x", x), ("W1", W1)):
    print(f"{name}.xgrad shapes:", [tuple(t.shape) for t in leaf.xgrad])

print("\n== against nested torch.func (jacrev, then jacfwd per further order)")
for i, (name, leaf) in enumerate((("x", x), ("W1", W1))):
    def f(z, i=i):
        args = [x.detach(), W1.detach()]
        args[i] = z
        return net(*args)

    g = jacrev(f)
    for k in range(1, 4):
        ref = g(leaf.detach()).reshape(leaf.xgrad[k - 1].shape)
        err = (leaf.xgrad[k - 1] - ref).abs().max().item()
        print(f"  d^{k} y / d{name}^{k}: max abs error {err:.2e}")
        assert err < 1e-9, "xa disagrees with torch"
        g = jacfwd(g)
print("\nall derivatives agree with torch.")

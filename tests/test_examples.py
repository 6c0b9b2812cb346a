"""The training examples, short: a few steps lower the loss, and their gradients are torch.func's.

``examples/pinn_poisson.py`` trains on ``xa.laplacian``; ``examples/gauss_newton.py``
takes the residual's Jacobian w.r.t. every parameter from xa on xa. The
full runs are in the README; here each runs a few steps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch.func import functional_call, hessian, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import gauss_newton  # noqa: E402
import pinn_poisson  # noqa: E402

TOL = 1e-10


def _pde_loss_ref(net, X):
    """torch.func: ``mean((-Δu - f)^2)`` as a function of the parameters."""
    names = [n for n, _ in net.named_parameters()]

    def loss(*params):
        p = dict(zip(names, params))

        def u(x):
            return functional_call(net, p, (x[None],))[0, 0]

        lap = vmap(lambda x: hessian(u)(x).diagonal().sum())(X)
        return ((-lap[:, None] - pinn_poisson.source_term(X)) ** 2).mean()

    return loss, names


def test_pinn_poisson_gradient_and_a_few_steps():
    net = pinn_poisson.network(width=16, depth=2)
    X, Xb = pinn_poisson.points(64, 32)
    pde, bc = pinn_poisson.losses(net, X, Xb)
    pde.backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]  # the last bias: none
    loss, names = _pde_loss_ref(net, X.detach())
    want = torch.func.grad(loss, argnums=tuple(range(len(names))))(*[p.detach() for p in net.parameters()])
    for n, g, w in zip(names, got, want):
        assert (g - w).abs().max().item() <= TOL * max(1.0, w.abs().max().item()), n
    assert max(g.abs().max().item() for g in got[:-1]) > 0  # the PDE term reaches the weights

    _, history = pinn_poisson.train(steps=100, interior=64, boundary=32, log_every=0)
    first, last = history["pde"][0], history["pde"][-1]
    assert last < 0.5 * first


def test_gauss_newton_jacobian_and_a_few_steps():
    net = pinn_poisson.network(width=8, depth=2)
    X, Xb = pinn_poisson.points(12, 6)
    r, J = gauss_newton.jacobian(net, X, Xb)
    names = [n for n, _ in net.named_parameters()]

    def residuals(*params):
        p = dict(zip(names, params))

        def u(x):
            return functional_call(net, p, (x[None],))[0, 0]

        lap = vmap(lambda x: hessian(u)(x).diagonal().sum())(X.detach())
        pde = (-lap - pinn_poisson.source_term(X.detach())[:, 0]) / math.sqrt(len(X))
        return torch.cat([pde, functional_call(net, p, (Xb,))[:, 0] / math.sqrt(len(Xb))])

    params = [p.detach() for p in net.parameters()]
    want_r = residuals(*params)
    want_J = torch.cat([j.reshape(len(want_r), -1) for j in jacrev(residuals, argnums=tuple(range(len(params))))(
        *params)], 1)
    assert (r - want_r).abs().max().item() <= TOL * max(1.0, want_r.abs().max().item())
    assert (J - want_J).abs().max().item() <= TOL * max(1.0, want_J.abs().max().item())
    assert not hasattr(X, "xgrad") and all(not hasattr(p, "xgrad") for p in net.parameters())

    _, history = gauss_newton.levenberg_marquardt(steps=3, interior=32, boundary=16)
    assert history[-1] < 0.5 * history[0]

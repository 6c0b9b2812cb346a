"""Gauss-Newton on a physics-informed network, with the residual's Jacobian from xa on xa.

    python examples/gauss_newton.py                 # Levenberg-Marquardt against Adam, prints the loss per step
    python examples/gauss_newton.py --plot docs/gauss_newton.png

The problem is ``examples/pinn_poisson.py``'s: ``-Δu = 2π² sin(πx) sin(πy)``
on the unit square, ``u = 0`` on its boundary. Gauss-Newton (and energy
natural gradient) needs the Jacobian of every point's residual with respect
to every parameter. The residual ``r = -Δu - f`` is itself xa's result,
with a graph; ``xa.backward(r, 1, batch_dim=0)`` differentiates that graph --
xa's own contractions -- once more and gives each parameter ``W`` the
per-point gradients ``W.xgrad[0]``, shaped ``(B, 1, W.numel())``. Stacked,
they are the ``(B, P)`` Jacobian ``J``; a Levenberg-Marquardt step solves
``(J^T J + λ I) δ = J^T r``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import xa

try:
    from pinn_poisson import losses, network, points, relative_error, source_term
except ImportError:  # imported as examples.gauss_newton
    from examples.pinn_poisson import losses, network, points, relative_error, source_term


def residuals(net, X, Xb, create_graph=True) -> torch.Tensor:
    """Every point's residual, scaled so that ``|r|^2`` is the loss: PDE rows, then boundary rows, ``(B + Bb, 1)``."""
    u = net(X)
    pde = (-xa.laplacian(u, X, batch_dim=0, create_graph=create_graph) - source_term(X)) / math.sqrt(len(X))
    return torch.cat([pde, net(Xb) / math.sqrt(len(Xb))])


def jacobian(net, X, Xb) -> tuple:
    """``(r, J)``: the residuals and their Jacobian w.r.t. every parameter, ``(B + Bb, P)``, from xa on xa."""
    r = residuals(net, X, Xb)
    params = list(net.parameters())
    sup = xa.backward(r, 1, batch_dim=0, create_graph=False)
    J = torch.cat([p.xgrad[0].reshape(len(r), -1) if hasattr(p, "xgrad") else torch.zeros(len(r), p.numel(),
                                                                                         dtype=r.dtype)
                   for p in params], 1)
    sup.remove_partials()
    X.__dict__.pop("xgrad", None)  # X is a leaf of r's graph too; its per-point derivatives are not needed
    return r.detach().reshape(-1), J


def levenberg_marquardt(steps: int = 30, interior: int = 300, boundary: int = 100, seed: int = 0) -> tuple:
    """Damped Gauss-Newton steps on all the parameters at once; ``(net, losses per step)``."""
    net = network(width=16, depth=2, seed=seed)
    X, Xb = points(interior, boundary, seed=seed + 1)
    params = list(net.parameters())
    damping, history = 1e-2, []
    for _ in range(steps):
        r, J = jacobian(net, X, Xb)
        loss = (r ** 2).sum().item()
        history.append(loss)
        g = J.T @ r
        A = J.T @ J
        while True:
            delta = torch.linalg.solve(A + damping * torch.eye(len(A), dtype=A.dtype), g)
            _shift(params, -delta)
            trial = (residuals(net, X, Xb, create_graph=False) ** 2).sum().item()
            if trial < loss or damping > 1e8:
                damping = max(damping / 3, 1e-9)
                break
            _shift(params, delta)
            damping *= 4
    history.append((residuals(net, X, Xb, create_graph=False) ** 2).sum().item())
    return net, history


@torch.no_grad()
def _shift(params, delta) -> None:
    at = 0
    for p in params:
        p.add_(delta[at:at + p.numel()].reshape(p.shape))
        at += p.numel()


def adam(steps: int, interior: int = 300, boundary: int = 100, seed: int = 0, lr: float = 1e-2) -> list:
    """The same network and points trained with Adam: the loss per step."""
    net = network(width=16, depth=2, seed=seed)
    X, Xb = points(interior, boundary, seed=seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        pde, bc = losses(net, X, Xb)
        (pde + bc).backward()  # the same loss Gauss-Newton minimises: |r|^2, boundary rows unweighted
        opt.step()
        history.append((pde + bc).item())
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--adam-steps", type=int, default=3000)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    net, gn = levenberg_marquardt(args.steps)
    gn_s = time.perf_counter() - start
    start = time.perf_counter()
    ad = adam(args.adam_steps)
    ad_s = time.perf_counter() - start
    print("step  Gauss-Newton loss")
    for step, loss in enumerate(gn):
        print(f"{step:4d}  {loss:.3e}")
    print(f"Gauss-Newton: {args.steps} steps in {gn_s:.1f} s, loss {gn[-1]:.2e}, relative L2 error "
          f"{relative_error(net):.2e}")
    print(f"Adam: {args.adam_steps} steps in {ad_s:.1f} s, loss {ad[-1]:.2e}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(range(len(gn)), gn, "o-", label=f"Gauss-Newton, J from xa on xa ({gn_s:.0f} s)")
        ax.semilogy(range(len(ad)), ad, label=f"Adam ({ad_s:.0f} s)")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.plot), dpi=110)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

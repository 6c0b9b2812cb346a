"""DeepXDE's 2-D Poisson problem trained twice: on DeepXDE's own Hessian, and on xa's Laplacian.

    pip install deepxde                                  # into an environment that has torch and xa
    DDE_BACKEND=pytorch python examples/deepxde_poisson.py
    DDE_BACKEND=pytorch python examples/deepxde_poisson.py --iterations 500 --threads 1

This is an example, not part of the test suite: it needs DeepXDE, which xa does not depend on.

The problem: ``-Δu = 2π² sin(πx) sin(πy)`` on the unit square, ``u = 0`` on its boundary, whose solution is
``sin(πx) sin(πy)``. DeepXDE builds everything -- geometry, collocation points, network, Adam, the training loop;
the only difference between the two runs is the Laplacian inside DeepXDE's ``pde(x, y)``:

- ``deepxde``: ``dde.grad.hessian(y, x, i=0, j=0) + dde.grad.hessian(y, x, i=1, j=1)`` (nested autograd with
  ``create_graph=True``),
- ``xa``: ``xa.laplacian(y, x, batch_dim=0)``.

No adapter is needed. With the PyTorch backend DeepXDE calls ``pde(x, y)`` with ``x`` a leaf tensor that
requires grad (all training points, boundary points included, as one ``(N, 2)`` batch) and ``y = net(x)``,
``(N, 1)``, with grad mode on: exactly what ``xa.laplacian`` takes. Its result carries the gradient to the
network's weights, so DeepXDE's ``loss.backward()`` trains through it unchanged. (A network DeepXDE wraps in
an input or output transform works too, as long as every operator in it is one xa supports; xa names the
one it does not.)

Both runs start from the same seed, so from the same points and weights. Before training the script checks
that the two Laplacians, and the gradients of the PDE loss w.r.t. the weights, agree on the training points;
after it, it prints per run the relative L2 error against the exact solution on a 101 x 101 grid and the
time per iteration (including DeepXDE's own overhead and its test evaluations at the start and the end).
The two Laplacians agree to rounding, not bit for bit, and Adam carries such differences along: the two
trained networks differ by up to about 1e-3 on the grid, while their errors agree to well within 1%. The
default 3000 iterations take a few minutes on a laptop CPU, both runs together.
"""

from __future__ import annotations

import argparse
import math
import time

import deepxde as dde
import numpy as np
import torch

import xa

LAYERS = [2] + [50] * 3 + [1]
NUM_DOMAIN, NUM_BOUNDARY, NUM_TEST = 1200, 120, 1500


def source_term(x: torch.Tensor) -> torch.Tensor:
    return 2 * math.pi ** 2 * torch.sin(math.pi * x[:, 0:1]) * torch.sin(math.pi * x[:, 1:2])


def exact(x: np.ndarray) -> np.ndarray:
    return np.sin(np.pi * x[:, 0:1]) * np.sin(np.pi * x[:, 1:2])


def laplacian_deepxde(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return dde.grad.hessian(y, x, i=0, j=0) + dde.grad.hessian(y, x, i=1, j=1)


def laplacian_xa(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return xa.laplacian(y, x, batch_dim=0)


LAPLACIANS = {"deepxde": laplacian_deepxde, "xa": laplacian_xa}


def build(variant: str, seed: int) -> dde.Model:
    """A compiled DeepXDE model whose PDE residual uses the variant's Laplacian."""
    laplacian = LAPLACIANS[variant]

    def pde(x, y):
        return -laplacian(x, y) - source_term(x)

    # Reseeding before the points and the network are made gives both variants the same ones.
    dde.config.set_random_seed(seed)
    geom = dde.geometry.Rectangle([0, 0], [1, 1])
    bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on_boundary: on_boundary)
    data = dde.data.PDE(geom, pde, bc, num_domain=NUM_DOMAIN, num_boundary=NUM_BOUNDARY, solution=exact,
                        num_test=NUM_TEST)
    net = dde.nn.FNN(LAYERS, "tanh", "Glorot uniform")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3, metrics=["l2 relative error"])
    return model


def check_agreement(model: dde.Model) -> tuple:
    """``(points, laplacian difference, gradient difference, max |laplacian|, max |gradient|)``.

    The differences are the max abs differences between the two variants on the model's training points, of the
    Laplacian and of the gradient of the mean squared PDE residual w.r.t. the network's weights.
    """
    x = torch.as_tensor(model.data.train_x).requires_grad_(True)
    params = list(model.net.parameters())
    laps, grads = [], []
    for laplacian in LAPLACIANS.values():
        y = model.net(x)
        lap = laplacian(x, y)
        residual = -lap - source_term(x)
        # The output bias does not reach the Laplacian: its gradient is zero, not missing.
        grads.append(torch.autograd.grad((residual ** 2).mean(), params, materialize_grads=True))
        laps.append(lap.detach())
        # DeepXDE caches derivatives per (y, x) pair; the next forward pass makes a new y, but the cache would
        # keep this graph alive.
        dde.grad.clear()
    lap_diff = (laps[0] - laps[1]).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    return len(x), lap_diff, grad_diff, laps[0].abs().max().item(), max(g.abs().max().item() for g in grads[0])


def test_grid(n: int = 101) -> np.ndarray:
    s = np.linspace(0, 1, n)
    return np.stack(np.meshgrid(s, s, indexing="ij"), -1).reshape(-1, 2)


def relative_error(u: np.ndarray, grid: np.ndarray) -> float:
    want = exact(grid)
    return float(np.linalg.norm(u - want) / np.linalg.norm(want))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000, help="Adam iterations per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); 1 gives steadier timings on a busy machine")
    args = parser.parse_args(argv)
    if dde.backend.backend_name != "pytorch":
        parser.error(f"DeepXDE is using the {dde.backend.backend_name!r} backend; run with DDE_BACKEND=pytorch")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Must come before any network is built: DeepXDE makes its layers in the default float type.
    dde.config.set_default_float("float64")

    points, lap_diff, grad_diff, lap_max, grad_max = check_agreement(build("xa", args.seed))
    print(f"\nbefore training, on the {points} training points:")
    print(f"  max |xa.laplacian - trace of dde.grad.hessian| = {lap_diff:.2e}  (max |Laplacian| {lap_max:.2e})")
    print(f"  max |difference of the PDE loss gradients w.r.t. the weights| = {grad_diff:.2e}"
          f"  (max |gradient| {grad_max:.2e})")

    grid = test_grid()
    results = {}
    for variant in LAPLACIANS:
        model = build(variant, args.seed)
        print(f"\ntraining with the {variant} Laplacian, {args.iterations} Adam iterations ...", flush=True)
        start = time.perf_counter()
        model.train(iterations=args.iterations, display_every=max(args.iterations, 1), verbose=0)
        seconds = time.perf_counter() - start
        u = model.predict(grid)
        results[variant] = (relative_error(u, grid), seconds, u)
        print(f"  done in {seconds:.1f} s", flush=True)

    print(f"\nDeepXDE {dde.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.iterations} iterations, relative L2 error on a {len(grid)}-point grid:")
    print(f"{'Laplacian':<10} {'rel. L2 error':>14} {'ms/iteration':>13} {'total s':>8}")
    for variant, (err, seconds, _) in results.items():
        print(f"{variant:<10} {err:>14.4e} {1000 * seconds / max(args.iterations, 1):>13.1f} {seconds:>8.1f}")
    u_dde, u_xa = results["deepxde"][2], results["xa"][2]
    print(f"max |u_deepxde - u_xa| on the grid after training: {np.abs(u_dde - u_xa).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

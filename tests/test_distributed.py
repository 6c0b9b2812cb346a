"""Data-parallel training through xa: DistributedDataParallel on two processes equals one process on all the points.

Two CPU processes (gloo) each hold half of the collocation points of a Poisson
problem on the unit square, wrap the same float64 MLP in
``DistributedDataParallel`` and take three Adam steps on a loss built from
``xa.laplacian`` of the DDP module's output. The final parameters must equal,
to 1e-12, those of one process without DDP trained from the same initial
weights on all the points with the same loss; each step's loss, averaged over
the ranks, must equal that process's loss. The loss must also go down and the
parameters move, so that xa's term is not a bystander.
"""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

import xa

DTYPE = torch.float64
WORLD = 2
N_INTERIOR = 64
N_SIDE = 8  # boundary points per side of the square
STEPS = 3
LR = 1e-2
TOL = 1e-12
TIMEOUT_S = 120


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(DTYPE)


def _points() -> tuple[torch.Tensor, torch.Tensor]:
    """Interior collocation points ``(64, 2)`` and boundary points ``(32, 2)``, the same in every process."""
    gen = torch.Generator().manual_seed(1)
    interior = torch.rand(N_INTERIOR, 2, dtype=DTYPE, generator=gen)
    t = torch.rand(N_SIDE, dtype=DTYPE, generator=gen)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    boundary = torch.cat([torch.stack(p, 1) for p in ((t, zero), (t, one), (zero, t), (one, t))])
    return interior, boundary


def _terms(net, interior: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """The loss's two terms: the mean squared residual of ``-Δu = 2π² sin(πx) sin(πy)``, the mean of ``u²``
    on the boundary.

    The boundary term is what makes DDP work here, not decoration: the
    Laplacian does not depend on the last layer's bias, so a pure residual loss
    leaves it without a gradient. DDP then never all-reduces the bucket that
    holds it (the first step silently uses each rank's own gradients) and fails
    at the next forward. ``find_unused_parameters=True`` is no way out: DDP looks
    for unused parameters in ``u``'s graph, where the bias is used.
    """
    X = interior.detach().requires_grad_()
    u = net(X)
    lap = xa.laplacian(u, X, batch_dim=0)
    x, y = X[:, :1], X[:, 1:]
    f = 2 * math.pi**2 * torch.sin(math.pi * x) * torch.sin(math.pi * y)
    return torch.stack([((-lap - f) ** 2).mean(), (net(boundary) ** 2).mean()])


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    # Equal halves: DDP averages the ranks' gradients, so the mean of the
    # halves' means is the mean over all points only when the halves are equal.
    assert t.shape[0] % WORLD == 0
    return t.chunk(WORLD)[rank]


def _worker(rank: int, port: int, out: str, find_unused: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        model = DDP(_model(), find_unused_parameters=find_unused)
        interior, boundary = (_shard(t, rank) for t in _points())
        # the final loss on the bare module: a forward through DDP with no backward after it would leave
        # the reducer expecting one
        losses = _train(model, model.module, interior, boundary)
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "losses": losses},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ddp(out: str, find_unused: bool) -> mp.ProcessContext:
    return mp.start_processes(_worker, args=(_free_port(), out, find_unused), nprocs=WORLD, join=False,
                              start_method="spawn")


def _wait(ctx: mp.ProcessContext) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() re-raises a worker's exception with its traceback.
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers still running after {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _train(module, bare, interior, boundary) -> torch.Tensor:
    """``STEPS`` Adam steps on the loss's terms: each step's terms, then the final ones (on ``bare``)."""
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        terms = _terms(module, interior, boundary)
        terms.sum().backward()
        opt.step()
        losses.append(terms.detach())
    losses.append(_terms(bare, interior, boundary).detach())
    return torch.stack(losses)


def _run_single() -> tuple[list[torch.Tensor], torch.Tensor]:
    net = _model()
    losses = _train(net, net, *_points())
    return [p.detach().clone() for p in net.parameters()], losses


@pytest.mark.parametrize("find_unused", [False, True], ids=["DDP", "find_unused_parameters"])
def test_ddp_matches_one_process(tmp_path, find_unused):
    """``find_unused_parameters=True`` wraps the module's outputs in a ``_DDPSink`` node xa reads through."""
    ctx = _start_ddp(str(tmp_path), find_unused)
    try:
        # The reference runs while the workers start up, which is most of their time.
        want_params, want_losses = _run_single()
    finally:
        _wait(ctx)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = [p.detach() for p in _model().parameters()]

    for r, got in enumerate(ranks):
        for i, (g, w) in enumerate(zip(got["params"], want_params)):
            err = (g - w).abs().max().item()
            assert err <= TOL, f"rank {r}, parameter {i}: off by {err:.3e} from one process"

    # Each rank's loss is over its own half: their average is the loss over all points.
    got_losses = torch.stack([r["losses"] for r in ranks]).mean(0)
    assert torch.allclose(got_losses, want_losses, rtol=TOL, atol=TOL), (got_losses, want_losses)

    # The residual, xa's term, must itself go down: the boundary term alone
    # could make the total fall and every parameter move.
    assert want_losses[-1, 0] < want_losses[0, 0], want_losses
    assert want_losses[-1].sum() < want_losses[0].sum(), want_losses
    for i, (p, p0) in enumerate(zip(want_params, initial)):
        assert (p - p0).abs().max() > 1e-4, f"parameter {i} did not move"

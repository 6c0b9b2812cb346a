"""Warm-call allocations: time, page faults and large CPU allocations of repeated xa calls.

    python benchmarks/buffers.py [j|folx|both] [calls]     # warm calls of any xa on the path
    COMPARE=1 python benchmarks/buffers.py ...              # this xa with and without arenas, alternating
    DENSE=1 ...                                             # block sparsity off (xa.sparsity.ENABLED)
    RECORDED=1 ...                                          # autograd records (no arena applies)

(j) ``xa.laplacian`` of a tanh MLP 3-64-64-64-64-1 at B = 4096; (folx) 10 x (Linear(100) + SiLU)
per node of X (B, 100, 4), then Linear(1) and a sum over nodes, the Laplacian over each sample's
400 inputs at B = 4. Each warm call reports its time, the minor page faults it took (times the page
size) and what torch's profiler saw it allocate in blocks over 1 MB.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from batched import _points, tanh_mlp  # noqa: E402

import xa  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
RECORDED = bool(os.environ.get("RECORDED"))  # RECORDED=1: the call records (results that can be trained on)


def case_j():
    model = tanh_mlp([3, 64, 64, 64, 64, 1]).requires_grad_(False)
    x = _points(4096, 3).requires_grad_(True)

    u = model(x)

    def call():
        return xa.laplacian(u, x, batch_dim=0, create_graph=RECORDED)
    return call


def case_folx(B=4):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 100, dtype=torch.float64), nn.SiLU()]
    for _ in range(9):
        layers += [nn.Linear(100, 100, dtype=torch.float64), nn.SiLU()]
    layers += [nn.Linear(100, 1, dtype=torch.float64)]
    net = nn.Sequential(*layers).requires_grad_(False)
    X = torch.randn(B, 100, 4, dtype=torch.float64, requires_grad=True)

    u = net(X).squeeze(-1).sum(-1)

    def call():
        return xa.laplacian(u, X, batch_dim=0, create_graph=RECORDED)
    return call


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def big_allocations(call, over: int = 2**20) -> tuple:
    """(count, bytes) of the CPU allocations over ``over`` bytes torch's profiler saw during one call."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()

    def walk(nodes):
        for e in nodes:
            yield e
            yield from walk(e.children)
    sizes = [e.extra_fields.alloc_size for e in walk(prof.profiler.kineto_results.experimental_event_tree())
             if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
             and e.extra_fields.alloc_size > over]
    return len(sizes), sum(sizes)


def compare(name, call, calls=3, rounds=3):
    """Warm calls with and without the plans' arenas (xa.arena.ENABLED), in alternating rounds in one process:
    per mode the median and best wall and CPU time of ``calls`` warm calls, page faults, profiler's count."""
    import statistics

    import xa.arena
    first = call()
    for _ in range(rounds):
        for reuse in (True, False):
            xa.arena.ENABLED = reuse
            call()  # warm this mode (the arena made, or released)
            if not reuse:
                xa.release_buffers()
            walls, cpus, flts, same = [], [], [], True
            for _ in range(calls):
                f0, c0, t = faults(), cpu(), time.perf_counter()
                out = call()
                walls.append(time.perf_counter() - t)
                cpus.append(cpu() - c0)
                flts.append(faults() - f0)
                same = same and torch.equal(out, first)
            n, total = big_allocations(call)
            print(f"{name}: arena {'on ' if reuse else 'off'} warm wall median {statistics.median(walls):.3f} s "
                  f"(best {min(walls):.3f}), cpu median {statistics.median(cpus):.3f} s (best {min(cpus):.3f}), "
                  f"page faults {statistics.median(flts) * PAGE / 2**20:.1f} MB/call, allocations > 1 MB: {n} "
                  f"({total / 2**20:.1f} MB), same bits {same}", flush=True)
    xa.arena.ENABLED = True


def measure(name, call, calls=4):
    """``calls`` warm calls (any xa: this tree's or another's): median and best wall and CPU time, page faults,
    and the profiler's count of large allocations."""
    import statistics
    call()
    walls, cpus, flts = [], [], []
    for _ in range(calls):
        f0, c0, t = faults(), cpu(), time.perf_counter()
        call()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu() - c0)
        flts.append(faults() - f0)
    n, total = big_allocations(call)
    print(f"{name}: warm wall median {statistics.median(walls):.3f} s (best {min(walls):.3f}), cpu median "
          f"{statistics.median(cpus):.3f} s (best {min(cpus):.3f}), page faults "
          f"{statistics.median(flts) * PAGE / 2**20:.1f} MB/call, allocations > 1 MB: {n} ({total / 2**20:.1f} MB)",
          flush=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    if os.environ.get("DENSE"):  # block sparsity off (xa.sparsity): the per-node MLP's dense plan
        import xa.sparsity
        xa.sparsity.ENABLED = False
    how = compare if os.environ.get("COMPARE") else measure
    if which in ("j", "both"):
        how("j", case_j(), calls)
    if which in ("folx", "both"):
        how("folx", case_folx(), calls)

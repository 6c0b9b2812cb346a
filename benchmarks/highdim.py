"""One training step on a randomized Laplacian in high dimension: Poisson in d = 100, 1000, 10 000.

Imported by ``run.py``, which runs these cases (x) alone:

    python benchmarks/run.py --only highdim            # x100, x1000, x10000
    python benchmarks/run.py --cases x100 --reps 2     # a quick check

Each method does, in float64 on the CPU, one PINN training step on ``B = 100``
points ``X`` of shape ``(B, d)``: zero the gradients, ``u = net(X)`` with a
tanh MLP ``d-128-128-128-128-1`` (``nn.Linear``), estimate every point's
Laplacian from ``S = 16`` random directions (Hutchinson: ``mean_s v_s^T H v_s``,
Rademacher ``v_s``, each point its own), ``loss = mean((lap - f)^2)`` for a
fixed ``f``, ``loss.backward()`` to the weights. The methods:

- ``xa``: ``xa.laplacian(u, X, batch_dim=0, samples=16, generator=g)``: one
  forward-jet plan seeded with every point's directions, the second order
  collapsed (17 rows per node), under xa's default memory budget.
- ``autograd``: nested ``torch.autograd.grad(..., create_graph=True)``: the
  gradient of ``u.sum()`` w.r.t. ``X``, then ``S`` Hessian-vector products
  (the gradient of ``sum(g * v_s)``), each contracted with ``v_s``. It draws
  the same directions as xa (the documented draw, same seed), so its
  parameter gradients are compared with xa's.
- ``torch-jet`` (``jet-for-pytorch``): ``jet.laplacian(net, (x,),
  randomization=("rademacher", 16))`` per point, ``vmap``-ed with
  ``randomness="different"``, in a child process of its own interpreter (as
  in ``train.py``). It draws its own directions, so its gradients are not
  compared.

Times are medians of up to ``--reps`` steps after one warm-up step, the
methods in turn round after round (torch-jet's after them, in its child), and
reported as ratios to xa's. Peak memory: each method's step after a warm-up
in a fresh process. The table goes to ``results/highdim.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from batched import _points, in_turn, tanh_mlp
from train import JET_HEAD, JET_TAIL, _mb, call_jet, rel_diff

import xa

METHODS = ("xa", "autograd", "torch-jet")
S = 16
SEED = 0
GRAD_TOLERANCE = 1e-10


@dataclass(frozen=True)
class Spec:
    title: str
    d: int
    B: int = 100
    width: int = 128
    depth: int = 4

    @property
    def widths(self) -> tuple:
        return (self.d,) + (self.width,) * self.depth + (1,)


CASES = {f"x{d}": Spec(f"(x) Poisson {d}-D, randomized Laplacian (S = {S}), tanh {d}-128-128-128-128-1, B = 100", d)
         for d in (100, 1000, 10000)}


def problem(key: str):
    """``(spec, net, X, f)``: the case's network, points and target."""
    spec = CASES[key]
    X = _points(spec.B, spec.d)
    return spec, tanh_mlp(list(spec.widths)), X, torch.sin(X.sum(1, keepdim=True))


def directions(B: int, d: int) -> torch.Tensor:
    """xa's draw for ``samples=S`` with ``torch.Generator().manual_seed(SEED)``: ``(B, S, d)`` Rademacher,
    drawn ``(S, B, d)`` and transposed, as xa documents it."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 2, (S, B, d), generator=g, dtype=torch.float64).mul_(2).sub_(1).transpose(0, 1)


def _xa_estimate(net):
    def estimate(X):
        x = X.detach().requires_grad_(True)
        return xa.laplacian(net(x), x, batch_dim=0, samples=S, generator=torch.Generator().manual_seed(SEED))

    return estimate


def _autograd_estimate(net):
    def estimate(X):
        x = X.detach().requires_grad_(True)
        V = directions(*X.shape)
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        total = 0
        for s in range(S):
            (hv,) = torch.autograd.grad((g * V[:, s]).sum(), x, create_graph=True)
            total = total + (hv * V[:, s]).sum(1, keepdim=True)
        return total / S

    return estimate


ESTIMATES = {"xa": _xa_estimate, "autograd": _autograd_estimate}


def way(key: str, method: str):
    """One method's training step (not torch-jet's): a function returning the parameters' gradients."""
    spec, net, X, f = problem(key)
    estimate = ESTIMATES[method](net)
    params = list(net.parameters())

    def step():
        net.zero_grad(set_to_none=True)
        loss = ((estimate(X) - f) ** 2).mean()
        loss.backward()
        return tuple(torch.zeros_like(p) if p.grad is None else p.grad for p in params)

    return step


# ------------------------------------------------------------------ torch-jet, in its own interpreter

# torch-jet's randomized Laplacian between train.py's head (arguments, data, the network) and tail (the timed step)
JET_CHILD = JET_HEAD + r'''samples = d["samples"]
torch.manual_seed(0)
point = jet.laplacian(net, (X[0],), randomization=("rademacher", samples))
residual = vmap(point, randomness="different")   # each point its own directions
''' + JET_TAIL


def run_jet(key: str, mode: str, reps: int, budget_s: float) -> dict:
    """torch-jet's step in its interpreter: ``{"time" or "peak", "first", "version"}``, or ``{"error": why}``."""
    spec, net, X, f = problem(key)
    return call_jet(JET_CHILD, {"widths": list(spec.widths), "state": net.state_dict(), "X": X, "f": f, "samples": S},
                    mode, reps, budget_s)


# ------------------------------------------------------------------ measuring


def run_case(key: str, reps: int, budget_s: float) -> dict:
    """Time every method's step of one case; compare xa's gradients with autograd's (the same directions)."""
    spec = CASES[key]
    s = {"key": key, "title": spec.title, "times": {}, "first": {}, "diff": None, "jet_version": None}
    grads = in_turn({method: lambda method=method: way(key, method) for method in ESTIMATES}, reps, budget_s, s)
    jet = run_jet(key, "time", reps, budget_s)
    if "error" in jet:
        s["times"]["torch-jet"] = "n/a: " + jet["error"]
    else:
        s["times"]["torch-jet"], s["first"]["torch-jet"] = jet["time"], jet["first"]
        s["jet_version"] = jet["version"]
    if "xa" in grads and "autograd" in grads:
        s["diff"] = rel_diff(grads["xa"], grads["autograd"])
    print(f"\n{spec.title}", flush=True)
    for method, t in s["times"].items():
        if isinstance(t, str):
            print(f"  {method:<10} {t}", flush=True)
            continue
        print(f"  {method:<10} {t:9.4f} s per step  (warm-up step {s['first'][method]:.3f} s)", flush=True)
    ratios = summary_ratios(s)
    if ratios:
        print("  xa is " + ", ".join(f"{r:.2f}x {name}" for name, r in ratios.items()), flush=True)
    if s["diff"] is not None:
        above = f", above {GRAD_TOLERANCE:.0e}" if s["diff"] > GRAD_TOLERANCE else ""
        print(f"  xa's gradients differ from autograd's (the same directions) by {s['diff']:.1e}{above}", flush=True)
    return s


def summary_ratios(s) -> dict:
    """``{method: xa's time / its time}`` for every other method that was timed."""
    xa_t = s["times"].get("xa")
    if not isinstance(xa_t, float):
        return {}
    return {m: xa_t / t for m, t in s["times"].items() if m != "xa" and isinstance(t, float)}


def peaks(s, isolated) -> None:
    """Peak memory of each method's step, each in a fresh process: ``s["peak"] = {method: MB or why not}``."""
    print(f"\n{s['title']}: peak memory of one step after a warm-up, each method in a fresh process", flush=True)
    s["peak"] = {}
    for method in METHODS:
        if method == "torch-jet":
            jet = run_jet(s["key"], "peak", 1, float("inf"))
            mb = "n/a" if "error" in jet else jet["peak"]
        else:
            t, mb, _ = isolated(s["key"], method)
            mb = t if isinstance(t, str) else mb
        s["peak"][method] = mb
        print(f"  {method:<10} {_mb(mb)}", flush=True)


def markdown(summaries) -> str:
    lines = ["| case | xa | autograd (S HVPs) | torch-jet (randomized) | xa / autograd | xa / torch-jet "
             "| grad rel. diff xa vs autograd | peak memory xa / autograd / torch-jet |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        times = s["times"]
        cells = [f"{times[m] * 1000:.1f} ms" if isinstance(times.get(m), float) else "n/a" for m in METHODS]
        ratios = summary_ratios(s)
        cells += [f"**{ratios[m]:.2f}**" if m in ratios else "n/a" for m in ("autograd", "torch-jet")]
        cells.append("" if s["diff"] is None else f"{s['diff']:.1e}")
        cells.append(" / ".join(_mb(s["peak"].get(m)) for m in METHODS) if "peak" in s else "")
        lines.append("| " + " | ".join([s["title"], *cells]) + " |")
    notes = ["", "Time per training step (median); ratios below 1 mean xa is faster. torch-jet draws its own "
             "directions (the same distribution and count), so only xa's and autograd's gradients are compared."]
    versions = {s["jet_version"] for s in summaries if s["jet_version"]}
    if versions:
        notes.append(f"torch-jet: {', '.join(sorted(versions))}, `jet.laplacian(..., randomization=('rademacher', "
                     f"{S}))`, vmap-ed with randomness='different'.")
    failed = {s["key"]: s["times"]["torch-jet"] for s in summaries if isinstance(s["times"].get("torch-jet"), str)}
    if failed:
        notes.append("torch-jet " + "; ".join(f"({k}) {why}" for k, why in failed.items()) + ".")
    return "\n".join(lines + notes) + "\n"

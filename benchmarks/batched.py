"""Per-sample derivatives, ``xa.backward(u, order, batch_dim=0)``, against torch.func.

Imported by ``run.py``, which runs these cases (f)-(i) after (a)-(e), or alone:

    python benchmarks/run.py --only batched                           # (f)-(i)
    python benchmarks/run.py --cases f,i                              # some of them
    python benchmarks/run.py --only batched --plot-batch benchmarks/pinn_batch.png

Every method computes, for each of the B samples, the derivatives of orders
1..N of that sample's output with respect to that sample's input (PINN cases)
or to a weight all samples share (the per-sample Hessian case), in float64.
xa gets them from one call on the batched graph; its ``X.xgrad[k-1]`` has
shape ``(B, 1, d, ..., d)`` and ``W.xgrad[k-1]`` ``(B, 1, W.numel(), ...)``,
which is what torch.func's results are reshaped to.

torch.func is run in the ways a torch user would write it, all orders in one
nested call (lower orders carried out as ``aux``, so they cost nothing
extra), and the faster one in this run is the reference:

- PINN: ``vmap`` over the samples of ``jacrev`` then ``jacfwd`` per further
  order; and the sum trick, valid because samples do not interact: one
  ``vjp`` of the batch's outputs gives every per-sample gradient, and each
  further order is a ``jvp`` along each input direction, ``vmap``-ed over
  the d directions, with the whole batch in every jvp.
- per-sample Hessian: ``vmap`` over samples of ``jacfwd(jacrev)`` (what
  ``torch.func.hessian`` is) and of ``jacrev(jacrev)``, through
  ``functional_call`` with the first weight as the only argument.

The networks are ``nn.Sequential`` of ``nn.Linear`` and ``nn.Tanh`` with
torch's default initialisation; their parameters are frozen
(``requires_grad_(False)``) except the leaf the derivatives are taken of.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacfwd, jacrev, jvp, vjp, vmap

import xa

DT = torch.float64
PLOT_SIZES = (64, 256, 1024, 4096)


@dataclass
class Case:
    title: str
    xa: Callable[[], tuple]
    func: dict[str, Callable[[], tuple]] = field(default_factory=dict)


def tanh_mlp(widths, seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(Linear, Tanh, ..., Linear)`` in float64, torch's default init, seeded."""
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b, dtype=DT))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _points(B: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, d, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ torch.func, all orders in one nested call


def func_nested(f, order: int):
    """``f: z -> v`` to ``z -> (df, ..., d^order f)``: ``jacrev``, then ``jacfwd`` per further order."""

    def g(z):
        v = f(z)
        return v, (v,)

    for k in range(order):
        transform = jacrev if k == 0 else jacfwd

        def g(z, inner=g, transform=transform):
            jac, aux = transform(inner, has_aux=True)(z)
            return jac, aux + (jac,)

    return lambda z: g(z)[1][1:]


def func_sum_trick(model, order: int):
    """``X (B, d) -> (B, 1, d, ..., d)`` per order, for ``model: (B, d) -> (B, 1)`` with independent rows.

    One vjp of the batch's outputs gives every per-sample gradient; each
    further order is a jvp along each of the d input directions (``vmap``
    over the directions, the whole batch in each).
    """

    def first(X):
        v, pull = vjp(model, X)
        grad = pull(torch.ones_like(v))[0].unsqueeze(1)
        return grad, (grad,)

    g = first
    for _ in range(1, order):

        def g(X, inner=g):
            def along(e):
                _, tangent, aux = jvp(inner, (X,), (e.expand_as(X),), has_aux=True)
                return tangent, aux

            eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
            tangent, aux = vmap(along, out_dims=(-1, None))(eye)
            return tangent, aux + (tangent,)

    return lambda X: g(X)[1]


# ------------------------------------------------------------------ the cases


def pinn_case(title: str, widths, B: int, order: int) -> Case:
    model = tanh_mlp(widths).requires_grad_(False)
    X = _points(B, widths[0])

    def run_xa():
        x = X.clone().requires_grad_(True)
        xa.backward(model(x), order, batch_dim=0, create_graph=False)  # values, as torch.func's
        return x.xgrad

    per_sample = vmap(func_nested(model, order))
    sum_trick = func_sum_trick(model, order)
    return Case(title, run_xa, {
        "vmap(jacfwd^k(jacrev))": lambda: per_sample(X),
        "vjp + vmap(jvp) over directions": lambda: sum_trick(X),
    })


def case_f(B: int = 1024, order: int = 4) -> Case:
    return pinn_case(f"(f) PINN tanh 3-64-64-64-64-1, B = {B}, orders 1-{order} w.r.t. the points",
                     [3, 64, 64, 64, 64, 1], B, order)


def case_g(B: int = 1024, order: int = 4) -> Case:
    return pinn_case(f"(g) PINN tanh 2-32-32-32-1, B = {B}, orders 1-{order} w.r.t. the points",
                     [2, 32, 32, 32, 1], B, order)


def case_h(B: int = 4096, order: int = 2) -> Case:
    return pinn_case(f"(h) PINN tanh 3-64-64-64-64-1, B = {B}, orders 1-{order} w.r.t. the points",
                     [3, 64, 64, 64, 64, 1], B, order)


def case_i(B: int = 256) -> Case:
    model = tanh_mlp([8, 32, 32, 4])
    for p in model.parameters():
        p.requires_grad_(False)
    W = model[0].weight.requires_grad_(True)
    X = _points(B, 8)
    Y = torch.randint(0, 4, (B,), generator=torch.Generator().manual_seed(2))
    n = W.numel()

    def run_xa():
        W.xgrad = None   # drop the previous call's 134 MB before making new ones
        xa.backward(F.cross_entropy(model(X), Y, reduction="none"), 2, batch_dim=0, create_graph=False)
        return W.xgrad

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(w, x, y):
        out = functional_call(model, {**params, "0.weight": w}, (x[None],))
        return F.cross_entropy(out, y[None], reduction="none")

    def per_sample(first, second):
        def g(w, x, y):
            def l2(w):
                grad = first(lambda w: loss(w, x, y))(w)
                return grad, grad

            hess, grad = second(l2, has_aux=True)(w)
            return grad.reshape(1, n), hess.reshape(1, n, n)

        g = vmap(g, in_dims=(None, 0, 0))
        return lambda: g(params["0.weight"], X, Y)

    return Case(f"(i) MLP 8-32-32-4 + cross_entropy(reduction='none'), B = {B}, per-sample Hessians w.r.t. "
                "the first weight (256 entries)", run_xa, {
                    "vmap(jacfwd(jacrev)) = hessian": per_sample(jacrev, jacfwd),
                    "vmap(jacrev(jacrev))": per_sample(jacrev, jacrev),
                })


CASES = {"f": case_f, "g": case_g, "h": case_h, "i": case_i}

# ------------------------------------------------------------------ measuring


def max_error(got, ref) -> float:
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
        raise ValueError(f"shapes differ: {[tuple(g.shape) for g in got]} vs torch.func "
                         f"{[tuple(r.shape) for r in ref]}")
    return max((g - r).abs().max().item() for g, r in zip(got, ref))


def measure(fn, reps: int, budget_s: float, first_alone: bool = False):
    """``(median seconds, first call's seconds, result)``: one warm-up call, then up to ``reps`` timed.

    As run.py's ``measure``, but at least one call after the warm-up is always
    timed (xa's first call at a new shape plans, which can take longer than
    the budget's half after which run.py keeps the warm-up alone), and no
    peak memory. ``first_alone``: where the first call alone took more than half
    the budget it is the only sample (a call with nothing to warm up, such as
    torch.func's ``vmap`` of ``hessian``, too slow to repeat).
    """
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first_alone and first > budget_s / 2:  # (a call with nothing to warm up, too slow to repeat)
        return first, first, result
    times = []
    while not times or (len(times) < reps and sum(times) + times[0] < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, result


def peer_python(variable: str, venv: str) -> Path | None:
    """A peer's interpreter: the environment variable ``variable``, else ``.<venv>`` in the repository or
    ``<venv>`` beside it (``venv-folx``, ``venv-jet``), else None."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    root = Path(__file__).resolve().parent.parent
    for place in (root / f".{venv}", root.parent / venv):
        if (place / "bin" / "python").exists():
            return place / "bin" / "python"
    return None


def in_turn(makers: dict, reps: int, budget_s: float, s: dict, failed: str = "failed") -> dict:
    """Time several methods in turn; returns ``{name: what its warm-up call returned}``.

    ``makers[name]()`` gives the method's call. Each is made and called once (the warm-up, its seconds in
    ``s["first"]``), then all are called in turn, round after round, up to ``reps`` rounds while their
    time stays under ``budget_s`` each: a machine that slows down or speeds up during the case weighs on
    every method alike, and the ratios of the medians (``s["times"]``) stay put. A method that fails is
    reported in ``s["times"]`` as ``"<failed>: <error>"``, not raised: the others still run.
    """
    results, calls = {}, {}
    for name, make in makers.items():
        try:
            call = make()
            start = time.perf_counter()
            results[name] = call()  # the warm-up (xa plans at its first call)
            s["first"][name] = time.perf_counter() - start
            calls[name] = call
        except Exception as exc:
            s["times"][name] = f"{failed}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    times = {name: [] for name in calls}
    spent = 0.0
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        spent += sum(t[-1] for t in times.values())
        if spent > budget_s * max(len(calls), 1):
            break
    for name, t in times.items():
        s["times"][name] = statistics.median(t)
    return results


def run_case(key: str, reps: int, budget_s: float, case: Case | None = None) -> dict:
    """Measure xa and every torch.func way of one case; print them; return the summary.

    ``{"key", "title", "xa": seconds or why it failed, "xa_first": xa's first call (plans), "func":
    seconds of the fastest torch.func way, "func_name", "err", "ways": {name: seconds}, "way_errs":
    {name: max abs difference from the fastest way}}``.
    """
    case = case or CASES[key]()
    ways, results = {}, {}
    for name, fn in case.func.items():
        t, _, res = measure(fn, reps, budget_s)
        ways[name], results[name] = t, res
    best = min(ways, key=ways.get)
    ref = results[best]
    summary = {"key": key, "title": case.title, "func": ways[best], "func_name": best, "ways": ways, "err": None}
    summary["way_errs"] = {name: max_error(res, ref) for name, res in results.items()}
    spread = max(summary["way_errs"].values())
    del results, res
    try:
        t, first, res = measure(case.xa, reps, budget_s)
        summary.update(xa=t, xa_first=first, err=max_error(res, ref))
        del res
    except Exception as exc:  # an engine without batch_dim, or a wrong result shape
        summary["xa"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"\n{case.title}", flush=True)
    for name, t in ways.items():
        mark = "  <- reference" if name == best else ""
        print(f"  torch.func {name:<34} {t:9.4f} s{mark}", flush=True)
    print(f"  (torch.func ways agree to {spread:.1e})")
    if isinstance(summary["xa"], str):
        print(f"  xa {summary['xa']}", flush=True)
    else:
        print(f"  xa{'':<43} {summary['xa']:9.4f} s  {summary['xa'] / summary['func']:.2f}x torch.func  "
              f"max err {summary['err']:.1e}  (first call, which plans: {summary['xa_first']:.3f} s)", flush=True)
    return summary


def markdown(summaries) -> str:
    """docs/benchmarks.md's table: one row per case, xa against each torch.func way (the reference first)."""
    lines = ["| case | xa | torch.func `vmap` of nested `jacrev`/`jacfwd` | xa / that | torch.func's other way "
             "| xa / that | max abs error xa vs torch.func |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        (nested, t_nested), (other, t_other) = _ways(s)
        if isinstance(s["xa"], str):
            lines.append(f"| {s['title']} | {s['xa']} | {t_nested:.4f} s | | {other}: {t_other:.4f} s | | |")
            continue
        lines.append(f"| {s['title']} | {s['xa']:.4f} s | {t_nested:.4f} s | **{s['xa'] / t_nested:.2f}** | "
                     f"{other}: {t_other:.4f} s | **{s['xa'] / t_other:.2f}** | {s['err']:.1e} |")
    return "\n".join(lines) + "\n"


def _ways(s) -> tuple:
    """``((name, seconds) of vmap over samples of nested Jacobians, (name, seconds) of the other way)``."""
    items = sorted(s["ways"].items(), key=lambda kv: not kv[0].startswith("vmap(jacfwd"))
    return items[0], items[1]


def plot(path: Path, budget_s: float, sizes=PLOT_SIZES) -> None:
    """Time against B for case (f), xa and the faster torch.func way per B; a CSV beside, a PNG if matplotlib."""
    series = {"xa": [], "torch.func": []}
    for B in sizes:
        case = case_f(B=B)
        func = min(measure(fn, 3, budget_s / 4)[0] for fn in case.func.values())
        try:
            xa_t, xa_first, _ = measure(case.xa, 3, budget_s / 4)
        except Exception as exc:
            print(f"plot: xa failed at B = {B} ({type(exc).__name__}: {exc}); no plot")
            return
        series["xa"].append(xa_t)
        series["torch.func"].append(func)
        print(f"  B = {B:5d}: xa {xa_t:.4f} s, torch.func {func:.4f} s, ratio {xa_t / func:.2f}  "
              f"(xa's first call, which plans: {xa_first:.3f} s)", flush=True)
    save_series(Path(path), "B", list(sizes), series, "(f) PINN 3-64-64-64-64-1, orders 1-4 per point",
                "B (points)", log2_x=True)


def save_series(path: Path, xname: str, xs: list, series: dict, title: str, xlabel: str,
                log2_x: bool = False) -> str:
    """Times per method against ``xs``: a CSV beside ``path`` and, with matplotlib, a PNG at ``path``.

    Returns the CSV's text. ``log2_x``: both axes logarithmic, ``xs`` as powers of two; else only the times.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    csv = f"{xname}," + ",".join(series) + "\n" + "".join(
        f"{x}," + ",".join(f"{series[m][i]:.5f}" for m in series) + "\n" for i, x in enumerate(xs))
    path.with_suffix(".csv").write_text(csv)
    print(f"wrote {path.with_suffix('.csv')}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG, the CSV only")
        return csv
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, ts in series.items():
        (ax.loglog if log2_x else ax.semilogy)(xs, ts, marker="o", label=method)
    if log2_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return csv

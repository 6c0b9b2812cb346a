"""One PINN training step: forward pass, PDE operator, loss, backward to every parameter.

Imported by ``run.py``, which runs these cases (q)-(u) alone:

    python benchmarks/run.py --only train          # (q)-(u)
    python benchmarks/run.py --cases q,t           # some of them

Every method does, in float64 on the CPU, what a PINN's training loop does
once per step: zero the parameters' gradients, run the network
``u = net(X)`` on ``B`` points ``X`` of shape ``(B, d)``, apply the PDE
operator per point, take ``loss = mean((residual - f)^2)`` for a fixed
``f`` and call ``loss.backward()``. The operators are the Laplacian (q: 2-D,
s: 16-D), ``u_t - 0.1 u_xx`` of the heat equation (r), the biharmonic
``sum_(i,j) u_iijj`` of a Kirchhoff plate (t) and ``u_t + 6 u u_x + u_xxx``
of the KdV equation (u), for points ``(t, x)`` in (r) and (u). The networks
are ``nn.Sequential`` of ``nn.Linear`` and ``nn.Tanh``, torch's default
initialisation, seeded; every method starts from the same parameters.

The methods:

- ``xa``: the operator from one call on the batch (``batch_dim=0``):
  ``xa.laplacian``, ``xa.differential_operator``, ``xa.biharmonic``, and
  ``xa.partials`` for the KdV terms; xa records its own execution for
  autograd, so the loss backpropagates through it.
- ``autograd``: nested ``torch.autograd.grad(..., create_graph=True)`` as
  DeepXDE computes residuals: the gradient of ``u.sum()`` w.r.t. ``X``, then
  for each needed column the gradient of that column's sum, and so on (the
  biharmonic is that Laplacian applied twice).
- ``torch.func``: ``vmap`` over the points of ``hessian`` (Laplacian; heat,
  with the gradient carried out as ``aux``) or of nested ``jacfwd`` over
  ``jacrev`` (``jacfwd(jacfwd(hessian))`` contracted ``iijj`` for the
  biharmonic, the third derivative for KdV), the network called through
  ``functional_call``.
- ``torch-jet`` (``jet-for-pytorch``, Taylor mode): ``jet.laplacian`` (q, s)
  and ``jet.bilaplacian`` (t), collapsed; for (r) and (u), which it has no
  operator for, ``jet.jet`` along ``e_t`` (order 1) and ``e_x`` (order 2 or
  3). Each per point, traced with ``jet.capture_graph``, simplified by
  ``jet.common_subexpression_elimination`` (the authors' benchmark does the
  same) and ``vmap``-ed. torch-jet needs Python >= 3.12, so it runs in a
  child process with its own interpreter (``XA_BENCH_JET_PYTHON``, else
  ``.venv-jet/`` in the repository or ``venv-jet/`` beside it); made with

      python3.12 -m venv .venv-jet && .venv-jet/bin/pip install torch==<this torch> jet-for-pytorch

  Without it, its column reads "n/a" and the reason is printed.

Times are medians of up to ``--reps`` steps after one warm-up step (xa plans
at its first call; torch-jet traces before it). A case's methods take their
steps in turn, round after round, in one process with glibc's default malloc
settings, as the query cases, so that a machine whose speed drifts during a
case weighs on every method alike (torch-jet's run after them, in a child of
that process, with the same settings). Peak
memory is run.py's: the growth of the resident set during one step after a
warm-up, each method in a fresh process. The parameter gradients of every
method are compared with autograd's: the largest, over the parameter
tensors, of ``max|g - g_autograd| / max|g_autograd|``. The table goes to
``results/train.md``.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from batched import _points, in_turn, peer_python, tanh_mlp
from torch.func import functional_call, hessian, jacfwd, jacrev, vmap

import xa

HERE = Path(__file__).resolve().parent
METHODS = ("xa", "autograd", "torch.func", "torch-jet")
TORCH_METHODS = ("autograd", "torch.func")
GRAD_TOLERANCE = 1e-10   # xa's parameter gradient against autograd's, relative
JET_TIMEOUT_S = 600.0
HEAT = {1: {(0,): 1.0}, 2: {(1, 1): -0.1}}   # u_t - 0.1 u_xx, entries 0 = t, 1 = x


@dataclass(frozen=True)
class Spec:
    title: str
    widths: tuple
    B: int
    op: str   # "laplacian", "heat", "biharmonic" or "kdv"


CASES = {
    "q": Spec("(q) Poisson 2-D, Laplacian, tanh 2-64-64-64-64-1, B = 2048", (2, 64, 64, 64, 64, 1), 2048,
              "laplacian"),
    "r": Spec("(r) heat 1-D, u_t - 0.1 u_xx, tanh 2-64-64-64-1, B = 2048", (2, 64, 64, 64, 1), 2048, "heat"),
    "s": Spec("(s) Poisson 16-D, Laplacian, tanh 16-128-128-128-1, B = 256", (16, 128, 128, 128, 1), 256,
              "laplacian"),
    "t": Spec("(t) Kirchhoff plate, biharmonic, tanh 2-32-32-32-1, B = 512", (2, 32, 32, 32, 1), 512,
              "biharmonic"),
    "u": Spec("(u) KdV, u_t + 6 u u_x + u_xxx, tanh 2-64-64-64-1, B = 2048", (2, 64, 64, 64, 1), 2048, "kdv"),
}

JET_API = {"laplacian": "jet.laplacian", "biharmonic": "jet.bilaplacian",
           "heat": "jet.jet along e_t (order 1) and e_x (order 2)",
           "kdv": "jet.jet along e_t (order 1) and e_x (order 3)"}


def problem(key: str):
    """``(spec, net, X, f)``: the case's network (parameters requiring grad), points and target."""
    spec = CASES[key]
    X = _points(spec.B, spec.widths[0])
    # any fixed target will do; a smooth one keeps the loss's scale ordinary
    f = torch.sin(X.sum(1, keepdim=True))
    return spec, tanh_mlp(list(spec.widths)), X, f


# ------------------------------------------------------------------ the residuals


def _xa_residual(net, op):
    def residual(X):
        x = X.detach().requires_grad_(True)
        u = net(x)
        if op == "laplacian":
            return xa.laplacian(u, x, batch_dim=0)
        if op == "heat":
            return xa.differential_operator(u, x, HEAT, batch_dim=0)
        if op == "biharmonic":
            return xa.biharmonic(u, x, batch_dim=0)
        u_t, u_x, u_xxx = xa.partials(u, x, [(0,), (1,), (1, 1, 1)], batch_dim=0)
        return u_t + 6 * u * u_x + u_xxx

    return residual


def _grad(y, x):
    """Every point's gradient of ``y (B, 1)``: points do not interact, so one gradient of the sum."""
    return torch.autograd.grad(y.sum(), x, create_graph=True)[0]


def _autograd_laplacian(y, x):
    g = _grad(y, x)
    return sum(_grad(g[:, i:i + 1], x)[:, i:i + 1] for i in range(x.shape[1]))


def _autograd_residual(net, op):
    def residual(X):
        x = X.detach().requires_grad_(True)
        u = net(x)
        if op == "laplacian":
            return _autograd_laplacian(u, x)
        if op == "biharmonic":
            return _autograd_laplacian(_autograd_laplacian(u, x), x)
        g = _grad(u, x)
        u_t, u_x = g[:, 0:1], g[:, 1:2]
        u_xx = _grad(u_x, x)[:, 1:2]
        if op == "heat":
            return u_t - 0.1 * u_xx
        return u_t + 6 * u * u_x + _grad(u_xx, x)[:, 1:2]

    return residual


def _with_lower(transform, inner):
    """``transform`` (jacrev or jacfwd) of ``inner: z -> (d^k, (v, .., d^k))``: ``z -> (d^(k+1), (v, .., d^(k+1)))``.

    The lower orders come out as ``aux``, so they cost nothing extra.
    """

    def g(z):
        jac, lower = transform(inner, has_aux=True)(z)
        return jac, lower + (jac,)

    return g


def _func_residual(net, op):
    # functional_call with the module's own parameters, as torch.func code is written: being the tensors
    # the optimiser updates, loss.backward() reaches them through vmap
    params = dict(net.named_parameters())

    def point(z):
        return functional_call(net, params, (z,)).squeeze(-1)

    if op == "laplacian":
        per_point = vmap(lambda z: hessian(point)(z).trace())
        return lambda X: per_point(X).unsqueeze(-1)
    if op == "biharmonic":
        per_point = vmap(lambda z: torch.einsum("iijj->", jacfwd(jacfwd(hessian(point)))(z)))
        return lambda X: per_point(X).unsqueeze(-1)
    order = 2 if op == "heat" else 3

    def value(z):
        v = point(z)
        return v, (v,)

    g = _with_lower(jacrev, value)
    for _ in range(1, order):   # jacfwd over jacrev: at order 2 this is torch.func.hessian
        g = _with_lower(jacfwd, g)
    per_point = vmap(lambda z: g(z)[1])

    def residual(X):
        derivatives = per_point(X)
        u, du, d2u = derivatives[:3]
        if op == "heat":
            return (du[:, 0] - 0.1 * d2u[:, 1, 1]).unsqueeze(-1)
        d3u = derivatives[3]
        return (du[:, 0] + 6 * u * du[:, 1] + d3u[:, 1, 1, 1]).unsqueeze(-1)

    return residual


RESIDUALS = {"xa": _xa_residual, "autograd": _autograd_residual, "torch.func": _func_residual}


def training_step(net, residual, X, f):
    """One step, a function of no arguments returning the parameters' gradients (zeros where none)."""
    params = list(net.parameters())

    def step():
        net.zero_grad(set_to_none=True)
        loss = ((residual(X) - f) ** 2).mean()
        loss.backward()
        # the Laplacian's residual does not depend on the last bias: autograd leaves its grad at None
        return tuple(torch.zeros_like(p) if p.grad is None else p.grad for p in params)

    return step


def way(key: str, method: str):
    """One method's training step of a case (not torch-jet's, which runs in its own interpreter)."""
    spec, net, X, f = problem(key)
    return training_step(net, RESIDUALS[method](net, spec.op), X, f)


def rel_diff(got, ref) -> float:
    """The largest, over the parameter tensors, of ``max|got - ref| / max|ref|`` (absolute where ref is 0)."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        scale = r.abs().max().item()
        worst = max(worst, (g - r).abs().max().item() / (scale if scale > 0 else 1.0))
    return worst

# ------------------------------------------------------------------ torch-jet, in its own interpreter

# Self-contained: torch-jet's interpreter has neither xa nor this repository on its path. The head reads the
# arguments, the points, the targets and the network; a case's own lines make ``residual`` from ``net``; the
# tail times (or measures the peak of) a training step on it and saves the result.
JET_HEAD = r'''
import platform, statistics, sys, time
from importlib.metadata import version

import torch
from torch import nn
from torch.func import vmap

import jet

data, out, mode, reps, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
d = torch.load(data)
widths, X, f = d["widths"], d["X"], d["f"]
layers = []
for i, (a, b) in enumerate(zip(widths, widths[1:])):
    layers.append(nn.Linear(a, b, dtype=torch.float64))
    if i < len(widths) - 2:
        layers.append(nn.Tanh())
net = nn.Sequential(*layers)
net.load_state_dict(d["state"])
'''

JET_TAIL = r'''params = list(net.parameters())


def step():
    net.zero_grad(set_to_none=True)
    loss = ((residual(X) - f) ** 2).mean()
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def rss_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])


start = time.perf_counter()
grads = step()
first = time.perf_counter() - start
where = f"jet-for-pytorch {version('jet-for-pytorch')} (torch {torch.__version__}, Python {platform.python_version()})"
result = {"version": where, "first": first, "grads": grads, "time": None, "peak": None}
if mode == "peak":
    del grads
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    step()
    result["peak"] = (rss_kb("VmHWM") - base) / 1024
else:
    times = []
    while not times or (len(times) < reps and sum(times) + times[0] < budget):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result["time"] = statistics.median(times)
torch.save(result, out)
'''

JET_CHILD = JET_HEAD + r'''op = d["op"]
z0 = X[0]
e_t, e_x = torch.eye(X.shape[1], dtype=X.dtype)[:2]

if op == "laplacian":
    point = jet.laplacian(net, (z0,))
elif op == "biharmonic":
    point = jet.bilaplacian(net, (z0,))
else:
    taylor = jet.jet(net, (z0,))

    def point(z):
        zero = torch.zeros_like(z)
        u, u_t = taylor((z, e_t))
        if op == "heat":
            _, _, u_xx = taylor((z, e_x, zero))
            return u_t - 0.1 * u_xx
        _, u_x, _, u_xxx = taylor((z, e_x, zero, zero))
        return u_t + 6 * u * u_x + u_xxx

point, _ = jet.capture_graph(point, (z0,))
jet.common_subexpression_elimination(point.graph)
point.recompile()
residual = vmap(point)
''' + JET_TAIL


def jet_python() -> Path | None:
    """torch-jet's interpreter: ``XA_BENCH_JET_PYTHON``, else ``.venv-jet`` in the repository or beside it."""
    return peer_python("XA_BENCH_JET_PYTHON", "venv-jet")


def run_jet(key: str, mode: str, reps: int, budget_s: float) -> dict:
    """torch-jet's step of a case in its interpreter: ``{"time" or "peak", "first", "grads", "version"}``,
    or ``{"error": why}``. ``mode`` is ``"time"`` or ``"peak"``; the child inherits this process's malloc
    settings, so its peak is taken as run.py's children take theirs."""
    spec, net, X, f = problem(key)
    return call_jet(JET_CHILD, {"widths": list(spec.widths), "state": net.state_dict(), "X": X, "f": f, "op": spec.op},
                    mode, reps, budget_s)


def call_jet(child: str, data: dict, mode: str, reps: int, budget_s: float) -> dict:
    """Run ``child`` (:data:`JET_HEAD`, a case's lines, :data:`JET_TAIL`) on ``data`` in torch-jet's interpreter."""
    python = jet_python()
    if python is None or not python.exists():
        return {"error": f"no torch-jet interpreter ({python or 'set XA_BENCH_JET_PYTHON'})"}
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "data.pt", Path(tmp) / "out.pt"
        torch.save(data, path)
        cmd = [str(python), "-c", child, str(path), str(out), mode, str(reps), str(budget_s)]
        try:
            subprocess.run(cmd, check=True, timeout=JET_TIMEOUT_S, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"gave up after {JET_TIMEOUT_S:.0f} s"}
        except (OSError, subprocess.CalledProcessError) as err:
            lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
            return {"error": "failed: " + (lines[-1] if lines else f"exit status {err.returncode}")}
        return torch.load(out)

# ------------------------------------------------------------------ measuring


def run_case(key: str, reps: int, budget_s: float) -> dict:
    """Time every method's step of one case and compare its gradients with autograd's; print them.

    Returns ``{"key", "title", "op", "times": {method: seconds or why it failed}, "first": {method: seconds of
    the warm-up step}, "diffs": {method: relative difference from autograd's gradients}, "jet_version"}``;
    run.py adds ``"peak": {method: MB or why not}``.
    """
    spec = CASES[key]
    s = {"key": key, "title": spec.title, "op": spec.op, "times": {}, "first": {}, "diffs": {},
         "jet_version": None}
    grads = in_turn({method: lambda method=method: way(key, method) for method in RESIDUALS}, reps, budget_s, s)
    jet = run_jet(key, "time", reps, budget_s)
    if "error" in jet:
        s["times"]["torch-jet"] = "n/a: " + jet["error"]
    else:
        s["times"]["torch-jet"], s["first"]["torch-jet"], grads["torch-jet"] = jet["time"], jet["first"], jet["grads"]
        s["jet_version"] = jet["version"]
    if "autograd" in grads:
        s["diffs"] = {m: rel_diff(g, grads["autograd"]) for m, g in grads.items() if m != "autograd"}
    print(f"\n{spec.title}", flush=True)
    for method, t in s["times"].items():
        if isinstance(t, str):
            print(f"  {method:<11} {t}", flush=True)
            continue
        diff = s["diffs"].get(method)
        agree = "" if diff is None else f"  gradients differ from autograd's by {diff:.1e} (relative)"
        print(f"  {method:<11} {t:9.4f} s per step  (warm-up step {s['first'][method]:.3f} s){agree}", flush=True)
    ratios = summary_ratios(s)
    if ratios:
        print("  xa is " + ", ".join(f"{r:.2f}x {name}" for name, r in ratios.items()), flush=True)
    diff = s["diffs"].get("xa")
    if diff is not None and diff > GRAD_TOLERANCE:
        print(f"  xa's gradients differ from autograd's by {diff:.1e}, above {GRAD_TOLERANCE:.0e}", flush=True)
    return s


def fastest_torch(s) -> tuple | None:
    """``(method, seconds)`` of the faster of autograd and torch.func, or None if neither ran."""
    timed = {m: s["times"][m] for m in TORCH_METHODS if isinstance(s["times"].get(m), float)}
    return min(timed.items(), key=lambda kv: kv[1]) if timed else None


def summary_ratios(s) -> dict:
    """``{"<fastest torch method>": xa / it, "torch-jet": xa / it}``, where both were timed."""
    xa_t = s["times"].get("xa")
    if not isinstance(xa_t, float):
        return {}
    out = {}
    best = fastest_torch(s)
    if best:
        out[best[0]] = xa_t / best[1]
    if isinstance(s["times"].get("torch-jet"), float):
        out["torch-jet"] = xa_t / s["times"]["torch-jet"]
    return out


def peaks(s, isolated) -> None:
    """Peak memory of each method's step, each in a fresh process: ``s["peak"] = {method: MB or why not}``.

    ``isolated(key, method)`` is run.py's measurement in a child, returning ``(seconds or why, MB, result)``.
    """
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
        print(f"  {method:<11} {_mb(mb)}", flush=True)


def _mb(mb) -> str:
    if isinstance(mb, str):
        return mb
    return "n/a" if mb is None else f"{max(mb, 0.0):.0f} MB"


def _time(t) -> str:
    return t if isinstance(t, str) else f"{t * 1000:.1f} ms"


def markdown(summaries) -> str:
    """One row per case: every method's time per step, xa's ratios, the gradients' agreement, peaks."""
    lines = ["| case | xa | autograd (nested grad) | torch.func | torch-jet | xa / fastest torch | xa / torch-jet "
             "| grad rel. diff xa vs autograd | peak memory xa / autograd / torch.func / torch-jet |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        times = s["times"]
        # torch-jet's reason for "n/a" is long; it goes under the table
        cells = [_time(times[m]) if m != "torch-jet" or isinstance(times[m], float) else "n/a" for m in METHODS]
        ratios = summary_ratios(s)
        best = fastest_torch(s)
        cells.append(f"**{ratios[best[0]]:.2f}** ({best[0]})" if best and best[0] in ratios else "")
        cells.append(f"**{ratios['torch-jet']:.2f}**" if "torch-jet" in ratios else "n/a")
        diff = s["diffs"].get("xa")
        cells.append("" if diff is None else f"{diff:.1e}" + (" (above tolerance)" if diff > GRAD_TOLERANCE else ""))
        cells.append(" / ".join(_mb(s["peak"].get(m)) for m in METHODS) if "peak" in s else "")
        lines.append("| " + " | ".join([s["title"], *cells]) + " |")
    versions = {s["jet_version"] for s in summaries if s["jet_version"]}
    notes = ["", "Time per training step (median); ratios below 1 mean xa is faster."]
    if versions:
        used = "; ".join(f"{s['key']}: `{JET_API[s['op']]}`" for s in summaries)
        notes.append(f"torch-jet: {', '.join(sorted(versions))}, collapsed where it has the operator, "
                     f"traced, CSE-simplified and vmap-ed: {used}.")
    failed = {s["key"]: s["times"]["torch-jet"] for s in summaries if isinstance(s["times"].get("torch-jet"), str)}
    if failed:
        notes.append("torch-jet " + "; ".join(f"({k}) {why}" for k, why in failed.items()) + ".")
    return "\n".join(lines + notes) + "\n"

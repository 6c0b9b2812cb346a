"""A Laplacian whose Jacobians are sparse: folx's README workload, against folx (JAX) and torch.func.

Imported by ``run.py``, which runs these cases (v) and (w) alone:

    python benchmarks/run.py --only sparse         # (v) and (w)
    python benchmarks/run.py --cases w             # one of them

The network is folx's README example of its automatic sparsity: ten layers
of ``Linear(100)`` + SiLU applied to each node of an input ``X`` of shape
``(B, 100, 4)`` (100 nodes of 4 features; the first layer is 4 -> 100),
then ``Linear(1)`` and the sum over the nodes, ``u`` one number per sample.
The query is the Laplacian of ``u`` over each sample's 400 inputs, at
``B = 4`` and ``B = 20``, in float64:

- (v) that network: each node's features depend on its own 4 inputs only, so
  every Jacobian on the way has at most 4 nonzeros per row;
- (w) the same with one mixing layer in the middle: after layer 5 the mean
  over the nodes is concatenated to each node's features (so layer 6 is
  200 -> 100), and from there on every feature depends on all 400 inputs.

The methods, on the same weights (drawn in numpy with a seed, ``W`` of
layer ``i`` normal with variance ``1 / fan_in``, biases normal with standard
deviation 0.1) and the same points:

- ``xa``: ``xa.laplacian(net(x), x, batch_dim=0)``, the network an
  ``nn.Module`` of ``nn.Linear`` layers and ``F.silu``;
- ``xa dense``: the same call with xa's automatic block sparsity turned off
  (``xa.sparsity.ENABLED = False`` while it plans and runs: the dense plan);
  where this xa has no such switch the call is the same as ``xa``'s and its
  time is not taken twice;
- ``torch.func``: ``vmap`` over the samples of the trace of ``hessian``
  (the reference, the network called as a function of one sample);
- ``folx sparse`` and ``folx dense``: ``jax.jit(jax.vmap(...))`` of
  ``folx.forward_laplacian(f, sparsity_threshold)(x).laplacian`` with the
  README's threshold 4 (``FOLX_SPARSITY``) and 0, the network written in
  ``jax.numpy``; in an interpreter of its own (``benchmarks/folx_peer.py``,
  run by ``XA_FOLX_PYTHON``, else ``.venv-folx/`` in the repository or
  ``venv-folx/`` beside it), made with

      python3 -m venv .venv-folx && .venv-folx/bin/pip install jax folx

  Without it the folx columns read "not installed" and the reason is
  printed.

Times are medians of up to ``--reps`` calls after a first call (xa plans,
folx traces and compiles; JAX's calls end in ``block_until_ready``), while
their sum stays under ``--budget``; a method whose first call alone took
more than half the budget is timed by that call only (torch.func at
``B = 20``). The torch methods run in one process with glibc's default
malloc settings (run.py's ``--sparse-child``), folx's in its child. Every
method's Laplacians are compared with torch.func's (with xa's where
torch.func failed): the largest absolute difference. The table goes to
``results/sparse.md``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from batched import measure, peer_python
from torch import nn
from torch.func import hessian, vmap

import xa

HERE = Path(__file__).resolve().parent
DT = torch.float64
NODES, FEATURES, WIDTH, DEPTH = 100, 4, 100, 10
SIZES = (4, 20)                 # the batch sizes B of each case
FOLX_SPARSITY = 4               # folx's sparsity_threshold in its README's example of this network
FOLX_TIMEOUT_S = 1200.0         # seconds before folx's child is given up
METHODS = ("xa", "xa dense", "torch.func", "folx sparse", "folx dense")


@dataclass(frozen=True)
class Spec:
    title: str
    mix: int   # the layer whose input gets the mean over nodes concatenated, or -1


CASES = {
    "v": Spec("(v) folx's README MLP, 10 x (Linear 100 + SiLU) per node, (B, 100, 4), Laplacian", -1),
    "w": Spec("(w) the same with a mixing layer after layer 5 (node mean concatenated, Linear 200 -> 100), "
              "Laplacian", 5),
}


def weights(mix: int, seed: int = 0) -> list:
    """``[(W, b), ...]`` in numpy, ``W`` shaped ``(out, in)``: the ten hidden layers and the last, Linear(1)."""
    rng = np.random.default_rng(seed)
    fan_in = [FEATURES] + [2 * WIDTH if i == mix else WIDTH for i in range(1, DEPTH)] + [WIDTH]
    fan_out = [WIDTH] * DEPTH + [1]
    return [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o)) for i, o in zip(fan_in, fan_out)]


def points(B: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed + B).standard_normal((B, NODES, FEATURES))


class NodeMLP(nn.Module):
    """``X (..., nodes, 4) -> u (..., 1)``: Linear + SiLU per node (the mixing layer at ``mix``), Linear(1), sum."""

    def __init__(self, params, mix: int):
        super().__init__()
        self.mix = mix
        self.layers = nn.ModuleList(nn.Linear(W.shape[1], W.shape[0], dtype=DT) for W, _ in params)
        with torch.no_grad():
            for layer, (W, b) in zip(self.layers, params):
                layer.weight.copy_(torch.from_numpy(W))
                layer.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        for i, layer in enumerate(self.layers[:-1]):
            if i == self.mix:
                x = torch.cat([x, x.mean(-2, keepdim=True).expand_as(x)], -1)
            x = F.silu(layer(x))
        return self.layers[-1](x).sum(-2)


DENSE_SWITCH = "xa.sparsity.ENABLED = False"   # how xa is told to plan without block sparsity


def xa_dense():
    """A context manager under which xa plans without block sparsity, or None where this xa has no switch."""
    try:
        module = importlib.import_module("xa.sparsity")
    except ImportError:
        return None
    if not hasattr(module, "ENABLED"):
        return None

    @contextmanager
    def dense():
        was = module.ENABLED
        module.ENABLED = False   # read when a request is made: its plan is cached apart from the sparse one
        try:
            yield
        finally:
            module.ENABLED = was

    return dense


def _xa(net, X, dense=None):
    def run():
        x = X.clone().requires_grad_(True)
        if dense is None:
            return xa.laplacian(net(x), x, batch_dim=0, create_graph=False).squeeze(-1)
        with dense():
            return xa.laplacian(net(x), x, batch_dim=0, create_graph=False).squeeze(-1)

    return run


def _func(net, X):
    n = NODES * FEATURES
    per_sample = vmap(lambda z: hessian(lambda v: net(v.view(NODES, FEATURES)).squeeze(-1))(z.flatten())
                      .view(n, n).trace())
    return lambda: per_sample(X)

# ------------------------------------------------------------------ folx, in its own interpreter


def folx_python() -> Path | None:
    """folx's interpreter: ``XA_FOLX_PYTHON``, else ``.venv-folx`` in the repository or ``venv-folx`` beside it."""
    return peer_python("XA_FOLX_PYTHON", "venv-folx")


def run_folx(params, mix: int, Xs: dict, reps: int, budget_s: float) -> dict:
    """folx's Laplacians and times for every ``X`` of ``Xs`` (``{B: X}``): ``{"version", "<variant>_<B>", ...}``
    as ``folx_peer.py`` writes them, or ``{"error": why}``."""
    python = folx_python()
    if python is None or not python.exists():
        return {"error": f"not installed (no folx interpreter: {python or 'set XA_FOLX_PYTHON'})"}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        arrays = {f"X_{B}": X for B, X in Xs.items()}
        for i, (W, b) in enumerate(params):
            arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        np.savez(inp, mix=np.array(mix), sparsity=np.array(FOLX_SPARSITY), **arrays)
        cmd = [str(python), str(HERE / "folx_peer.py"), str(inp), str(out), str(reps), str(budget_s)]
        try:
            done = subprocess.run(cmd, check=True, timeout=FOLX_TIMEOUT_S, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"gave up after {FOLX_TIMEOUT_S:.0f} s"}
        except (OSError, subprocess.CalledProcessError) as err:
            lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
            if any("No module named" in line for line in lines):
                return {"error": "not installed (" + lines[-1] + f", in {python})"}
            return {"error": "failed: " + (lines[-1] if lines else f"exit status {err.returncode}")}
        print("".join("    " + line + "\n" for line in done.stdout.splitlines()), end="", flush=True)
        with np.load(out) as saved:
            return {k: saved[k].item() if saved[k].ndim == 0 else saved[k] for k in saved.files}

# ------------------------------------------------------------------ measuring


def _failed(exc: Exception) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_case(key: str, reps: int, budget_s: float) -> dict:
    """Time every method of one case at each ``B`` of ``SIZES``, compare their Laplacians; print them.

    Returns ``{"key", "title", "dense": the dense plan's switch or None, "folx_version", "rows": [{"B", "times":
    {method: seconds or why not}, "first": {method: seconds}, "errs": {method: max abs difference from the
    reference}, "ref": the reference method, "scale": max |Laplacian|}]}``.
    """
    spec = CASES[key]
    params = weights(spec.mix)
    net = NodeMLP(params, spec.mix).requires_grad_(False)
    Xs = {B: points(B) for B in SIZES}
    dense = xa_dense()
    s = {"key": key, "title": spec.title, "dense": DENSE_SWITCH if dense else None, "folx_version": None,
         "folx_error": None, "rows": []}
    print(f"\n{spec.title}", flush=True)
    values = {}
    for B, X_np in Xs.items():
        X = torch.from_numpy(X_np)
        row = {"B": B, "times": {}, "first": {}, "errs": {}}
        ways = {"xa": _xa(net, X), "torch.func": _func(net, X)}
        if dense is not None:
            ways["xa dense"] = _xa(net, X, dense)
        for method, fn in ways.items():
            try:
                row["times"][method], row["first"][method], got = measure(fn, reps, budget_s, first_alone=True)
                values[method, B] = got.detach().numpy()
            except Exception as exc:  # reported in the table, not raised: the other methods still run
                row["times"][method] = _failed(exc)
            print(f"  B = {B:<3} {method:<12} {_fmt(row['times'][method])}"
                  + (f"  (first call {row['first'][method]:.3f} s)" if method in row["first"] else ""), flush=True)
        if dense is None:   # no switch: the dense plan is xa's call as it is
            row["times"]["xa dense"] = row["times"]["xa"]
            if ("xa", B) in values:
                values["xa dense", B] = values["xa", B]
        s["rows"].append(row)
    print("  folx (jax.jit of jax.vmap of folx.forward_laplacian), in its own interpreter:", flush=True)
    folx = run_folx(params, spec.mix, Xs, reps, budget_s)
    if "error" in folx:
        print(f"    {folx['error']}", flush=True)
        s["folx_error"] = folx["error"]
    else:
        s["folx_version"] = folx["version"]
    for row in s["rows"]:
        B = row["B"]
        for variant in ("sparse", "dense"):
            method = f"folx {variant}"
            if "error" in folx:
                # the table's cell: "not installed" alone, the reason in the note below it
                row["times"][method] = folx["error"].split(" (")[0]
            else:
                row["times"][method] = folx[f"{variant}_{B}_time"]
                row["first"][method] = folx[f"{variant}_{B}_first"]
                values[method, B] = folx[f"{variant}_{B}"]
        row["ref"] = "torch.func" if ("torch.func", B) in values else "xa"
        ref = values.get((row["ref"], B))
        if ref is None:
            continue
        row["scale"] = float(np.abs(ref).max())
        for method in METHODS:
            if (method, B) in values and method != row["ref"] and not (method == "xa dense" and dense is None):
                row["errs"][method] = float(np.abs(values[method, B].reshape(ref.shape) - ref).max())
        print(f"  B = {B}: max abs difference from {row['ref']} (max |Laplacian| {row['scale']:.2e}): "
              + ", ".join(f"{m} {e:.1e}" for m, e in row["errs"].items()), flush=True)
        ratios = {other: _ratio(row["times"]["xa"], row["times"][other])
                  for other in ("folx sparse", "torch.func", "xa dense")}
        print(f"  B = {B}: xa / " + ", ".join(f"{m} {r}" for m, r in ratios.items()), flush=True)
    return s


def _fmt(t) -> str:
    return t if isinstance(t, str) else f"{t:.4f} s"


def _ratio(a, b) -> str:
    return "" if isinstance(a, str) or isinstance(b, str) else f"{a / b:.3g}"


def markdown(summaries) -> str:
    """The table for docs/benchmarks.md: times, xa's ratios, the differences from the reference; notes below."""
    lines = ["| case | B | xa | xa dense plan | torch.func `vmap(trace(hessian))` | folx sparse | folx dense "
             "| xa / folx sparse | xa / torch.func | xa / xa dense | max abs difference from torch.func |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for s in summaries:
        for row in s["rows"]:
            t = row["times"]
            errs = ", ".join(f"{m} {e:.1e}" for m, e in row["errs"].items())
            if row.get("ref") == "xa":
                errs = f"(from xa) {errs}"
            if "scale" in row:
                errs += f" (max abs Laplacian {row['scale']:.1e})"
            cells = [s["title"], str(row["B"]), *(_fmt(t[m]) for m in ("xa", "xa dense", "torch.func",
                                                                        "folx sparse", "folx dense")),
                     *(f"**{r}**" if r else "" for r in (_ratio(t["xa"], t["folx sparse"]),
                                                         _ratio(t["xa"], t["torch.func"]),
                                                         _ratio(t["xa"], t["xa dense"]))), errs]
            lines.append("| " + " | ".join(cells) + " |")
            if row["first"]:
                notes.append(f"- {s['title'].split(' ')[0]} B = {row['B']}, first call: "
                             + ", ".join(f"{m} {v:.2f} s" for m, v in row["first"].items()))
    dense = next((s["dense"] for s in summaries), None)
    notes.append("- xa dense plan: " + (f"the same call under `{dense}`"
                                        if dense else "this xa has no switch to turn automatic sparsity off: "
                                        "the dense plan is `xa.laplacian` as it is (timed once, ratio 1 by "
                                        "construction)"))
    version = next((s["folx_version"] for s in summaries if s["folx_version"]), None)
    error = next((s["folx_error"] for s in summaries if s["folx_error"]), None)
    if version:
        notes.append(f"- folx: {version}, `sparsity_threshold={FOLX_SPARSITY}` (sparse) and 0 (dense)")
    if error:
        notes.append(f"- folx: {error}; `XA_FOLX_PYTHON` names the python of a venv with jax and folx")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


if __name__ == "__main__":   # a quick look at one case: python benchmarks/sparse.py v
    print(markdown([run_case(key, 3, 30.0) for key in (sys.argv[1:] or CASES)]))

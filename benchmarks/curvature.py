"""Curvature: each sample's Hessian diagonal w.r.t. every parameter, against BackPACK.

Imported by ``run.py``, which runs this case (y) alone or with the others:

    python benchmarks/run.py --only curvature      # (y)
    python benchmarks/run.py --cases y

Both methods compute, in float64 on the CPU, for a classifier ``nn.Sequential``
784-128-64-10 with ``tanh`` (torch's default initialisation, seeded) on ``B``
inputs with labels, each sample's diagonal of the Hessian of its cross-entropy
loss w.r.t. every weight and bias: ``(B, *p.shape)`` per parameter, what
BackPACK calls ``BatchDiagHessian``. Each call runs the forward pass too.

- ``xa``: ``xa.diagonal(losses, params, order=2, batch_dim=0)`` on
  ``losses = CrossEntropyLoss(reduction="none")(model(X), y)``: one backward
  plan in which each parameter's two positions are tied, so the terms that
  write its block compute only the diagonal; the blocks of the hidden values
  stay per-sample dense (``B * h^2``).
- ``BackPACK`` (``backpack-for-pytorch``): the model and a
  ``CrossEntropyLoss(reduction="sum")`` extended, ``loss.backward()`` under
  ``backpack(BatchDiagHessian())``; with ``reduction="sum"`` each sample's
  entry is its own loss's Hessian diagonal, unscaled (``"mean"`` divides by B).

Times are medians of up to ``--reps`` calls after one warm-up call (xa plans
at its first call), the methods taking their calls in turn, round after round,
in a child with glibc's default malloc settings, as the training-step cases.
The error is the largest absolute difference between the two, over all
parameters. Without BackPACK installed the case says so and times xa alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from batched import in_turn, tanh_mlp

import xa

DT = torch.float64
WIDTHS = (784, 128, 64, 10)


def classifier(widths=WIDTHS, seed: int = 0) -> nn.Sequential:
    return tanh_mlp(widths, seed)


def data(B: int, widths=WIDTHS, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, widths[0], dtype=DT, generator=gen), torch.randint(0, widths[-1], (B,), generator=gen)


def xa_way(model, X, y):
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss(reduction="none")

    def run():
        losses = loss(model(X), y)
        return tuple(xa.diagonal(losses, params, order=2, batch_dim=0, create_graph=False))

    return run


def backpack_way(model, X, y):
    """BackPACK's ``BatchDiagHessian`` on its own copy of the model; raises ImportError without BackPACK."""
    from backpack import backpack, extend
    from backpack.extensions import BatchDiagHessian

    theirs = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = list(theirs.parameters())

    def run():
        for p in params:
            p.grad = None
        with backpack(BatchDiagHessian()):
            loss(theirs(X), y).backward()
        return tuple(p.diag_h_batch for p in params)

    return run


def case_y(B: int = 128):
    model, (X, y) = classifier(), data(B)
    title = f"(y) per-sample Hessian diagonal, every parameter, tanh MLP 784-128-64-10 + cross-entropy, B = {B}"
    return title, {"xa": xa_way(model, X, y), "BackPACK BatchDiagHessian": lambda: backpack_way(model, X, y)}


CASES = {"y": case_y}


def run_case(key: str, reps: int, budget_s: float) -> dict:
    """Time xa and BackPACK in turn; compare their numbers; print them.

    Returns ``{"key", "title", "times": {method: seconds or why not}, "first": {method: warm-up seconds},
    "err": the largest absolute difference between the two, or None}``.
    """
    title, ways = CASES[key]()
    s = {"key": key, "title": title, "times": {}, "first": {}, "err": None}
    # xa's way is its call; BackPACK's is made first (extending the model), failing where it is missing
    makers = {name: (lambda make=make: make) if name == "xa" else make for name, make in ways.items()}
    results = in_turn(makers, reps, budget_s, s, failed="n/a")
    if len(results) == 2:
        got, ref = results.values()
        s["err"] = max((g - r).abs().max().item() for g, r in zip(got, ref))
    print(f"\n{title}", flush=True)
    for name, t in s["times"].items():
        line = t if isinstance(t, str) else f"{t:9.4f} s  (warm-up call {s['first'][name]:.3f} s)"
        print(f"  {name:<28} {line}", flush=True)
    ratio = _ratio(s)
    if ratio is not None:
        print(f"  xa is {ratio:.2f}x BackPACK; max abs difference {s['err']:.1e}", flush=True)
    return s


def _ratio(s):
    t_xa, t_bp = s["times"].get("xa"), s["times"].get("BackPACK BatchDiagHessian")
    return t_xa / t_bp if isinstance(t_xa, float) and isinstance(t_bp, float) else None


def markdown(summaries) -> str:
    lines = ["| case | xa | BackPACK `BatchDiagHessian` | xa / BackPACK | max abs difference |",
             "|---|---|---|---|---|"]
    for s in summaries:
        cells = [t if isinstance(t, str) else f"{t:.4f} s" for t in
                 (s["times"].get("xa", "n/a"), s["times"].get("BackPACK BatchDiagHessian", "n/a"))]
        ratio = _ratio(s)
        cells.append("" if ratio is None else f"**{ratio:.2f}**")
        cells.append("" if s["err"] is None else f"{s['err']:.1e}")
        lines.append("| " + " | ".join([s["title"], *cells]) + " |")
    return "\n".join(lines) + "\n"

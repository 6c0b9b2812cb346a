"""Queries: ``xa.laplacian``, ``xa.biharmonic``, ``xa.partials`` per point, against torch.func.

Imported by ``run.py``, which runs these cases (j)-(n) after the per-sample
cases (f)-(i), or alone:

    python benchmarks/run.py --only queries        # (j)-(n)
    python benchmarks/run.py --cases j,l           # some of them

Every method computes, for each of the B points of a PINN ``u = net(X)``,
``X`` of shape ``(B, d)`` and ``u`` of shape ``(B, 1)``, a few numbers made
from that point's derivatives, in float64: the Laplacian ``sum_i u_ii``
(j, k, l), the biharmonic ``sum_(i,j) u_iijj`` (m), or ``u_t, u_x, u_xx`` for
points ``(t, x)`` (n). xa answers each from one call with ``batch_dim=0``;
every result is shaped like ``u``.

torch.func is run in two ways a torch user would write it. The first is
the reference, per point through ``vmap``:

- Laplacian: the trace of ``torch.func.hessian``;
- biharmonic: the full fourth derivative ``jacfwd(jacfwd(hessian))``,
  contracted ``einsum('iijj->')``;
- partials: three calls, ``vmap(jacrev)`` for u_t, again for u_x, and
  ``vmap(hessian)[..., 1, 1]`` for u_xx.

The second uses that points do not interact (as batched.py's sum trick):
the gradient of ``u.sum()`` is every point's gradient, and a ``jvp`` of it
along the basis vector ``e_i`` (the whole batch at once) is every point's
``H e_i``. The Laplacian is ``sum_i e_i . H e_i``, ``vmap``-ed over the d
directions; the biharmonic is that Laplacian of that Laplacian; the partials
are the gradient and one ``jvp`` along x.

For case (l) run.py also measures peak memory, each method in a fresh
process (see ``PEAK``). The networks are ``nn.Sequential`` of ``nn.Linear``
and ``nn.Tanh`` with torch's default initialisation, parameters frozen.
"""

from __future__ import annotations

import torch
from batched import Case, _points, max_error, measure, tanh_mlp
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import xa

PEAK = ("l",)   # the cases whose peak memory run.py measures, one fresh process per method


# ------------------------------------------------------------------ torch.func


def _per_point(model):
    """``z (d,) -> u (scalar)``: the model on one point."""
    return lambda z: model(z).squeeze(-1)


def _batch_grad(g):
    """``X (B, d) -> (B, d)``, every row's gradient, for ``g: (B, d) -> (B, 1)`` with independent rows."""
    return grad(lambda X: g(X).sum())


def laplacian_by_directions(g):
    """``X (B, d) -> (B, 1)``: ``sum_i e_i . H e_i``, one ``jvp`` of the batch's gradient per direction ``e_i``."""

    def lap(X):
        def along(e):
            e = e.expand_as(X)
            return (jvp(_batch_grad(g), (X,), (e,))[1] * e).sum(-1, keepdim=True)

        return vmap(along)(torch.eye(X.shape[1], dtype=X.dtype, device=X.device)).sum(0)

    return lap


# ------------------------------------------------------------------ the cases


def _setup(widths, B: int):
    model = tanh_mlp(widths).requires_grad_(False)
    return model, _points(B, widths[0])


def _xa(query, model, X, *args):
    """xa's call: a fresh leaf, the forward pass, the query; a tuple of results."""

    def run():
        x = X.clone().requires_grad_(True)
        out = query(model(x), x, *args, batch_dim=0, create_graph=False)  # values: nothing trains on them
        return out if isinstance(out, tuple) else (out,)

    return run


def laplacian_case(title: str, widths, B: int) -> Case:
    model, X = _setup(widths, B)
    trace = vmap(lambda z: hessian(_per_point(model))(z).trace())
    directions = laplacian_by_directions(model)
    return Case(title, _xa(xa.laplacian, model, X), {
        "vmap(trace(hessian))": lambda: (trace(X).unsqueeze(-1),),
        "grad of sum + vmap(jvp) over directions": lambda: (directions(X),),
    })


def case_j(B: int = 4096) -> Case:
    return laplacian_case(f"(j) Laplacian, PINN tanh 3-64-64-64-64-1, B = {B}", [3, 64, 64, 64, 64, 1], B)


def _wide(key: str, B: int, d: int) -> Case:
    return laplacian_case(f"({key}) Laplacian, PINN tanh {d}-128-128-128-1, B = {B}", [d, 128, 128, 128, 1], B)


def case_k(B: int = 256, d: int = 16) -> Case:
    return _wide("k", B, d)


def case_l(B: int = 256, d: int = 64) -> Case:
    return _wide("l", B, d)


def case_m(B: int = 1024) -> Case:
    model, X = _setup([2, 32, 32, 32, 1], B)
    fourth = vmap(lambda z: torch.einsum("iijj->", jacfwd(jacfwd(hessian(_per_point(model))))(z)))
    twice = laplacian_by_directions(laplacian_by_directions(model))
    return Case(f"(m) biharmonic, PINN tanh 2-32-32-32-1, B = {B}", _xa(xa.biharmonic, model, X), {
        "vmap(einsum('iijj', jacfwd(jacfwd(hessian))))": lambda: (fourth(X).unsqueeze(-1),),
        "Laplacian of Laplacian, grad of sum + vmap(jvp)": lambda: (twice(X),),
    })


def case_n(B: int = 4096) -> Case:
    model, X = _setup([2, 64, 64, 64, 1], B)
    f = _per_point(model)
    gradient, second = vmap(jacrev(f)), vmap(hessian(f))

    def three_calls():
        u_t = gradient(X)[:, 0:1]
        u_x = gradient(X)[:, 1:2]
        u_xx = second(X)[:, 1, 1:2]
        return u_t, u_x, u_xx

    def one_jvp():
        e_x = torch.zeros_like(X)
        e_x[:, 1] = 1.0
        g, h_x = jvp(_batch_grad(model), (X,), (e_x,))
        return g[:, 0:1], g[:, 1:2], h_x[:, 1:2]

    return Case(f"(n) u_t, u_x, u_xx, PINN tanh 2-64-64-64-1 of (t, x), B = {B}",
                _xa(xa.partials, model, X, [(0,), (1,), (1, 1)]), {   # entries 0 = t, 1 = x
                    "vmap(jacrev) for u_t, for u_x, vmap(hessian) for u_xx": three_calls,
                    "grad of sum + one jvp along x": one_jvp,
                })


CASES = {"j": case_j, "k": case_k, "l": case_l, "m": case_m, "n": case_n}


def way(key: str, name: str):
    """One method of a case, ``"xa"`` or a torch.func way's name: a function of no arguments."""
    case = CASES[key]()
    return case.xa if name == "xa" else case.func[name]


def methods(key: str) -> list:
    return ["xa", *CASES[key]().func]

# ------------------------------------------------------------------ measuring


def run_case(key: str, reps: int, budget_s: float) -> dict:
    """Time xa and both torch.func ways of one case against the first (the reference); print them.

    Returns ``{"key", "title", "xa": seconds or why it failed, "xa_first", "func": the reference's
    seconds, "func_name", "ways": {name: seconds}, "way_errs": {name: max abs difference from the
    reference}, "err": xa's}``; run.py adds ``"peak": {method: MB}`` for the cases in ``PEAK``.
    """
    case = CASES[key]()
    timed = {name: measure(fn, reps, budget_s) for name, fn in case.func.items()}
    ref_name = next(iter(timed))
    ref = timed[ref_name][2]
    s = {"key": key, "title": case.title, "func": timed[ref_name][0], "func_name": ref_name, "err": None,
         "ways": {name: t for name, (t, _, _) in timed.items()},
         "way_errs": {name: max_error(res, ref) for name, (_, _, res) in timed.items()}}
    del timed
    try:
        s["xa"], s["xa_first"], got = measure(case.xa, reps, budget_s)
        s["err"] = max_error(got, ref)
    except Exception as exc:  # a query the engine cannot answer: reported, not raised
        s["xa"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"\n{case.title}", flush=True)
    for name, t in s["ways"].items():
        agree = "the reference" if name == ref_name else f"differs from it by {s['way_errs'][name]:.1e}"
        print(f"  torch.func {name:<55} {t:9.4f} s  ({agree})", flush=True)
    if isinstance(s["xa"], str):
        print(f"  xa {s['xa']}", flush=True)
        return s
    ratios = ", ".join(f"{s['xa'] / t:.2f}x {'reference' if name == ref_name else 'other way'}"
                       for name, t in s["ways"].items())
    print(f"  xa{'':<64} {s['xa']:9.4f} s  {ratios}  max err {s['err']:.1e}  "
          f"(first call, which plans: {s['xa_first']:.3f} s)", flush=True)
    return s


def _peaks(s) -> str:
    if "peak" not in s:
        return ""
    return " / ".join(f"{max(mb, 0.0):.0f} MB" if isinstance(mb, float) else mb or "n/a" for mb in s["peak"].values())


def markdown(summaries) -> str:
    """docs/benchmarks.md's table: xa against the reference and torch.func's other way; peaks where measured."""
    lines = ["| case | xa | torch.func reference | xa / that | torch.func's other way | xa / that "
             "| max abs error xa vs reference | peak memory xa / reference / other way |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        (ref, t_ref), (other, t_other) = s["ways"].items()
        xa_t = s["xa"]
        if isinstance(xa_t, str):
            cells = [xa_t, f"`{ref}`: {t_ref:.4f} s", "", f"`{other}`: {t_other:.4f} s", "", ""]
        else:
            cells = [f"{xa_t:.4f} s", f"`{ref}`: {t_ref:.4f} s", f"**{xa_t / t_ref:.2f}**",
                     f"`{other}`: {t_other:.4f} s", f"**{xa_t / t_other:.2f}**", f"{s['err']:.1e}"]
        lines.append("| " + " | ".join([s["title"], *cells, _peaks(s)]) + " |")
    return "\n".join(lines) + "\n"

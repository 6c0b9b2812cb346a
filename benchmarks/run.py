"""xa against nested torch.func and nested torch.autograd.functional.jacobian, side by side.

    python benchmarks/run.py                 # every case, writes benchmarks/results/
    python benchmarks/run.py --cases b,d     # some of them
    python benchmarks/run.py --device cuda --skip-jacobian   # on a GPU (peak: torch's allocator)
    python benchmarks/run.py --only batched  # the per-sample cases (f)-(i) alone (batched.py)
    python benchmarks/run.py --only batched --plot-batch benchmarks/pinn_batch.png   # and time against B
    python benchmarks/run.py --only queries  # the query cases (j)-(n) alone (queries.py)
    python benchmarks/run.py --only train    # one PINN training step, cases (q)-(u) (train.py)
    python benchmarks/run.py --only highdim  # a step on a randomized Laplacian in d = 100..10 000 (highdim.py)
    python benchmarks/run.py --only curvature   # per-sample Hessian diagonals against BackPACK, case (y)
    python benchmarks/run.py --only sparse   # a Laplacian with sparse Jacobians against folx, (v)-(w) (sparse.py)

Every method computes the same thing as ``xa.backward(y, order)``: all
derivatives of orders 1..N of the source with respect to each listed leaf,
in float64. For torch.func that is one nested call per leaf, ``jacrev`` then
``jacfwd`` for each further order, the lower orders carried out as ``aux``
(so they cost nothing extra). For ``jacobian(vectorize=True)`` each order is
its own nested call. Times are medians; peak memory is the growth of the
process's resident set during one call (Linux: VmHWM, reset before each);
the error is the largest absolute difference from torch.func's result.

The MLP of (c) is measured in three spellings: ``W @ x + b`` (c), ``F.linear``
(c2) and ``nn.Linear`` modules called through ``torch.func.functional_call``
(c3); (o) and (p) are two softmax cases, ``(softmax(x) * c).sum()`` at
n = 30, order 4 and n = 300, order 2 (softmax is a composite of exp, sum and
division: ``xa/composite.py``). ``benchmarks/gpu.sh`` runs the CUDA tests and
these cases on a GPU.

Cases (f)-(i), in ``batched.py``, are per-sample derivatives
(``xa.backward(u, order, batch_dim=0)``) against torch.func only, timed in a
child process with glibc's default malloc settings (no peak memory): with
the mmap threshold above, torch.func's many mid-sized allocations made its
time on (f) about twice as long in one measurement, and a user's run has no
such setting. They also print a
Markdown table for docs/benchmarks.md and write it to ``results/batched.md``.

Cases (j)-(n), in ``queries.py``, run after them the same way (a child
process with the default malloc settings): the queries per point
of a PINN, ``xa.laplacian`` (j: 3-64-64-64-64-1 at B = 4096; k, l:
d-128-128-128-1 at B = 256, d = 16 and 64), ``xa.biharmonic`` (m:
2-32-32-32-1 at B = 1024) and ``xa.partials`` for u_t, u_x, u_xx (n:
2-64-64-64-1 at B = 4096), against torch.func's ``vmap`` of ``hessian``,
of the fourth derivative, or three calls (the references), and
against the sum trick of jvps of the batch's gradient. For (l) the peak
memory of each method is measured as above, in a fresh process of its own
(``--child``). Their table goes to ``results/queries.md``.

Cases (q)-(u), in ``train.py``, time one PINN training step (forward pass,
PDE operator, loss, backward to the parameters) of xa against nested
``torch.autograd.grad``, torch.func and torch-jet, the same way: timed in a
child with the default malloc settings, peak memory per method in a fresh
process. They are not in the default run (``--only train`` or ``--cases``
runs them) and write ``results/train.md`` only.

Case (x), in ``highdim.py`` (keys ``x100``, ``x1000``, ``x10000``), times one
training step on a randomized Laplacian (``samples=16``) in d = 100, 1000 and
10 000 against nested-autograd Hutchinson and torch-jet's randomized
Laplacian, the same way; ``--only highdim`` runs it and writes
``results/highdim.md`` only.

Case (y), in ``curvature.py``, is each sample's Hessian diagonal w.r.t. every
parameter of a 784-128-64-10 classifier (``xa.diagonal``) against BackPACK's
``BatchDiagHessian``, timed the same way, in turn; it is not in the default run
(``--only curvature`` or ``--cases y``) and writes ``results/curvature.md``.

Cases (v) and (w), in ``sparse.py``, are the Laplacian of folx's README
network (Linear + SiLU per node, whose Jacobians are sparse; (w) mixes the
nodes once) at B = 4 and 20, xa against torch.func and against folx's
forward Laplacian, sparse and dense, in JAX (``folx_peer.py``, in the
interpreter ``XA_FOLX_PYTHON``). They are timed the same way, are not in the
default run either (``--only sparse``) and write ``results/sparse.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.func import jacfwd, jacrev

import xa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batched  # noqa: E402  (benchmarks/batched.py: the per-sample cases f-i)
import curvature  # noqa: E402  (benchmarks/curvature.py: the Hessian diagonal against BackPACK, y)
import highdim  # noqa: E402  (benchmarks/highdim.py: the randomized Laplacian in high dimension, x)
import queries  # noqa: E402  (benchmarks/queries.py: the query cases j-n)
import sparse  # noqa: E402  (benchmarks/sparse.py: the sparse-Jacobian cases v-w, against folx)
import train  # noqa: E402  (benchmarks/train.py: the training-step cases q-u)

RESULTS = Path(__file__).resolve().parent / "results"
# the suites run like the training steps (a child, their own table in results/<name>.md): --only name
SUITES = {
    "highdim": (highdim, "A training step on a randomized Laplacian in high dimension",
                "the randomized-Laplacian steps"),
    "curvature": (curvature, "Per-sample Hessian diagonals against BackPACK", "the Hessian diagonal against BackPACK"),
    "sparse": (sparse, "A Laplacian with sparse Jacobians, against folx", "the sparse-Jacobian cases against folx"),
}
MMAP_MARK = "XA_BENCH_SET_MMAP_THRESHOLD"   # set when this script set MALLOC_MMAP_THRESHOLD_ itself
# run with glibc's default malloc settings
TIMING_CHILDREN = ("--batched-child", "--queries-child", "--train-child", *(f"--{name}-child" for name in (
    "highdim", "curvature", "sparse")))
PEAK_TIMEOUT_S = 600.0   # seconds before one peak-memory child of the query cases is given up
DT = torch.float64
DEVICE = torch.device("cpu")


def make_case(key, **kwargs):
    """A case's ``(title, f, leaves, wrt, order)``, its tensors made on ``DEVICE``."""
    with torch.device(DEVICE):
        return CASES[key](torch.Generator(device=DEVICE).manual_seed(0), **kwargs)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)

# ------------------------------------------------------------------ the cases


def _mlp_params(gen):
    sizes = [(32, 8), (32,), (32, 32), (32,), (4, 32), (4,)]
    ps = []
    for s in sizes:
        fan_in = s[1] if len(s) == 2 else 10
        ps.append(torch.randn(*s, generator=gen, dtype=DT) / math.sqrt(fan_in))
    return ps


def case_a(gen):
    leaves = {"T0": torch.randn(2, 3, generator=gen, dtype=DT), "T1": torch.randn(2, 4, generator=gen, dtype=DT),
              "T2": torch.randn(4, 3, generator=gen, dtype=DT)}

    def f(T0, T1, T2):
        return torch.softmax(torch.relu(torch.addmm(T0, T1, T2)) + T0, dim=1)

    return "(a) prototype README graph, order 3, all leaves", f, leaves, list(leaves), 3


def pinn(gen):
    widths = [3, 64, 64, 64, 64, 1]
    Ws = [torch.randn(o, i, generator=gen, dtype=DT) / math.sqrt(i) for i, o in zip(widths, widths[1:])]
    bs = [0.1 * torch.randn(o, generator=gen, dtype=DT) for o in widths[1:]]

    def u(x):
        h = x
        for W, b in zip(Ws[:-1], bs[:-1]):
            h = torch.tanh(W @ h + b)
        return Ws[-1] @ h + bs[-1]

    return u


def case_b(gen, order=4):
    u = pinn(gen)
    leaves = {"x": torch.randn(3, generator=gen, dtype=DT)}
    return f"(b) PINN u: R^3 -> R, tanh 3-64-64-64-64-1, order {order}, w.r.t. x", u, leaves, ["x"], order


def _mlp(W1, b1, W2, b2, W3, b3, x):
    return torch.softmax(W3 @ torch.tanh(W2 @ torch.tanh(W1 @ x + b1) + b2) + b3, dim=0)


def _mlp_linear(W1, b1, W2, b2, W3, b3, x):
    """The same MLP spelled with ``F.linear``, as ``nn.Linear`` runs it (view, addmm, view; the weight's ``t``)."""
    h = torch.tanh(F.linear(torch.tanh(F.linear(x, W1, b1)), W2, b2))
    return torch.softmax(F.linear(h, W3, b3), dim=0)


def _mlp_case(gen, title, wrt, order, net=_mlp):
    ps = _mlp_params(gen)
    x = torch.randn(8, generator=gen, dtype=DT)
    names = ["W1", "b1", "W2", "b2", "W3", "b3"]
    return title, lambda *p: net(*p, x), dict(zip(names, ps)), wrt or names, order


def case_c(gen):
    return _mlp_case(gen, "(c) MLP 8-32-32-4 + softmax, order 2, all six parameters", None, 2)


def case_c2(gen):
    return _mlp_case(gen, "(c2) MLP 8-32-32-4 + softmax spelled F.linear, order 2, all six parameters", None, 2,
                     _mlp_linear)


def case_d(gen):
    return _mlp_case(gen, "(d) MLP 8-32-32-4 + softmax, order 3, w.r.t. W1 only", ["W1"], 3)


def case_d2(gen):
    return _mlp_case(gen, "(d2) MLP 8-32-32-4 + softmax spelled F.linear, order 3, w.r.t. W1 only", ["W1"], 3,
                     _mlp_linear)


def case_e(gen):
    B = torch.randn(16, 16, generator=gen, dtype=DT) / 4
    leaves = {"x": torch.randn(16, generator=gen, dtype=DT), "A": torch.randn(16, 16, generator=gen, dtype=DT) / 4}

    def f(x, A):
        return x + torch.tanh(B @ torch.tanh(A @ x))

    return "(e) residual x + tanh(B tanh(A x)), x in R^16, order 3, w.r.t. x and A", f, leaves, ["x", "A"], 3


def _softmax_case(gen, n, order, letter):
    c = torch.randn(n, generator=gen, dtype=DT)
    leaves = {"x": torch.randn(n, generator=gen, dtype=DT)}

    def f(x):
        return (torch.softmax(x, dim=0) * c).sum()

    return f"({letter}) (softmax(x) * c).sum(), n = {n}, order {order}, w.r.t. x", f, leaves, ["x"], order


def case_o(gen):
    return _softmax_case(gen, 30, 4, "o")


def case_p(gen):
    return _softmax_case(gen, 300, 2, "p")


class _Net(torch.nn.Module):
    """The MLP of (c) as users write it: ``nn.Linear`` layers 8-32-32-4, tanh, softmax."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return torch.softmax(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x))))), dim=0)


def case_c3(gen):
    net = _Net().to(DT)
    names = ["l1.weight", "l1.bias", "l2.weight", "l2.bias", "l3.weight", "l3.bias"]
    x = torch.randn(8, generator=gen, dtype=DT)
    params = dict(zip(names, _mlp_params(gen)))

    def f(*p):  # the module called with these tensors as its parameters (torch.func needs them as inputs)
        return torch.func.functional_call(net, dict(zip(names, p)), (x,))

    return "(c3) the same MLP as nn.Linear modules, order 2, all six parameters", f, params, names, 2


CASES = {"a": case_a, "b": case_b, "c": case_c, "c2": case_c2, "c3": case_c3, "d": case_d, "d2": case_d2,
         "e": case_e, "o": case_o, "p": case_p}  # in the order of docs/benchmarks.md's table

# ------------------------------------------------------------------ the methods


def _partial(f, leaves, name):
    names = list(leaves)
    i = names.index(name)

    def fi(z):
        args = list(leaves.values())
        args[i] = z
        return f(*args)

    return fi


def run_xa(f, leaves, wrt, order):
    args = [t.clone().requires_grad_(n in wrt) for n, t in leaves.items()]
    xa.backward(f(*args), order, create_graph=False)  # values, as torch.func's (training: --only train)
    return {n: a.xgrad for n, a in zip(leaves, args) if n in wrt}


def run_func(f, leaves, wrt, order):
    out = {}
    for name in wrt:
        fi = _partial(f, leaves, name)

        def g(z, fi=fi):
            v = fi(z)
            return v, (v,)

        for k in range(order):
            transform = jacrev if k == 0 else jacfwd

            def g(z, inner=g, transform=transform):
                jac, aux = transform(inner, has_aux=True)(z)
                return jac, aux + (jac,)

        _, aux = g(leaves[name])
        s, n = aux[0].numel(), leaves[name].numel()
        out[name] = tuple(d.reshape((s,) + (n,) * k) for k, d in enumerate(aux[1:], start=1))
    return out


def run_jacobian(f, leaves, wrt, order):
    out = {}
    for name in wrt:
        fi = _partial(f, leaves, name)
        x = leaves[name]
        s, n = fi(x).numel(), x.numel()
        per = []
        for k in range(1, order + 1):
            g = fi
            for level in range(1, k + 1):
                # only the inner levels are differentiated again
                g = (lambda inner, cg: lambda z: jacobian(inner, z, create_graph=cg, vectorize=True))(g, level < k)
            per.append(g(x).detach().reshape((s,) + (n,) * k))
        out[name] = tuple(per)
    return out


METHODS = {"xa": run_xa, "torch.func": run_func, "jacobian(vectorize)": run_jacobian}

# ------------------------------------------------------------------ measuring


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn, reps: int, budget_s: float):
    """``(median seconds, peak MB or None, result)``.

    A first call warms up (xa plans, torch.func traces); if it alone took
    more than half the budget it is the only sample. Otherwise one call is
    measured for memory and the rest for time.
    """
    start = time.perf_counter()
    result = fn()
    _sync()
    warm = time.perf_counter() - start
    if warm > budget_s / 2:
        return warm, None, result
    del result
    if DEVICE.type == "cuda":
        base, resettable = torch.cuda.memory_allocated(DEVICE) // 1024, True
        torch.cuda.reset_peak_memory_stats(DEVICE)
    else:
        base = _rss_kb("VmRSS")
        resettable = _reset_peak()
    start = time.perf_counter()
    result = fn()
    _sync()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(DEVICE) // 1024 if DEVICE.type == "cuda" else _rss_kb("VmHWM")
    peak_mb = (peak - base) / 1024 if resettable and peak is not None and base is not None else None
    times = [first]
    while len(times) < reps and sum(times) + first < budget_s:
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_mb, result


def measure_isolated(key: str, method: str, reps: int, budget_s: float, timeout_s: float):
    """``measure`` in a child process that is killed after ``timeout_s``.

    Returns ``(seconds, MB, result)``, or ``(why it failed, None, None)``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        cmd = [sys.executable, __file__, "--child", key, method, str(out), "--reps", str(reps),
               "--budget", str(budget_s)]
        try:
            subprocess.run(cmd, check=True, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return f"gave up after {timeout_s:.0f} s", None, None
        except subprocess.CalledProcessError as err:
            # the kernel's out-of-memory killer ends the child with SIGKILL and no message
            oom = (err.returncode == -9 or "can't allocate memory" in err.stderr
                   or "out of memory" in err.stderr.lower())
            last = err.stderr.strip().splitlines()[-1:] or [f"exit status {err.returncode}"]
            return ("out of memory" if oom else "failed: " + last[0]), None, None
        saved = torch.load(out)
        return saved["time"], saved["peak"], saved["result"]


FIRST_CALL = """
import sys, time, torch, xa
device = torch.device(sys.argv[1])
x = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
W = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
y = torch.softmax(torch.tanh(W @ x) + W @ x, dim=0)
start = time.perf_counter()
xa.backward(y, 3)
x.xgrad[2].sum().item()
print(time.perf_counter() - start)
"""


def first_call_seconds() -> float:
    """The README's example, order 3, as the first xa.backward of a fresh process."""
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(DEVICE)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def child(key: str, method: str, path: str, reps: int, budget_s: float) -> int:
    if key in queries.CASES:
        fn = queries.way(key, method)
    elif key in train.CASES:
        fn = train.way(key, method)
    elif key in highdim.CASES:
        fn = highdim.way(key, method)
    else:
        _, f, leaves, wrt, order = make_case(key)
        fn = lambda: METHODS[method](f, leaves, wrt, order)
    t, mb, res = measure(fn, reps, budget_s)
    torch.save({"time": t, "peak": mb, "result": res}, path)
    return 0


def run_batched(keys, args, flag: str = "--batched-child") -> list:
    """The per-sample cases (and the plot against B), or with ``flag="--queries-child"`` the query cases,
    in a child process with the default malloc settings."""
    env = dict(os.environ)
    if env.pop(MMAP_MARK, None):
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summaries.pt"
        cmd = [sys.executable, __file__, flag, str(out), "--cases", ",".join(keys),
               "--reps", str(args.reps), "--budget", str(args.budget)]
        if args.plot_batch and flag == "--batched-child":
            cmd += ["--plot-batch", str(args.plot_batch)]
        sys.stdout.flush()
        subprocess.run(cmd, check=True, env=env)
        return torch.load(out)


def batched_child(path: str, args, module=batched) -> int:
    summaries = [module.run_case(key, args.reps, args.budget) for key in args.cases.split(",") if key]
    torch.save(summaries, path)
    if args.plot_batch and module is batched:
        print("\n(f) against B, median of 3 at most", flush=True)
        batched.plot(args.plot_batch, args.budget)
    return 0


def query_peaks(s) -> None:
    """Peak memory of each method of a query case, each in a fresh process: ``s["peak"] = {method: MB}``."""
    print(f"\n{s['title']}: peak memory, one call after a warm-up, each method in a fresh process", flush=True)
    s["peak"] = {}
    for method in queries.methods(s["key"]):
        t, mb, _ = measure_isolated(s["key"], method, 1, math.inf, PEAK_TIMEOUT_S)
        s["peak"][method] = t if isinstance(t, str) else mb
        print(f"  {method:<55} {t if isinstance(t, str) else fmt_mb(mb)}", flush=True)


def max_error(got: dict, ref: dict) -> float:
    return max((g - r).abs().max().item() for n in ref for g, r in zip(got[n], ref[n]))


def fmt_mb(mb):
    if isinstance(mb, str):   # why it was not measured
        return mb
    return "n/a" if mb is None else f"{max(mb, 0.0):.0f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join([*CASES, *batched.CASES, *queries.CASES]))
    ap.add_argument("--only", choices=["batched", "queries", "train", *SUITES],
                    help="batched: only the per-sample cases " + ",".join(batched.CASES) + " (batch_dim=0); "
                    "queries: only the query cases " + ",".join(queries.CASES) + " (xa.laplacian, ...); "
                    "train: only the training-step cases " + ",".join(train.CASES) + "; "
                    + "; ".join(f"{name}: only {what} " + ",".join(module.CASES)
                                for name, (module, _, what) in SUITES.items()))
    ap.add_argument("--plot-batch", type=Path, metavar="PNG",
                    help="also time case (f) against B = " + ", ".join(map(str, batched.PLOT_SIZES))
                    + " and plot it there (a CSV beside it; the PNG needs matplotlib)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of repeats per method and case")
    ap.add_argument("--skip-jacobian", action="store_true")
    ap.add_argument("--jacobian-timeout", type=float, default=300.0,
                    help="seconds before the jacobian(vectorize) baseline of one case is given up")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--batched-child", help=argparse.SUPPRESS)
    ap.add_argument("--queries-child", help=argparse.SUPPRESS)
    ap.add_argument("--train-child", help=argparse.SUPPRESS)
    for name in SUITES:
        ap.add_argument(f"--{name}-child", help=argparse.SUPPRESS)
    ap.add_argument("--plot-orders", type=int, default=5, help="orders 1..N for the plot of case (b); 0 skips")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu", help="where the cases run (jacobian only on the CPU)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.child:
        return child(*args.child, args.reps, args.budget)
    if args.batched_child:
        return batched_child(args.batched_child, args)
    if args.queries_child:
        return batched_child(args.queries_child, args, queries)
    if args.train_child:
        return batched_child(args.train_child, args, train)
    for name, (module, _, _) in SUITES.items():
        if getattr(args, f"{name}_child"):
            return batched_child(getattr(args, f"{name}_child"), args, module)
    if args.only:
        modules = {"batched": batched, "queries": queries, "train": train,
                   **{name: module for name, (module, _, _) in SUITES.items()}}
        args.cases = ",".join(modules[args.only].CASES)
    batched_keys = [key for key in args.cases.split(",") if key in batched.CASES]
    query_keys = [key for key in args.cases.split(",") if key in queries.CASES]
    train_keys = [key for key in args.cases.split(",") if key in train.CASES]
    suite_keys = {name: [key for key in args.cases.split(",") if key in module.CASES]
                  for name, (module, _, _) in SUITES.items()}
    rows = []
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{os.cpu_count()} CPUs"
    header = (f"xa {xa.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.machine()}, {where}, {torch.get_num_threads()} torch threads, float64")
    print(header, flush=True)
    print(f"first xa.backward in a fresh process (import excluded): {first_call_seconds():.3f} s", flush=True)
    for key in args.cases.split(","):
        if any(key in m.CASES for m in (batched, queries, train, *(module for module, _, _ in SUITES.values()))):
            continue
        title, f, leaves, wrt, order = make_case(key)
        results = {}
        for method, run in METHODS.items():
            if method.startswith("jacobian") and (args.skip_jacobian or DEVICE.type != "cpu"):
                continue
            if method.startswith("jacobian"):
                t, mb, res = measure_isolated(key, method, args.reps, args.budget, args.jacobian_timeout)
            else:
                t, mb, res = measure(lambda run=run, f=f, leaves=leaves, wrt=wrt, order=order:
                                     run(f, leaves, wrt, order), args.reps, args.budget)
            results[method] = (t, mb, res)
        ref_t = results["torch.func"][0]
        print(f"\n{title}", flush=True)
        for method, (t, mb, res) in results.items():
            if isinstance(t, str):
                rows.append((key, title, method, t, None, None, None))
                print(f"  {method:<20} {t}", flush=True)
                continue
            err = max_error(res, results["torch.func"][2])
            row = (key, title, method, t, t / ref_t, mb, err)
            rows.append(row)
            print(f"  {method:<20} {t:9.4f} s  {t / ref_t:6.2f}x torch.func  peak {fmt_mb(mb):>8}  "
                  f"max err {err:.1e}", flush=True)
        if key in ("d", "d2"):
            shape = (4,) + (256,) * 3
            t_write, _, _ = measure(lambda shape=shape: torch.ones(shape, dtype=DT, device=DEVICE), args.reps,
                                    args.budget)
            xa_t = results["xa"][0]
            print(f"  writing the result once (torch.ones{shape}): {t_write:.4f} s; xa is {xa_t / t_write:.2f}x that")
            rows.append((key, title, "write result once", t_write, t_write / ref_t, None, 0.0))
        del results
    summaries, query_summaries, train_summaries, suite_summaries = [], [], [], {}
    children = batched_keys + query_keys + train_keys + [key for keys in suite_keys.values() for key in keys]
    if children and DEVICE.type != "cpu":
        print(f"\n({', '.join(children)}) skipped: the per-sample, query, training-step, high-dimensional, "
              "curvature and sparse cases run on the CPU only", flush=True)
    else:
        if batched_keys or args.plot_batch:
            summaries = run_batched(batched_keys, args)
        if query_keys:
            query_summaries = run_batched(query_keys, args, "--queries-child")
        if train_keys:
            train_summaries = run_batched(train_keys, args, "--train-child")
        for name, keys in suite_keys.items():
            if keys:
                suite_summaries[name] = run_batched(keys, args, f"--{name}-child")
    for s in query_summaries:
        if s["key"] in queries.PEAK:
            query_peaks(s)
    for s in train_summaries:
        train.peaks(s, lambda key, method: measure_isolated(key, method, 1, math.inf, PEAK_TIMEOUT_S))
    for s in suite_summaries.get("highdim", []):
        highdim.peaks(s, lambda key, method: measure_isolated(key, method, 1, math.inf, PEAK_TIMEOUT_S))
    for s in summaries + query_summaries:
        peak = s.get("peak", {})
        for name, t in s["ways"].items():
            rows.append((s["key"], s["title"], f"torch.func {name}", t, t / s["func"], peak.get(name),
                         s["way_errs"][name]))
        xa_t = s["xa"]
        rows.append((s["key"], s["title"], "xa", xa_t, None if isinstance(xa_t, str) else xa_t / s["func"],
                     peak.get("xa"), s["err"]))
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"<!-- {header} -->", "", "| case | method | median time | ratio to torch.func | peak memory | "
             "max abs error vs torch.func |", "|---|---|---|---|---|---|"]
    for _key, title, method, t, ratio, mb, err in rows:
        if isinstance(t, str):
            lines.append(f"| {title} | {method} | {t} | | | |")
        else:
            lines.append(f"| {title} | {method} | {t:.4f} s | {ratio:.2f} | {fmt_mb(mb)} | {err:.1e} |")
    table = "\n".join(lines) + "\n"
    if rows or not (train_summaries or suite_summaries):   # a run of those alone leaves results.md alone
        (args.out / "results.md").write_text(f"# Benchmarks\n\n{header}\n\n" + table)
        print(f"\nwrote {args.out / 'results.md'}")
    if summaries:
        md = batched.markdown(summaries)
        (args.out / "batched.md").write_text(f"# Per-sample derivatives (batch_dim=0)\n\n{header}\n\n" + md)
        print(f"\nPer-sample cases, for docs/benchmarks.md:\n\n{md}\nwrote {args.out / 'batched.md'}")
    if query_summaries:
        md = queries.markdown(query_summaries)
        (args.out / "queries.md").write_text(f"# Queries per point (batch_dim=0)\n\n{header}\n\n" + md)
        print(f"\nQuery cases, for docs/benchmarks.md:\n\n{md}\nwrote {args.out / 'queries.md'}")
    if train_summaries:
        md = train.markdown(train_summaries)
        (args.out / "train.md").write_text(f"# One PINN training step\n\n{header}\n\n" + md)
        print(f"\nTraining-step cases:\n\n{md}\nwrote {args.out / 'train.md'}")
    for name, found in suite_summaries.items():
        module, title, what = SUITES[name]
        md = module.markdown(found)
        (args.out / f"{name}.md").write_text(f"# {title}\n\n{header}\n\n" + md)
        print(f"\n{title}:\n\n{md}\nwrote {args.out / f'{name}.md'}")
    if args.plot_orders and "b" in args.cases.split(","):
        plot_pinn(args.plot_orders, args)
    return 0


def plot_pinn(max_order: int, args) -> None:
    orders, series = list(range(1, max_order + 1)), {"xa": [], "torch.func": []}
    for order in orders:
        _, f, leaves, wrt, _ = make_case("b", order=order)
        for method in series:
            t, _, _ = measure(lambda m=method, f=f, leaves=leaves, wrt=wrt, order=order:
                              METHODS[m](f, leaves, wrt, order), 3, args.budget / 4)
            series[method].append(t)
    print(batched.save_series(args.out / "pinn_time_vs_order.png", "order", orders, series,
                              "(b) PINN 3-64-64-64-64-1, derivatives w.r.t. x", "order"))


if __name__ == "__main__":
    # Large blocks go straight to mmap, so freed memory leaves the process and
    # each call's peak is measured from a clean resident set.
    if (os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux")
            and not any(flag in sys.argv for flag in TIMING_CHILDREN)):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.environ[MMAP_MARK] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())

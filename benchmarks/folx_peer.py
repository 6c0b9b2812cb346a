"""folx's forward Laplacian on the networks of cases (v) and (w), in JAX: run by ``sparse.py``.

Not imported by anything: ``sparse.py`` runs it with the interpreter of a
virtual environment that has JAX and folx (``XA_FOLX_PYTHON``), as

    $XA_FOLX_PYTHON benchmarks/folx_peer.py IN.npz OUT.npz REPS BUDGET_S

``IN.npz`` holds the network's weights ``W0, b0, ..., Wn, bn`` (``W`` shaped
``(out, in)`` as ``nn.Linear``'s), ``mix`` (the index of the layer whose
input gets the mean over nodes concatenated to each node's features, or -1),
``sparsity`` (folx's ``sparsity_threshold`` for its sparse variant) and the
points ``X_<B>``, shaped ``(B, nodes, 4)``. For each ``X_<B>`` and each of
folx's variants, dense (``sparsity_threshold=0``) and sparse, it jit-compiles
``vmap`` over the samples of ``forward_laplacian(f, threshold)(x).laplacian``,
times the first call (tracing, sparsity analysis, compilation, the run) and
then up to ``REPS`` calls after it, each ended by ``block_until_ready``, while
their sum stays under ``BUDGET_S``. It writes ``OUT.npz``: ``<variant>_<B>``
the Laplacians, ``<variant>_<B>_time`` the median seconds, ``<variant>_<B>_first``
the first call's, and ``version``. Self-contained: this interpreter has
neither torch nor xa.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from importlib.metadata import version

import jax

jax.config.update("jax_enable_x64", True)   # float64, as the torch side

import folx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def network(weights, mix: int):
    """``x (nodes, 4) -> u`` (a scalar): Linear + SiLU per node, the mixing layer at ``mix``, Linear(1), sum."""

    def f(x):
        for i, (W, b) in enumerate(weights[:-1]):
            if i == mix:
                x = jnp.concatenate([x, jnp.broadcast_to(x.mean(0, keepdims=True), x.shape)], axis=-1)
            x = jax.nn.silu(x @ W.T + b)
        W, b = weights[-1]
        return (x @ W.T + b).sum()

    return f


def main(inp: str, out: str, reps: int, budget_s: float) -> int:
    d = np.load(inp)
    n = sum(1 for k in d.files if k.startswith("W"))
    weights = [(jnp.asarray(d[f"W{i}"]), jnp.asarray(d[f"b{i}"])) for i in range(n)]
    f = network(weights, int(d["mix"]))
    variants = {"dense": 0, "sparse": d["sparsity"].item()}
    result = {"version": f"folx {version('folx')}, jax {jax.__version__} ({jax.default_backend()}), "
                         f"Python {platform.python_version()}"}
    for key in sorted((k for k in d.files if k.startswith("X_")), key=lambda k: int(k[2:])):
        X = jnp.asarray(d[key])
        B = key[2:]
        for name, threshold in variants.items():
            lap = jax.jit(jax.vmap(lambda x, t=threshold: folx.forward_laplacian(f, t)(x).laplacian))
            start = time.perf_counter()
            value = jax.block_until_ready(lap(X))
            first = time.perf_counter() - start
            times = []
            while not times or (len(times) < reps and sum(times) + times[0] < budget_s):
                start = time.perf_counter()
                jax.block_until_ready(lap(X))
                times.append(time.perf_counter() - start)
            result[f"{name}_{B}"] = np.asarray(value)
            result[f"{name}_{B}_time"] = statistics.median(times)
            result[f"{name}_{B}_first"] = first
            print(f"folx {name} (sparsity_threshold={threshold}) B = {B}: {statistics.median(times):.4f} s "
                  f"(first call {first:.2f} s)", flush=True)
    np.savez(out, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))

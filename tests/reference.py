"""The reference every test compares against: nested torch.func Jacobians.

``jacrev`` for the first order, ``jacfwd`` for each further one, per input,
reshaped to xa's layout ``(source.numel(), *(k * (input.numel(),)))``.

``XA_TEST_DEVICE`` (default ``cpu``) names the device the operator samples,
the README examples and the random graphs run on: their inputs are moved
there, and ``conftest`` makes it torch's default device so that the
samples' constants are made there too.
"""

from __future__ import annotations

import os

import torch
from torch.func import jacfwd, jacrev

import xa

DEVICE = torch.device(os.environ.get("XA_TEST_DEVICE", "cpu"))


def nested(f, args, i, order):
    """``[d^k f(*args) / d args[i]^k for k = 1..order]``, each ``(*f.shape, *k * args[i].shape)``: ``jacrev``,
    then ``jacfwd`` per further order. Differentiable, and usable under ``vmap``."""

    def fi(z):
        a = list(args)
        a[i] = z
        return f(*a)

    g = jacrev(fi)
    out = [g(args[i])]
    for _ in range(1, order):
        g = jacfwd(g)
        out.append(g(args[i]))
    return out


def torch_partials(f, inputs, order):
    """``out[i][k-1]``: the k-th pure derivative of ``f(*inputs).flatten()`` w.r.t. ``inputs[i]``."""
    inputs = [x.detach() for x in inputs]
    s = f(*inputs).numel()
    return [[d.reshape((s,) + (x.numel(),) * (k + 1)) for k, d in enumerate(nested(f, inputs, i, order))]
            for i, x in enumerate(inputs)]


WORST = {"error": 0.0, "where": ""}  # the largest error of the session, for the terminal summary


def max_error(f, inputs, order, **backward_kwargs):
    """Run ``xa.backward`` on ``f(*inputs)``; the largest error against torch, relative to max(1, |ref|).

    Also checks every shape and dtype on the way; raises AssertionError with
    the offending input, order and error when they differ.
    """
    inputs = [x.to(DEVICE) for x in inputs]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    y = f(*leaves)
    ref = torch_partials(f, inputs, order)
    worst = 0.0
    # with directions=(...), each direction in turn against the same reference
    for direction in backward_kwargs.pop("directions", (backward_kwargs.pop("direction", "auto"),)):
        xa.backward(y, order, direction=direction, **backward_kwargs)
        for i, leaf in enumerate(leaves):
            assert hasattr(leaf, "xgrad"), f"input {i} got no .xgrad"
            assert len(leaf.xgrad) == order
            for k in range(order):
                got, want = leaf.xgrad[k], ref[i][k]
                assert got.shape == want.shape, (direction, i, k + 1, got.shape, want.shape)
                assert got.dtype == leaf.dtype
                if got.numel():
                    scale = max(1.0, want.abs().max().item())
                    worst = max(worst, (got - want.to(got.dtype)).abs().max().item() / scale)
    if worst > WORST["error"] and leaves[0].dtype == torch.float64:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        WORST.update(error=worst, where=f"{test}, order {order}")
    return worst


def assert_close_to_torch(f, inputs, order, tol=1e-9, **backward_kwargs):
    err = max_error(f, inputs, order, **backward_kwargs)
    assert err <= tol, f"max error {err:.3e} (relative to max(1, |ref|)) against torch.func exceeds {tol:.1e}"
    return err

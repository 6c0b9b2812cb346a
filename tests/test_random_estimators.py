"""Randomized estimators (``samples=``) and per-sample directions, against nested autograd in float64.

- With the same directions (the same generator seed, the documented draw), the estimate equals the mean of
  the directional derivatives nested ``torch.autograd.grad`` gives along them, to 1e-10: the Laplacian
  (Rademacher and Gaussian), the biharmonic, a differential operator of every coefficient kind, and
  ``xa.directional`` with each sample's own directions; the sample dim first and last, whole and in chunks
  of samples (a small ``max_memory``), in both directions.
- Statistics: over many independent draws (one point repeated, each copy drawing its own directions) the
  mean is within 4 standard errors of the exact value (``xa.laplacian`` without ``samples``), and the
  empirical variance matches the estimator's formula (Rademacher: ``2 (||H||_F^2 - sum H_ii^2)``,
  Gaussian: ``2 ||H||_F^2``, divided by ``S``).
- Training: the gradient of a loss built from the estimate w.r.t. the network's weights (and the points)
  equals nested autograd's of the same estimate with the same directions (the directions constants), and is
  not zero; a coefficient that requires grad gets the gradient of the same terms.
- Errors: typed, naming the argument, the user's graph left as it was.
"""

from __future__ import annotations

import io
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
from reference import DEVICE

import xa
from xa import budget, execute, sampling
from xa.queries import Diagonal, RankOne

DTYPE = torch.float64
TOL = 1e-10


def close(got, want, what="", tol=TOL):
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= tol, f"{what}: error {err:.2e}"


def mlp(d, width=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1)).double().to(DEVICE)


def points(B, d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, d, generator=gen, dtype=DTYPE) * 2 - 1).to(DEVICE)


def rademacher(shape, seed):
    """The documented draw of ``samples=`` with ``distribution="rademacher"`` and a generator seeded ``seed``:
    ``(B, S, n)`` drawn as ``(S, B, n)`` and transposed (``(S, n)`` as is)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    drawn = 2 * torch.randint(0, 2, _drawn(shape), generator=g, dtype=DTYPE, device=DEVICE) - 1
    return drawn if len(shape) == 2 else drawn.transpose(0, 1)


def gaussian(shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    drawn = torch.randn(_drawn(shape), generator=g, dtype=DTYPE, device=DEVICE)
    return drawn if len(shape) == 2 else drawn.transpose(0, 1)


def _drawn(shape):
    return shape if len(shape) == 2 else (shape[1], shape[0], shape[2])


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def nested(u_of, X, dirs, sample_axis=0, create_graph=False):
    """``d^k u_b [v_1, .., v_k]`` for every sample by nested ``torch.autograd.grad``: ``dirs`` are ``k``
    tensors shaped like ``X`` (each sample's direction in its own slice); the result is ``(B,)``. A leaf ``X``
    that requires grad is differentiated as it is (the result then has a gradient w.r.t. it)."""
    X = X if X.is_leaf and X.requires_grad else X.detach().requires_grad_(True)
    other = tuple(a for a in range(X.dim()) if a != sample_axis)
    t = u_of(X)  # (B, 1) or (1, B): one output per sample
    t = t.reshape(-1)
    for v in dirs:
        (g,) = torch.autograd.grad(t.sum(), X, create_graph=True)
        t = (g * v).sum(other)
    return t if create_graph else t.detach()


def in_layout(V, s, sample_axis):
    """Direction ``s`` of every sample, ``V (B, m, n)``, laid out like the points."""
    v = V[:, s, :]
    return v if sample_axis == 0 else v.T


# ====================================================================== the same directions: exact values


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("direction", ["auto", "forward", "backward"])
def test_laplacian_with_fixed_directions(distribution, direction):
    B, d, S = 6, 3, 5
    net = mlp(d)
    X0 = points(B, d)
    X = X0.clone().requires_grad_(True)
    u = net(X)
    got = xa.laplacian(u, X, batch_dim=0, samples=S, distribution=distribution, generator=generator(7),
                       direction=direction)
    V = (rademacher if distribution == "rademacher" else gaussian)((B, S, d), 7)
    want = sum(nested(net, X0, [V[:, s], V[:, s]]) for s in range(S)) / S
    close(got, want[:, None], "laplacian estimate")
    # another draw, the same plan (only values changed), its own answer
    other = xa.laplacian(u, X, batch_dim=0, samples=S, distribution=distribution, generator=generator(8),
                         direction=direction)
    V = (rademacher if distribution == "rademacher" else gaussian)((B, S, d), 8)
    close(other, (sum(nested(net, X0, [V[:, s], V[:, s]]) for s in range(S)) / S)[:, None], "another draw")
    assert not hasattr(X, "xgrad")


def test_laplacian_without_batch_dim():
    """One point: ``(S, n)`` directions over all of ``wrt``."""
    x0 = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=DTYPE, device=DEVICE)
    f = lambda x: torch.tanh(x @ torch.arange(1.0, 5.0, dtype=DTYPE, device=DEVICE) / 4) * torch.sin(x).sum()
    x = x0.clone().requires_grad_(True)
    got = xa.laplacian(f(x), x, samples=6, generator=generator(3))
    V = rademacher((6, 4), 3)
    H = torch.autograd.functional.hessian(f, x0)
    close(got, torch.einsum("si,ij,sj->", V, H, V) / 6, "unbatched estimate")
    assert got.shape == f(x0).shape


@pytest.mark.parametrize("batch_dim", [1, -1])
def test_laplacian_and_directional_sample_dim_last(batch_dim):
    """Points as columns: X (d, B), u (1, B); each sample's directions over its column."""
    B, d, S = 5, 3, 4
    net = mlp(d, seed=2)
    g = lambda Z: net(Z.T).T * (1 + Z.sum(0, keepdim=True))  # Z read twice
    X0 = points(B, d, seed=2).T.contiguous()
    X = X0.clone().requires_grad_(True)
    u = g(X)  # (1, B)
    got = xa.laplacian(u, X, batch_dim=batch_dim, samples=S, generator=generator(1))
    V = rademacher((B, S, d), 1)
    want = sum(nested(g, X0, [in_layout(V, s, 1)] * 2, sample_axis=1) for s in range(S)) / S
    close(got, want[None], "laplacian, sample dim last")
    W = gaussian((B, 2, d), 4)
    jets = xa.directional(u, X, W, order=3, batch_dim=batch_dim)
    for k in range(3):
        want = torch.stack([nested(g, X0, [in_layout(W, j, 1)] * (k + 1), sample_axis=1) for j in range(2)])
        close(jets[k], want[:, None, :], f"per-sample directional, order {k + 1}")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_per_sample_directional(direction):
    """``directions`` ``(B, m, n)``: each sample its own; against today's shared form sample by sample."""
    B, d, m = 6, 3, 3
    net = mlp(d, seed=4)
    g = lambda Z: net(Z) * torch.cos(Z[:, :1])
    X0 = points(B, d, seed=4)
    X = X0.clone().requires_grad_(True)
    u = g(X)
    V = gaussian((B, m, d), 5)
    jets = xa.directional(u, X, V, order=4, batch_dim=0, direction=direction)
    assert len(jets) == 4 and jets[0].shape == (m, B, 1)
    for k in range(4):
        want = torch.stack([nested(g, X0, [V[:, j]] * (k + 1)) for j in range(m)])
        close(jets[k], want[:, :, None], f"order {k + 1}")
    shared = xa.directional(u, X, V[2], order=2, batch_dim=0, direction=direction)  # (m, n): all samples
    close(jets[1][:, 2], shared[1][:, 2], "sample 2 of both forms")


def test_per_sample_directions_one_sample():
    """A batch of one sample is planned as the whole graph: its directions are its own all the same."""
    net = mlp(3, seed=5)
    X0 = points(1, 3, seed=5)
    X = X0.clone().requires_grad_(True)
    V = gaussian((1, 2, 3), 6)
    d1, d2 = xa.directional(net(X), X, V, order=2, batch_dim=0)
    close(d2, torch.stack([nested(net, X0, [V[:, j]] * 2) for j in range(2)])[:, :, None], "one sample")


def test_biharmonic_with_fixed_directions():
    B, d, S = 5, 3, 3
    net = mlp(d, seed=6, width=6)
    X0 = points(B, d, seed=6)
    X = X0.clone().requires_grad_(True)
    u = net(X)
    got = xa.biharmonic(u, X, batch_dim=0, samples=S, generator=generator(2))
    V = gaussian((B, S, d), 2)
    want = sum(nested(net, X0, [V[:, s]] * 4) for s in range(S)) / (3 * S)
    close(got, want[:, None], "biharmonic estimate")


def _operator_reference(u_of, X0, groups, sample_axis=0):
    """``sum over groups, terms j: w_j d^k u [the term's directions]`` by nested autograd, ``(B,)``."""
    total = 0
    for g in groups:
        for j in range(g.r):
            if g.arity == 1:
                dirs = [in_layout(g.directions, j, sample_axis)] * g.k
            else:
                dirs = [in_layout(g.directions, j * g.k + p, sample_axis) for p in range(g.k)]
            w = g.weight[:, j] if g.per_term else g.weight
            total = total + w * nested(u_of, X0, dirs, sample_axis)
    return total


def operators(d):
    A = torch.tensor([[1.0, 0.5, 0.0], [0.5, -2.0, 0.3], [0.0, 0.3, 0.7]], dtype=DTYPE, device=DEVICE)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE, device=DEVICE)
    T3 = torch.linspace(-1, 1, d ** 3, dtype=DTYPE, device=DEVICE).reshape(d, d, d)
    return {
        "dense": {1: c, 2: A, 3: T3},
        "diagonal": {2: Diagonal(c), 4: Diagonal(c)},
        "scalar diagonal": {2: Diagonal(-0.5), 3: {(0, 1, 2): 1.0, (2, 2, 0): -0.4}},
        "entries": {1: {(0,): 1.0, (2,): -0.5}, 2: {(0, 1): 2.0, (1, 1): -0.1}, 3: RankOne(c)},
    }


@pytest.mark.parametrize("direction", ["auto", "forward", "backward"])
@pytest.mark.parametrize("name", ["dense", "diagonal", "scalar diagonal", "entries"])
def test_operator_with_fixed_draws(name, direction):
    B, d, S = 5, 3, 3
    net = mlp(d, seed=7, width=6)
    X0 = points(B, d, seed=7)
    X = X0.clone().requires_grad_(True)
    u = net(X)
    coefficients = operators(d)[name]
    got = xa.differential_operator(u, X, coefficients, batch_dim=0, samples=S, generator=generator(9),
                                   direction=direction)
    query = sampling.operator_query("test", X, coefficients, B, d, S, "rademacher", generator(9), DTYPE, DEVICE)
    close(got, _operator_reference(net, X0, query.groups)[:, None], f"{name} operator")


def _budget(u, X, query, recorded):
    """About a third of what the whole batch needs (with autograd's tape when recorded, half of it)."""
    plan = xa.explain(u, query=query, batch_dim=0, file=io.StringIO())
    results = plan.result_elements * plan.itemsize
    return (plan.tape_bytes + 2 * results) / 2 if recorded else (plan.peak_bytes + results) / 3


@pytest.mark.parametrize("kind", ["laplacian", "operator", "directional"])
def test_chunks_of_samples_read_their_own_directions(kind):
    """A budget that splits the samples into chunks: each chunk reads its samples' directions."""
    B, d, S = 16, 3, 4
    net = mlp(d, seed=8)
    X = points(B, d, seed=8).requires_grad_(True)
    u = net(X)
    V = gaussian((B, S, d), 3)
    coefficients = operators(d)["dense"]
    call = {"laplacian": lambda **kw: (xa.laplacian(u, X, batch_dim=0, samples=S, generator=generator(5), **kw),),
            "operator": lambda **kw: (xa.differential_operator(u, X, coefficients, batch_dim=0, samples=S,
                                                               generator=generator(5), **kw),),
            "directional": lambda **kw: xa.directional(u, X, V, order=3, batch_dim=0, **kw)}[kind]
    query = {"laplacian": lambda: sampling.laplacian(X, B, d, S, "rademacher", generator(5), DTYPE, DEVICE),
             "operator": lambda: sampling.operator_query("t", X, coefficients, B, d, S, "rademacher", generator(5),
                                                         DTYPE, DEVICE),
             "directional": lambda: xa.queries.Directional(X, V, 3, per_sample=True)}[kind]()
    for create_graph in (False, True):
        whole = call(direction="forward", create_graph=create_graph)
        runs = []
        counting = lambda *a, runs=runs, real=execute.run, **k: runs.append(a[0].batch.size) or real(*a, **k)
        with patch.object(execute, "run", counting):
            limit = _budget(u, X, query, create_graph)
            chunked = call(direction="forward", max_memory=limit, create_graph=create_graph)
        assert len(runs) > 1 and max(runs) < B, (kind, runs)
        for a, b in zip(chunked, whole):
            close(a, b, f"{kind} in chunks")
        if not create_graph:  # cache tiles of 5 samples (plain data only), the factors shared across tiles
            with patch.object(budget, "_tile", lambda plan, graph: 5 if plan.batch is not None else 0):
                runs.clear()
                with patch.object(execute, "run", counting):
                    tiled = call(direction="forward", create_graph=False)
            assert len(runs) > 1 and max(runs) == 5, (kind, runs)
            for a, b in zip(tiled, whole):
                close(a, b, f"{kind} in cache tiles")
        if create_graph:  # the chunks' gradients are the whole run's
            params = list(net.parameters())
            ga = torch.autograd.grad(sum((t ** 2).sum() for t in chunked), params, materialize_grads=True,
                                     retain_graph=True)
            gb = torch.autograd.grad(sum((t ** 2).sum() for t in whole), params, materialize_grads=True)
            for a, b in zip(ga, gb):
                close(a, b, f"{kind}: gradient in chunks")


# ====================================================================== statistics


def _repeated(x, copies):
    """One point, ``copies`` times: every copy draws its own directions, so one call gives that many draws."""
    return x.expand(copies, -1).clone().requires_grad_(True)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_laplacian_is_unbiased_with_the_predicted_variance(distribution):
    d, N = 4, 3000
    net = mlp(d, seed=9)
    x0 = points(1, d, seed=9)
    H = torch.autograd.functional.hessian(lambda z: net(z)[0], x0[0])
    x = x0.clone().requires_grad_(True)
    exact = xa.laplacian(net(x), x, batch_dim=0).item()
    close(torch.tensor(exact, dtype=DTYPE, device=DEVICE), H.trace(), "the exact Laplacian")
    frob = (H ** 2).sum().item()
    variance = 2 * (frob - (H.diagonal() ** 2).sum().item()) if distribution == "rademacher" else 2 * frob
    for S in (1, 4):
        means = []
        for seed in range(3):
            X = _repeated(x0, N)
            est = xa.laplacian(net(X), X, batch_dim=0, samples=S, distribution=distribution,
                               generator=generator(100 + seed), create_graph=False).flatten()
            se = (variance / S / N) ** 0.5
            assert abs(est.mean().item() - exact) < 4 * se, (S, seed, est.mean().item(), exact, se)
            ratio = est.var().item() / (variance / S)
            assert 0.8 < ratio < 1.2, (distribution, S, ratio)
            means.append(est.mean().item())
        assert len(set(means)) == 3  # the seeds drew different directions


def test_biharmonic_and_operator_are_unbiased():
    d, N = 3, 4000
    net = mlp(d, seed=10, width=6)
    x0 = points(1, d, seed=10)
    X = _repeated(x0, N)
    u = net(X)
    x = x0.clone().requires_grad_(True)
    exact = xa.biharmonic(net(x), x, batch_dim=0).item()
    est = xa.biharmonic(u, X, batch_dim=0, samples=2, generator=generator(11), create_graph=False).flatten()
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / N ** 0.5, (est.mean().item(), exact)
    for name, coefficients in operators(d).items():
        x = x0.clone().requires_grad_(True)
        exact = xa.differential_operator(net(x), x, coefficients, batch_dim=0).item()
        est = xa.differential_operator(u, X, coefficients, batch_dim=0, samples=2, generator=generator(12),
                                       create_graph=False).flatten()
        assert est.std().item() > 0, name  # random indeed
        assert abs(est.mean().item() - exact) < 4 * est.std().item() / N ** 0.5, (name, est.mean().item(), exact)


# ====================================================================== training on an estimate


@pytest.mark.parametrize("query", ["laplacian", "biharmonic", "operator"])
def test_gradient_of_a_loss_on_the_estimate(query):
    B, d, S = 6, 3, 3
    net = mlp(d, seed=12, width=6)
    params = list(net.parameters())
    X0 = points(B, d, seed=12)
    f = torch.sin(X0.sum(1))
    X = X0.clone().requires_grad_(True)
    Xr = X0.clone().requires_grad_(True)  # the reference's points, a gradient w.r.t. them too
    coefficients = operators(d)["dense"]
    if query == "laplacian":
        est = xa.laplacian(net(X), X, batch_dim=0, samples=S, generator=generator(21)).flatten()
        V = rademacher((B, S, d), 21)
        ref = lambda: sum(nested(net, Xr, [V[:, s]] * 2, create_graph=True) for s in range(S)) / S
    elif query == "biharmonic":
        est = xa.biharmonic(net(X), X, batch_dim=0, samples=S, generator=generator(21)).flatten()
        V = gaussian((B, S, d), 21)
        ref = lambda: sum(nested(net, Xr, [V[:, s]] * 4, create_graph=True) for s in range(S)) / (3 * S)
    else:
        est = xa.differential_operator(net(X), X, coefficients, batch_dim=0, samples=S,
                                       generator=generator(21)).flatten()
        q = sampling.operator_query("t", X, coefficients, B, d, S, "rademacher", generator(21), DTYPE, DEVICE)

        def ref():
            total = 0
            for g in q.groups:
                for j in range(g.r):
                    dirs = [g.directions[:, j]] * g.k if g.arity == 1 else \
                        [g.directions[:, j * g.k + p] for p in range(g.k)]
                    w = g.weight[:, j] if g.per_term else g.weight
                    total = total + w * nested(net, Xr, dirs, create_graph=True)
            return total
    loss = ((est - f) ** 2).mean()
    got = torch.autograd.grad(loss, params + [X], materialize_grads=True)
    want_est = ref()
    close(est.detach(), want_est.detach(), "the estimate")
    want = torch.autograd.grad(((want_est - f) ** 2).mean(), params + [Xr], materialize_grads=True)
    assert loss.item() > 1e-6 and max(g.abs().max().item() for g in got) > 1e-6  # a loss that trains
    for a, b in zip(got, want):
        close(a, b, f"{query}: gradient")


def test_gradient_reaches_a_coefficient_and_the_directions_are_constants():
    """A coefficient that requires grad gets an unbiased gradient; the drawn directions carry none."""
    d, B = 3, 4
    net = mlp(d, seed=13, width=6)
    X0 = points(B, d, seed=13)
    X = X0.clone().requires_grad_(True)
    u = net(X)
    A = torch.tensor([[1.0, 0.2, 0.0], [0.2, 0.5, 0.0], [0.0, 0.0, -1.0]], dtype=DTYPE, device=DEVICE,
                     requires_grad=True)
    est = xa.differential_operator(u, X, {2: A}, batch_dim=0, samples=2, generator=generator(4))
    (gA,) = torch.autograd.grad(est.sum(), A)
    q = sampling.operator_query("t", X, {2: A.detach()}, B, d, 2, "rademacher", generator(4), DTYPE, DEVICE)
    (g,) = q.groups
    assert not g.directions.requires_grad
    # d/dA_ij of mean_s d^2 u [A^T v_s, v_s] = mean_s sum_b v_bsi (H_b v_bs)_j
    V = g.directions[:, 1::2]  # the v_s (the even ones are A^T v_s)
    # d/dA_ij of sum_b mean_s d^2 u_b [A^T v_s, v_s] = sum_b mean_s v_bsi d^2 u_b [e_j, v_bs]
    want = torch.zeros(d, d, dtype=DTYPE, device=DEVICE)
    for s in range(2):
        for j in range(d):
            e = torch.zeros(B, d, dtype=DTYPE, device=DEVICE)
            e[:, j] = 1.0
            want[:, j] += (V[:, s] * nested(net, X0, [e, V[:, s]])[:, None]).sum(0) / 2
    close(gA, want, "the coefficient's gradient")


# ====================================================================== errors


def _untouched(u, X):
    assert not hasattr(X, "xgrad")
    (g,) = torch.autograd.grad(u.sum(), X)  # torch's graph as it was
    assert g.shape == X.shape


@pytest.mark.parametrize("bad,what", [(0, "got 0"), (-3, "got -3"), (2.5, "float"), (True, "bool"), ("4", "str")])
def test_bad_samples(bad, what):
    net = mlp(3)
    X = points(4, 3).requires_grad_(True)
    u = net(X)
    for call in (lambda: xa.laplacian(u, X, batch_dim=0, samples=bad),
                 lambda: xa.biharmonic(u, X, batch_dim=0, samples=bad),
                 lambda: xa.differential_operator(u, X, {2: Diagonal(1.0)}, batch_dim=0, samples=bad)):
        with pytest.raises(xa.SamplingError, match="samples") as err:
            call()
        assert what in str(err.value)
    _untouched(u, X)


def test_bad_distribution_and_generator():
    net = mlp(3)
    X = points(4, 3).requires_grad_(True)
    u = net(X)
    with pytest.raises(xa.SamplingError, match="distribution must be one of 'rademacher', 'gaussian', got 'normal'"):
        xa.laplacian(u, X, batch_dim=0, samples=2, distribution="normal")
    with pytest.raises(xa.SamplingError, match="distribution='rademacher' gives no unbiased biharmonic"):
        xa.biharmonic(u, X, batch_dim=0, samples=2, distribution="rademacher")
    with pytest.raises(xa.SamplingError, match="distribution= is for a randomized estimate"):
        xa.laplacian(u, X, batch_dim=0, distribution="gaussian")
    with pytest.raises(xa.SamplingError, match="generator= is for a randomized estimate"):
        xa.laplacian(u, X, batch_dim=0, generator=generator(0))
    with pytest.raises(xa.SamplingError, match="generator must be a torch.Generator"):
        xa.laplacian(u, X, batch_dim=0, samples=2, generator=0)
    # a generator on another device than wrt: here wrt on the meta device, the generator where the points are
    M = torch.empty(4, 3, dtype=DTYPE, device="meta", requires_grad=True)
    with pytest.raises(xa.SamplingError, match="generator is on .* wrt on meta"):
        xa.laplacian(u, M, batch_dim=0, samples=2, generator=generator(0))
    _untouched(u, X)


def test_per_sample_directions_need_a_leaf_with_a_slice_per_sample():
    net = mlp(3)
    X = points(4, 3).requires_grad_(True)
    u = net(X)
    W = net[2].weight  # (10, 10): shared by the 4 samples, though 100 entries split into 4 slices of 25
    with pytest.raises(xa.QueryError, match="per-sample directions: the leaf does not carry the sample dim"):
        xa.directional(u, W, torch.randn(4, 2, 25, dtype=DTYPE, device=DEVICE), order=2, batch_dim=0,
                       direction="forward")
    with pytest.raises(xa.QueryError, match="per-sample directions: the leaf does not carry the sample dim"):
        xa.laplacian(u, W, batch_dim=0, samples=2, direction="forward")
    with pytest.raises(xa.QueryError, match="no slice per sample"):
        xa.laplacian(u, net[2].bias, batch_dim=0, samples=2)  # 10 entries, 4 samples
    _untouched(u, X)

"""The README's code examples run as written, and their numbers agree with torch.

Every ```python block of the README runs in a scope of its own; the names it
defines say which recipe it is, and each recipe's check compares its results
by value, in float64, with torch.func. A block no check claims fails the test,
so a new recipe comes with its check.
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from reference import torch_partials
from torch.func import functional_call, hessian, jacfwd, jacrev, vmap

import xa

README = Path(__file__).resolve().parents[1] / "README.md"
TOL = 1e-10


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _same(got, want, tol=TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max().item()


def _check_network(scope):
    """Derivatives of a network: every order of both leaves, as nested torch.func gives them."""
    x, W = scope["x"], scope["W"]
    ref = torch_partials(lambda x, W: torch.softmax(torch.tanh(W @ x) + W @ x, dim=0), [x, W], 3)
    for k in range(3):
        _same(x.xgrad[k], ref[0][k])
        _same(W.xgrad[k], ref[1][k])


def _check_extension(scope):
    """Your own operators: the rule is the user's, the numbers torch's."""
    x = scope["x"]
    ref = torch_partials(lambda z: torch.tanh(z**3).sum(), [x], 4)[0]
    for k in range(4):
        _same(x.xgrad[k], ref[k], tol=1e-9)


def _check_per_sample(scope):
    """Per-sample derivatives: each point's, as vmap of nested jacrev/jacfwd gives them."""
    net, X = scope["net"], scope["X"]
    per = [jacrev(net)]
    for _ in range(3):
        per.append(jacfwd(per[-1]))
    for k in range(4):
        _same(X.xgrad[k], vmap(per[k])(X.detach()).reshape(X.xgrad[k].shape))
    _same(scope["laplacian"], X.xgrad[1].diagonal(dim1=-2, dim2=-1).sum(-1))


def _check_laplacian(scope):
    """The Laplacian residual: per point, the trace of torch.func's Hessian."""
    pde, P = scope["pde"], scope["P"]
    want = vmap(lambda p: hessian(lambda z: pde(z)[0])(p).trace())(P.detach())
    _same((scope["residual"] - torch.sin(P[:, :1])).flatten(), want)


def _check_partials(scope):
    """Chosen partials and a differential operator: per point, torch.func's entries."""
    heat, TXY = scope["heat"], scope["TXY"]
    h = lambda p: heat(p)[0]  # noqa: E731
    D1 = vmap(jacrev(h))(TXY.detach())
    D2 = vmap(hessian(h))(TXY.detach())
    D4 = vmap(jacfwd(jacfwd(hessian(h))))(TXY.detach())
    flat = lambda t: t.flatten()  # noqa: E731
    _same(flat(scope["w_t"]), D1[:, 0])
    _same(flat(scope["w_xx"]), D2[:, 1, 1])
    _same(flat(scope["w_yy"]), D2[:, 2, 2])
    _same(flat(scope["w_xxyy"]), D4[:, 1, 1, 2, 2])
    _same(flat(scope["heat_residual"]), D1[:, 0] - 0.1 * (D2[:, 1, 1] + D2[:, 2, 2]))


def _along(f, v):
    """``p -> d f(p) [v]``: one more order of a directional derivative."""
    return lambda p: torch.func.jvp(f, (p,), (v,))[1]


def _check_more_queries(scope):
    """The biharmonic, directional jets and a mixed block, against torch.func."""
    pde, P = scope["pde"], scope["P"]
    g = lambda p: pde(p)[0]  # noqa: E731
    E4 = vmap(jacfwd(jacfwd(hessian(g))))(P.detach())
    _same(scope["bi"].flatten(), torch.einsum("biijj->b", E4))
    for k, got in enumerate(scope["taylor"], start=1):
        for m, v in enumerate(scope["d"]):
            f = g
            for _ in range(k):  # d^k g [v, .., v] by nested jvp
                f = _along(f, v)
            _same(got[m].flatten(), vmap(f)(P.detach()).flatten())
    A, B = scope["A"], scope["B"]
    f = lambda A, B: torch.tanh(A @ torch.ones(3, dtype=torch.float64) * B).sum()  # noqa: E731
    want = hessian(f, argnums=(0, 1))(A.detach(), B.detach())[0][1]
    _same(scope["H_AB"], want.reshape(1, A.numel(), B.numel()))


def _check_training(scope):
    """The PINN: it trains, and the gradient of its loss is torch.func's."""
    net, X, Xb, f, losses = scope["net"], scope["X"], scope["Xb"], scope["f"], scope["pinn_losses"]
    assert losses[-1] < losses[0]
    params = dict(net.named_parameters())
    names = list(params)
    residual = -xa.laplacian(net(X), X, batch_dim=0) - f
    loss = (residual ** 2).mean() + 100 * (net(Xb) ** 2).mean()
    got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, materialize_grads=True)

    def ref(*values):
        p = dict(zip(names, values))

        def u(x):
            return functional_call(net, p, (x[None],))[0, 0]

        lap = vmap(lambda x: hessian(u)(x).trace())(X.detach())
        return ((-lap[:, None] - f) ** 2).mean() + 100 * (functional_call(net, p, (Xb,)) ** 2).mean()

    want = torch.func.grad(ref, argnums=tuple(range(len(names))))(*[params[n].detach() for n in names])
    for n, a, b in zip(names, got, want):
        assert (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item()), n


def _check_per_sample_hessians(scope):
    """Per-sample Hessians: vmap over the samples of torch.func.hessian of the per-sample loss."""
    model, inputs, labels = scope["model"], scope["inputs"], scope["labels"]
    W1, W2 = scope["W1"], scope["W2"]
    assert not hasattr(W1, "xgrad") and not hasattr(W2, "xgrad")  # remove_partials freed them
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    H = vmap(hessian(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    G = vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    _same(scope["H_W1"], H["0.weight"]["0.weight"])
    _same(scope["H_W2"], H["2.weight"]["2.weight"])
    _same(scope["H_W1W2"], H["0.weight"]["2.weight"])  # the cross-parameter block
    _same(scope["g_W1"], G["0.weight"])
    assert scope["H_W1W2"].grad_fn is None  # create_graph=False: plain data


def _check_explain(scope):
    """explain prints the plan xa.backward then takes from the cache, and it is the cheaper direction's."""
    plan, sup = scope["plan"], scope["sup"]
    assert plan.prices[plan.direction] == plan.flops == min(plan.prices.values())
    assert sup.plan.cached and sup.plan.direction == plan.direction and sup.plan.flops == plan.flops
    net, pts = scope["net"], scope["pts"]
    D2 = vmap(hessian(lambda p: net(p)[0]))(pts.detach())
    _same(pts.xgrad[1].reshape(D2.shape), D2)
    assert scope["lap_plan"].query is not None


def _check_diagonal(scope):
    """The diagonal of a derivative: each sample's Hessian diagonal w.r.t. every parameter, the summed one, and
    d^4 u / dx_i^4 per point, against torch.func."""
    clf, data, targets = scope["clf"], scope["data"], scope["targets"]
    params = {n: p.detach() for n, p in clf.named_parameters()}
    for (name, p), got in zip(params.items(), scope["diag_hessian"]):
        def loss(q, x, y, name=name):
            return F.cross_entropy(functional_call(clf, {**params, name: q}, (x[None],)), y[None])

        H = vmap(hessian(loss), in_dims=(None, 0, 0))(p, data, targets).reshape(len(data), p.numel(), p.numel())
        _same(got, H.diagonal(dim1=1, dim2=2).reshape(got.shape))
        if name == "0.weight":
            _same(scope["diag_summed"], H.sum(0).diagonal().reshape(p.shape))
    field, pts = scope["field"], scope["pts"]
    D4 = vmap(jacfwd(jacfwd(hessian(lambda z: field(z)[0]))))(pts.detach())   # (128, 3, 3, 3, 3)
    i = torch.arange(3)
    _same(scope["u_iiii"], D4[:, i, i, i, i][:, None])


def _check_block_sparsity(scope):
    """The per-particle Laplacian: torch.func's trace of each walker's Hessian; the plan kept the items apart."""
    psi, R = scope["psi"], scope["R"]
    n = R[0].numel()
    want = vmap(lambda r: hessian(lambda z: psi(z[None])[0])(r).reshape(n, n).trace())(R.detach())
    _same(scope["kinetic"], -0.5 * want)
    plan = scope["sparse_plan"]
    text = scope["report"].getvalue()
    assert plan.tied and "block sparsity: leaf" in text
    saved = float(re.search(r"the dense plan \(every row through every node\) \S+ \((\S+)x\)", text).group(1))
    assert 30 < saved < 50, saved  # the README says "about 40x"
def _check_randomized(scope):
    """The estimate is Hutchinson's mean along the documented draw, by nested autograd; unbiased; it trained."""
    field, Z, lap_est, lap_exact = scope["field"], scope["Z"], scope["lap_est"], scope["lap_exact"]
    B, d, S = Z.shape[0], Z.shape[1], 16
    g = torch.Generator().manual_seed(0)
    V = (2 * torch.randint(0, 2, (S, B, d), generator=g, dtype=torch.float64) - 1).transpose(0, 1)
    z = Z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(field(z).sum(), z, create_graph=True)
    est = sum((torch.autograd.grad((g * V[:, s]).sum(), z, retain_graph=True)[0] * V[:, s]).sum(1)
              for s in range(S)) / S
    _same(lap_est.detach(), est[:, None])
    D2 = vmap(hessian(lambda p: field(p)[0]))(Z.detach()[:4])
    _same(lap_exact.detach()[:4], D2.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None])
    err = lap_est.detach() - lap_exact.detach()
    assert err.abs().max() > 0 and abs(err.mean()) < 4 * err.std() / B ** 0.5
    assert field[0].weight.grad is not None and field[0].weight.grad.abs().max() > 0


def _check_buffers(scope):
    """Warm calls: the same Laplacians as torch.func, none overwritten by a later call; the arena was released."""
    net, pts, laps = scope["net"], scope["pts"], scope["laps"]
    want = vmap(lambda p: hessian(lambda z: net(z[None])[0, 0])(p).trace())(pts.detach())
    for lap in laps:
        _same(lap.flatten(), want)
    assert scope["released"] > 0 and xa.release_buffers() == 0


# (names a block defines, its check): a block may match several
CHECKS = [
    (("x", "W", "y"), _check_network),
    (("Cube",), _check_extension),
    (("laplacian", "net", "X"), _check_per_sample),
    (("residual", "pde", "P"), _check_laplacian),
    (("heat_residual",), _check_partials),
    (("bi", "taylor", "H_AB"), _check_more_queries),
    (("pinn_losses",), _check_training),
    (("H_W1", "H_W1W2"), _check_per_sample_hessians),
    (("plan", "sup", "lap_plan"), _check_explain),
    (("diag_hessian", "diag_summed", "u_iiii"), _check_diagonal),
    (("kinetic", "sparse_plan"), _check_block_sparsity),
    (("laps", "released"), _check_buffers),
    (("lap_est", "lap_exact"), _check_randomized),
]


def test_readme_examples_run_and_agree_with_torch(capsys):
    blocks = _blocks()
    assert len(blocks) >= 8
    for block in blocks:
        scope: dict = {}
        try:
            exec(compile(block, str(README), "exec"), scope)
            checks = [check for names, check in CHECKS if all(n in scope for n in names)]
            assert checks, f"no check claims this README block:\n{block}"
            for check in checks:
                check(scope)
        finally:
            if "xe" in scope and "CubeBackward" in scope["xe"].supported():
                scope["xe"].unregister("CubeBackward")
            xa.clear_partials()
    assert "xa plan" in capsys.readouterr().out

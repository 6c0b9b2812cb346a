"""The README's code examples run as written, and their numbers agree with torch."""

import re
from pathlib import Path

import torch
from reference import torch_partials
from torch.func import jacfwd, jacrev, vmap

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run_and_agree_with_torch(capsys):
    blocks = _blocks()
    assert len(blocks) >= 2
    for block in blocks:
        scope: dict = {}
        try:
            exec(compile(block, str(README), "exec"), scope)
        finally:
            if "xe" in scope and "CubeBackward" in scope["xe"].supported():
                scope["xe"].unregister("CubeBackward")
        if "W" in scope and "y" in scope:  # the usage example: check its numbers
            x, W = scope["x"], scope["W"]
            ref = torch_partials(lambda x, W: torch.softmax(torch.tanh(W @ x) + W @ x, dim=0), [x, W], 3)
            for k in range(3):
                assert torch.allclose(x.xgrad[k], ref[0][k], atol=1e-10, rtol=0)
                assert torch.allclose(W.xgrad[k], ref[1][k], atol=1e-10, rtol=0)
        if "Cube" in scope:  # the extension example: the rule is the user's, the numbers torch's
            x = scope["x"]
            ref = torch_partials(lambda z: torch.tanh(z**3).sum(), [x], 4)[0]
            for k in range(4):
                assert torch.allclose(x.xgrad[k], ref[k], atol=1e-9, rtol=0)
        if "laplacian" in scope:  # the per-sample example: each point's derivatives, as vmap gives them
            net, X = scope["net"], scope["X"]
            g = jacrev(net)
            per = [g]
            for _ in range(3):
                per.append(jacfwd(per[-1]))
            for k in range(4):
                want = vmap(per[k])(X.detach()).reshape(X.xgrad[k].shape)
                assert torch.allclose(X.xgrad[k], want, atol=1e-10, rtol=0)
            assert torch.allclose(scope["laplacian"], X.xgrad[1].diagonal(dim1=-2, dim2=-1).sum(-1))
        if "residual" in scope:  # the Laplacian example: per point, the trace of torch.func's Hessian
            pde, P = scope["pde"], scope["P"]
            want = vmap(lambda p, pde=pde: torch.func.hessian(lambda z: pde(z)[0])(p).trace())(P.detach())
            got = scope["residual"] - torch.sin(P[:, :1])
            assert torch.allclose(got.flatten(), want, atol=1e-10, rtol=0)
        if "heat_residual" in scope:  # the queries example: every query against torch.func, per point
            _check_queries(scope)
        if "pinn_losses" in scope:  # the training example: it trains, and its gradient is torch.func's
            _check_training(scope)
    assert "xa plan" in capsys.readouterr().out


def _along(f, v):
    """``p -> d f(p) [v]``: one more order of a directional derivative."""
    return lambda p: torch.func.jvp(f, (p,), (v,))[1]


def _check_queries(scope):
    from torch.func import hessian

    heat, TXY, pde, P = scope["heat"], scope["TXY"], scope["pde"], scope["P"]
    h = lambda p: heat(p)[0]  # noqa: E731
    g = lambda p: pde(p)[0]  # noqa: E731
    D1 = vmap(jacrev(h))(TXY.detach())
    D2 = vmap(hessian(h))(TXY.detach())
    D4 = vmap(jacfwd(jacfwd(hessian(h))))(TXY.detach())

    def same(got, want):
        assert torch.allclose(got.flatten(), want.flatten(), atol=1e-10, rtol=0)

    same(scope["w_t"], D1[:, 0])
    same(scope["w_xx"], D2[:, 1, 1])
    same(scope["w_yy"], D2[:, 2, 2])
    same(scope["w_xxyy"], D4[:, 1, 1, 2, 2])
    same(scope["heat_residual"], D1[:, 0] - 0.1 * (D2[:, 1, 1] + D2[:, 2, 2]))
    E4 = vmap(jacfwd(jacfwd(hessian(g))))(P.detach())
    same(scope["bi"], torch.einsum("biijj->b", E4))
    for k, got in enumerate(scope["taylor"], start=1):
        for m, v in enumerate(scope["d"]):
            f = g
            for _ in range(k):  # d^k g [v, .., v] by nested jvp
                f = _along(f, v)
            same(got[m], vmap(f)(P.detach()))
    A, B = scope["A"], scope["B"]
    f = lambda A, B: torch.tanh(A @ torch.ones(3, dtype=torch.float64) * B).sum()  # noqa: E731
    same(scope["H_AB"], hessian(f, argnums=(0, 1))(A.detach(), B.detach())[0][1])


def _check_training(scope):
    net, X, Xb, f, losses = scope["net"], scope["X"], scope["Xb"], scope["f"], scope["pinn_losses"]
    assert losses[-1] < losses[0]
    import xa

    params = dict(net.named_parameters())
    names = list(params)
    residual = -xa.laplacian(net(X), X, batch_dim=0) - f
    loss = (residual ** 2).mean() + 100 * (net(Xb) ** 2).mean()
    got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, materialize_grads=True)

    def ref(*values):
        p = dict(zip(names, values))

        def u(x):
            return torch.func.functional_call(net, p, (x[None],))[0, 0]

        lap = vmap(lambda x: torch.func.hessian(u)(x).trace())(X.detach())
        return ((-lap[:, None] - f) ** 2).mean() + 100 * (torch.func.functional_call(net, p, (Xb,)) ** 2).mean()

    want = torch.func.grad(ref, argnums=tuple(range(len(names))))(*[params[n].detach() for n in names])
    for n, a, b in zip(names, got, want):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item()), n

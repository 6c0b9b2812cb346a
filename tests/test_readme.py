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
    assert "xa plan" in capsys.readouterr().out

"""Permutations folded into their consumer (xa/fold.py): no block is copied through ``W.t()``.

Each case checks the numbers against torch.func in both directions, and
whether the plan folded the permutation or, where it must not, kept it.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import DEVICE, assert_close_to_torch, torch_partials

import xa


def leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu").to(DEVICE).requires_grad_(True)


def steps(plan):
    return {step.name for step in plan.steps}


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_linear_weight_transpose_is_folded(direction):
    x, W, b = leaf(5, 3, seed=1), leaf(4, 3, seed=2), leaf(4, seed=3)

    def f(x, W, b):
        return torch.tanh(F.linear(x, W, b)).sum(1)

    sup = xa.backward(f(x, W, b), 3, direction=direction)
    assert sup.plan.folds and "TBackward0" not in steps(sup.plan)
    assert_close_to_torch(f, [x.detach(), W.detach(), b.detach()], 3, directions=(direction,))


@pytest.mark.parametrize("f", [
    lambda a, c: torch.sin(a.permute(2, 0, 1) * c.reshape(2, 1, 1)).sum(),  # a 3-d permutation
    lambda a, c: torch.tanh(a.transpose(0, 2) @ c.reshape(2, 1)).sum(),  # transpose into a matmul
    lambda a, c: (a.mT.exp() * a.mT).sum(),  # two consumers: not folded
    lambda a, c: (torch.tanh(a).permute(1, 2, 0).reshape(-1)[:5] ** 2).sum(),  # a view after it
], ids=["permute", "transpose", "two consumers", "permute then view"])
def test_permutations_match_torch(f):
    a, c = leaf(2, 3, 2, seed=4), leaf(2, seed=5)
    c2 = c.detach()
    assert_close_to_torch(lambda a: f(a, c2), [a.detach()], 3, directions=("backward", "forward"))


def test_a_permutation_whose_partials_are_asked_for_is_kept():
    x = leaf(3, 2, seed=6)
    h = torch.tanh(x).t()
    y = (h @ torch.ones(3, 2, dtype=torch.float64, device=DEVICE)).sin().sum()
    sup = xa.Superset(y).retain_partials(h).backward(2)
    assert "TBackward0" in steps(sup.plan)
    want = torch_partials(lambda h: (h @ torch.ones(3, 2, dtype=torch.float64, device=DEVICE)).sin().sum(),
                          [h.detach()], 2)[0]
    for got, ref in zip(sup.operator_partials(h), want):
        assert (got - ref).abs().max().item() < 1e-12


def test_per_sample_hessian_through_nn_linear_is_folded():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double().to(DEVICE)
    X = torch.randn(6, 3, dtype=torch.float64, device=DEVICE)
    W = net[0].weight
    for p in net.parameters():
        p.requires_grad_(p is W)
    try:
        sup = xa.backward(net(X), 2, batch_dim=0)
    finally:
        for p in net.parameters():
            p.requires_grad_(True)
    assert "TBackward0" not in steps(sup.plan)
    f = lambda w, x: torch.func.functional_call(net, {"0.weight": w}, (x[None],))[0]
    want = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(f)), in_dims=(None, 0))(W.detach(), X)
    assert (W.xgrad[1] - want.reshape(6, 1, 12, 12)).abs().max().item() < 1e-12

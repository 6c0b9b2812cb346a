"""Users' own operators: a torch.autograd.Function with a rule registered through xa.extend."""

import pytest
import torch
from reference import torch_partials

import xa
import xa.extend as xe


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class ScaledMatmul(torch.autograd.Function):
    """``y = c * (a @ b)``: a bilinear op whose constant lives on ctx."""

    @staticmethod
    def forward(ctx, a, b, c):
        ctx.save_for_backward(a, b)
        ctx.c = c
        return c * (a @ b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return ctx.c * grad @ b.T, ctx.c * a.T @ grad, None


def _cube(ctx, k):
    (x,) = ctx.saved("tensors")
    return {1: 3 * x**2, 2: 6 * x, 3: 6 * torch.ones_like(x)}.get(k)


@pytest.fixture(autouse=True, scope="module")
def user_rules():
    xe.register("CubeBackward", xe.elementwise(_cube))
    xe.register("ScaledMatmulBackward", xe.bilinear(
        lambda ctx, lab: _ports(ctx, lab),
        (lambda ctx: ctx.saved("tensors")[0], lambda ctx: ctx.saved("tensors")[1]),
        coef=lambda ctx: ctx.node.c,
    ))
    yield
    xe.unregister("CubeBackward")
    xe.unregister("ScaledMatmulBackward")


def _ports(ctx, lab):
    i, k, j = lab.new(ctx.out_shape[0]), lab.new(ctx.in_shapes[0][1]), lab.new(ctx.out_shape[1])
    return (i, j), (i, k), (k, j)


def test_custom_elementwise_function_to_order_4():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = torch.tanh(Cube.apply(x)) * x  # fan-out through the custom op
    xa.backward(y, order=4)
    ref = torch_partials(lambda z: torch.tanh(z**3) * z, [x], 4)[0]
    for k in range(4):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-9, rtol=0)


def test_custom_bilinear_function_reads_ctx_attributes():
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tanh(ScaledMatmul.apply(a, b, 0.5))
    xa.backward(y, order=3)
    ref = torch_partials(lambda a, b: torch.tanh(0.5 * (a @ b)), [a, b], 3)
    for k in range(3):
        assert torch.allclose(a.xgrad[k], ref[0][k], atol=1e-9, rtol=0)
        assert torch.allclose(b.xgrad[k], ref[1][k], atol=1e-9, rtol=0)


def test_registering_twice_needs_override_and_configurations_swap_for_one_call():
    with pytest.raises(xa.RegistryError, match="CubeBackward"):
        xe.register("CubeBackward", xe.elementwise(_cube))
    wrong = xe.elementwise(lambda ctx, k: torch.zeros_like(ctx.saved("tensors")[0]) if k == 1 else None)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = Cube.apply(x)
    xa.backward(y, order=1, configurations=[{"CubeBackward": wrong}])
    assert torch.count_nonzero(x.xgrad[0]) == 0
    xa.backward(y, order=1)
    assert torch.allclose(x.xgrad[0], torch.diag(3 * x.detach() ** 2))

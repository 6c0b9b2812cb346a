"""A cached plan makes a call faster, never different.

Each test makes a second call that must give other numbers than the first
(another rule, coefficient, ctx attribute, output) and checks both against
torch, in float64. Each class failed before plans read every value at
execution and keyed on every rule object.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from reference import DEVICE, assert_close_to_torch, torch_partials
from test_extend import ScaledMatmul, _ports

import xa
import xa.extend as xe
from xa.registry import lookup


def leaf(*shape, seed=0, low=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu") if low is None else \
        low + torch.rand(*shape, generator=g, dtype=torch.float64, device="cpu")
    return t.to(DEVICE).requires_grad_(True)


def scaled(rule, c):
    """``rule`` with every factor multiplied by ``c``: the same structure, another coefficient."""
    def new(ctx, slots):
        f = rule(ctx, slots)
        return None if f is None else dataclasses.replace(f, coef=c * f.coef)

    return new


def first_order_only(rule):
    """``rule`` with every derivative of order >= 2 zero: another structure."""
    return lambda ctx, slots: rule(ctx, slots) if len(slots) == 1 else None


# ---------------------------------------------------------------- retained outputs of one multi-output node


@pytest.mark.parametrize("split", ["split", "chunk", "unbind"])
def test_each_retained_output_of_a_multi_output_node_has_its_own_partials(split):
    x = leaf(6)
    if split == "unbind":
        parts = x.reshape(3, 2).unbind(0)
        a, b = parts[0], parts[2]
    else:
        parts = x.split(2) if split == "split" else x.chunk(3)
        a, b = parts[0], parts[2]

    def f(a, b):
        return torch.stack([(torch.tanh(a) * b).sum(), (a * a * a).sum() + (b * b).sum()])  # fan-out, 2 outputs

    y = f(a, b)
    sup = xa.Superset.construct(y).retain_partials([a, b]).backward(order=3)
    ref = torch_partials(f, [a, b], 3)
    for t, want in ((a, ref[0]), (b, ref[1])):
        got = sup.operator_partials(t)
        for k in range(3):
            assert torch.allclose(got[k], want[k], atol=1e-12, rtol=0), (split, k)


# ---------------------------------------------------------------- rules: the registry, configurations


@pytest.fixture
def restore_tanh():
    original = lookup("TanhBackward0")
    yield original
    xa.register("TanhBackward0", original, override=True)


def test_register_override_takes_effect_on_a_graph_planned_before(restore_tanh):
    x = leaf(4)
    y = torch.tanh(x * x)
    xa.backward(y, order=2)  # plans and caches with the built-in rule
    base = [t.clone() for t in x.xgrad]
    xa.register("TanhBackward0", scaled(restore_tanh, 3.0), override=True)
    xa.backward(y, order=2)
    ref = torch_partials(lambda z: torch.tanh(z * z), [x], 2)[0]
    for k in range(2):
        assert torch.allclose(base[k], ref[k], atol=1e-12, rtol=0)
    # d(tanh)/du scaled by 3, d2(tanh)/du2 by 3: the chain rule gives 3 * both blocks of torch's
    assert torch.allclose(x.xgrad[0], 3 * ref[0], atol=1e-12, rtol=0)
    assert torch.allclose(x.xgrad[1], 3 * ref[1], atol=1e-12, rtol=0)
    xa.register("TanhBackward0", first_order_only(restore_tanh), override=True)
    xa.backward(y, order=2)
    u = x.detach() ** 2
    want = torch.diag((1 - torch.tanh(u) ** 2) * 2)  # tanh'' treated as zero: only tanh' * d2(u)/dx2
    assert torch.allclose(x.xgrad[1], torch.diag_embed(want).reshape(4, 4, 4), atol=1e-12, rtol=0)
    xa.register("TanhBackward0", restore_tanh, override=True)
    xa.backward(y, order=2)
    for k in range(2):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-12, rtol=0)


def test_configurations_made_per_call_are_never_confused():
    # Rules made inside the loop and dropped at once: Python reuses their addresses.
    x = leaf(3)
    y = torch.tanh(x)
    tanh = lookup("TanhBackward0")
    ref = torch_partials(torch.tanh, [x], 2)[0]
    for c in range(1, 9):
        rule = scaled(tanh, float(c)) if c % 3 else first_order_only(scaled(tanh, float(c)))
        xa.backward(y, order=2, configurations={"TanhBackward0": rule})
        assert torch.allclose(x.xgrad[0], c * ref[0], atol=1e-12, rtol=0), c
        want = torch.zeros_like(ref[1]) if c % 3 == 0 else c * ref[1]
        assert torch.allclose(x.xgrad[1], want, atol=1e-12, rtol=0), c


def test_configurations_through_the_linear_family_read_their_coefficient_at_execution():
    x = leaf(4)
    y = torch.tanh(x.reshape(2, 2))
    reshape = lookup("ViewBackward0")
    for c in (2.0, -0.5, 7.0):
        xa.backward(y, order=1, configurations={"ViewBackward0": scaled(reshape, c)})
        want = torch.diag(1 - torch.tanh(x.detach()) ** 2) * c
        assert torch.allclose(x.xgrad[0], want, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- a custom Function's ctx attributes


class PowK(torch.autograd.Function):
    """``y = x ** p`` for a whole ``p`` on ctx: its k-th derivative is zero past ``p``."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.save_for_backward(x)
        ctx.p = p
        return x**p

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.p * x ** (ctx.p - 1) * grad, None


def _pow_k(ctx, k):
    (x,) = ctx.saved("tensors")
    p = ctx.node.p
    return math.perm(p, k) * x ** (p - k) if k <= p else None


@pytest.fixture
def custom_rules():
    xe.register("PowKBackward", xe.elementwise(_pow_k))
    xe.register("ScaledMatmulBackward", xe.bilinear(
        _ports, (lambda ctx: ctx.saved("tensors")[0], lambda ctx: ctx.saved("tensors")[1]),
        coef=lambda ctx: ctx.node.c))
    yield
    xe.unregister("PowKBackward")
    xe.unregister("ScaledMatmulBackward")


def test_ctx_attribute_coefficient_is_read_at_every_call(custom_rules):
    a, b = leaf(2, 3), leaf(3, 2, seed=1)
    for c in (0.5, 2.0, -1.5):
        y = torch.tanh(ScaledMatmul.apply(a, b, c))
        xa.backward(y, order=3)
        ref = torch_partials(lambda a, b, c=c: torch.tanh(c * (a @ b)), [a, b], 3)
        for k in range(3):
            assert torch.allclose(a.xgrad[k], ref[0][k], atol=1e-10, rtol=0), (c, k)
            assert torch.allclose(b.xgrad[k], ref[1][k], atol=1e-10, rtol=0), (c, k)


def test_ctx_attribute_that_changes_which_derivatives_are_zero(custom_rules):
    x = leaf(3, low=0.5)
    for p in (2, 3, 2):
        y = PowK.apply(x, p) * x  # fan-out through the custom op
        xa.backward(y, order=3)
        ref = torch_partials(lambda z, p=p: z**p * z, [x], 3)[0]
        for k in range(3):
            assert torch.allclose(x.xgrad[k], ref[k], atol=1e-10, rtol=0), (p, k)


def test_a_rule_that_chooses_its_structure_by_values_is_refused():
    x = leaf(3)
    y = torch.tanh(x)
    tanh = lookup("TanhBackward0")

    def sneaky(ctx, slots):  # zero only when it sees real values: the plan cannot know
        return tanh(ctx, slots) if ctx.planning else None

    with pytest.raises(xa.RuleError, match="TanhBackward0"):
        xa.backward(y, order=1, configurations={"TanhBackward0": sneaky})
    assert not hasattr(x, "xgrad")


# ---------------------------------------------------------------- arguments a rule reads


@pytest.mark.parametrize("divisor", [-2, 3, 1])
def test_avg_pool_divisor_override_of_any_sign(divisor):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    assert_close_to_torch(lambda z: torch.tanh(F.avg_pool2d(z * z, 2, stride=1, divisor_override=divisor)),
                          [x], 2, tol=1e-10)


def test_cached_flag_is_per_call():
    x = leaf(3)
    y = torch.sin(x) * x
    first = xa.backward(y, order=2)
    second = xa.backward(y, order=2)
    assert second.plan.cached and not first.plan.cached
    assert second.plan.steps is first.plan.steps  # the same program, not planned again


# ---------------------------------------------------------------- devices


@pytest.fixture
def default_device_cpu():
    before = torch.get_default_device()
    torch.set_default_device("cpu")  # any device: the mode alone used to break planning
    yield
    torch.set_default_device(before)


@pytest.mark.parametrize("case", ["slice", "cat flip", "index", "unbind", "pad"])
def test_planning_does_not_depend_on_the_default_device(default_device_cpu, case):
    f = {
        "slice": lambda x: torch.tanh(x[1:, ::2]) * x[:3, :2],
        "cat flip": lambda x: torch.cat([x, x.flip(0)]).sin(),
        "index": lambda x: x[torch.tensor([2, 0, 2])].tanh() * x[1],
        "unbind": lambda x: x.unbind(1)[2].exp() * x.unbind(0)[0][:3].sum(),
        "pad": lambda x: F.pad(x, (1, 2)).tanh().roll(1, 0),
    }[case]
    assert_close_to_torch(f, [torch.randn(4, 4, dtype=torch.float64)], 3, tol=1e-10)


@pytest.mark.parametrize("shape", [(4, 2), (2, 3)])
def test_trace_of_a_non_square_matrix(shape):
    # The reference is the diagonal's sum: torch 2.11's own trace derivative of a tall matrix is wrong.
    a = leaf(*shape)
    xa.backward(torch.trace(torch.tanh(a)) ** 2 * a.sum(), order=3)
    ref = torch_partials(lambda a: torch.diagonal(torch.tanh(a)).sum() ** 2 * a.sum(), [a], 3)[0]
    for k in range(3):
        assert torch.allclose(a.xgrad[k], ref[k], atol=1e-10, rtol=0), k


def test_batch_layout_is_in_the_plan_key():
    """One graph with no sample dim, the sample dim at 0, then at 1 (a square source): three plans, three answers."""
    f = lambda x: torch.tanh(x) * x + x.exp()  # x read three times
    x = leaf(3, 3, seed=41)
    y = f(x)
    want = torch_partials(f, [x.detach()], 2)[0]  # (9, 9), (9, 9, 9)
    full = [d.reshape((3, 3) * (k + 2)) for k, d in enumerate(want)]
    for batch_dim in (None, 0, 1, None):
        xa.backward(y, 2, batch_dim=batch_dim)
        for k, got in enumerate(x.xgrad):
            if batch_dim is None:
                ref = want[k]
            else:  # sample b: row (or column) b of y w.r.t. row (or column) b of x
                pick = (lambda b: (b, slice(None))) if batch_dim == 0 else (lambda b: (slice(None), b))
                ref = torch.stack([full[k][pick(b) * (k + 2)] for b in range(3)])
            assert got.shape == ref.shape, (batch_dim, k, got.shape, ref.shape)
            assert (got - ref).abs().max().item() < 1e-12, (batch_dim, k)

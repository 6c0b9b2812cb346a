"""Every rule in the registry, through its samples, against torch.func (float64).

The samples live in ``tests/samples_*.py`` (one file per family of rules);
adding an operator is its rule plus its sample entry. A test fails when a
registered rule has no sample that reaches it.
"""

import importlib
import pkgutil
import weakref
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import DEVICE, assert_close_to_torch, torch_partials

import xa
from xa.capture import Graph


def _samples():
    out = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith("samples_"):
            out.extend(importlib.import_module(info.name).CASES)
    return out


CASES = _samples()


def _inputs(name, shapes, domain):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if domain is None:
        return [torch.randn(*s, generator=gen, dtype=torch.float64, device="cpu") for s in shapes]
    low, high = domain
    return [low + (high - low) * torch.rand(*s, generator=gen, dtype=torch.float64, device="cpu") for s in shapes]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_operator_matches_torch(case):
    name, f, shapes, order, *domain = case
    # every rule in both directions: backprop of joint blocks, and forward jets; the values (recorded runs
    # give the same numbers, and their gradients are tests/test_train.py's)
    assert_close_to_torch(f, _inputs(name, shapes, domain[0] if domain else None), order, tol=1e-9,
                          directions=("backward", "forward"), create_graph=False)


def test_every_registered_rule_has_a_sample():
    reached = set()
    for name, f, shapes, _order, *domain in CASES:
        leaves = [x.to(DEVICE).requires_grad_(True) for x in _inputs(name, shapes, domain[0] if domain else None)]
        reached.update(v.name for v in Graph(f(*leaves)).values)
    from samples_indexing import NARROW_COPY_RECORDED

    unreachable = set() if NARROW_COPY_RECORDED else {"NarrowCopyBackward0"}  # this torch records no derivative
    # nodes torch records on the other kind of device only; the fused CUDA attention kernels take no float64
    other_device = CPU_ONLY | FUSED_CUDA_ATTENTION if DEVICE.type == "cuda" else GPU_ONLY
    missing = sorted(set(xa.supported()) - reached - set(COVERED_BY_OWN_TESTS) - other_device - unreachable)
    assert not missing, f"rules without a sample in tests/samples_*.py: {missing}"


# Nodes whose reference needs the test's own set-up (a random mask, an in-place op).
COVERED_BY_OWN_TESTS = {
    "NativeDropoutBackward0": "test_dropout_mask_is_a_constant",
    "UnsqueezeBackward1": "test_in_place_squeeze_and_unsqueeze",
    "SqueezeBackward3": "test_in_place_squeeze_and_unsqueeze",
    "SqueezeBackward4": "test_in_place_squeeze_and_unsqueeze",
    "SqueezeBackward5": "test_in_place_squeeze_and_unsqueeze",
    "HardsigmoidBackward0": "test_hardsigmoid_slope_is_exact",
    "_DDPSinkBackward": "test_ddp_sink_passes_its_inputs_through",
}


class _SinkOwner:
    _ddp_sink_clone = True  # what DistributedDataParallel's _DDPSink reads of its module


_OWNER = _SinkOwner()


def _through_sink(*tensors):
    """``tensors`` through the node ``DistributedDataParallel(find_unused_parameters=True)`` puts on its outputs."""
    from torch.nn.parallel.distributed import _DDPSink

    return _DDPSink.apply(weakref.ref(_OWNER), *tensors)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_ddp_sink_passes_its_inputs_through(direction):
    x = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    a, b = _through_sink(torch.tanh(x), x * x)
    xa.backward(a * b + a.sin(), 3, direction=direction)
    want = torch_partials(lambda z: torch.tanh(z) * z * z + torch.tanh(z).sin(), [x], 3)[0]
    for got, ref in zip(x.xgrad, want):
        assert (got - ref).abs().max().item() <= 1e-12


# Nodes torch records only on a CUDA device: the same rule as the CPU kernel's node
# (attention, batch norm), reading the attribute names of torch's generated Functions.h;
# CI has no GPU to reach them, XA_TEST_DEVICE=cuda does (and then misses the CPU-only one).
GPU_ONLY = {
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
    "CudnnBatchNormBackward0",
}
CPU_ONLY = {"ScaledDotProductFlashAttentionForCpuBackward0"}
FUSED_CUDA_ATTENTION = {name for name in GPU_ONLY if "Attention" in name}


def test_gpu_only_nodes_share_the_cpu_rule():
    from xa.registry import lookup

    attention, batch_norm = lookup("ScaledDotProductFlashAttentionForCpuBackward0"), lookup("NativeBatchNormBackward0")
    assert all(lookup(name) is (batch_norm if "BatchNorm" in name else attention) for name in GPU_ONLY)


def test_own_tests_reach_their_nodes():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    graphs = [torch.native_dropout(x, 0.5, True)[0],
              (x * 1.0).unsqueeze_(0).squeeze_(0).unsqueeze_(1).squeeze_((1,)).unsqueeze_(0).squeeze_(),
              F.hardsigmoid(x), _through_sink(x.sin())[0]]
    reached = {v.name for y in graphs for v in Graph(y).values}
    assert set(COVERED_BY_OWN_TESTS) <= reached
    assert all(callable(globals()[test]) for test in COVERED_BY_OWN_TESTS.values())


@pytest.mark.parametrize("spelling", ["F.dropout", "nn.Dropout", "native_dropout"])
def test_dropout_mask_is_a_constant(spelling):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(x)
    if spelling == "F.dropout":
        d = F.dropout(h, 0.4, training=True)
    elif spelling == "nn.Dropout":
        d = nn.Dropout(0.4).train()(h)
    else:
        d = torch.native_dropout(h, 0.4, True)[0]
    mask = (d != 0).to(torch.float64) / 0.6
    y = (d * h).sum() + d.prod()
    xa.backward(y, 3)
    from reference import torch_partials

    ref = torch_partials(lambda z: (torch.tanh(z) * mask * torch.tanh(z)).sum() + (torch.tanh(z) * mask).prod(),
                         [x], 3)[0]
    for k in range(3):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-10, rtol=0)


def test_in_place_squeeze_and_unsqueeze():
    # torch.func cannot differentiate through in-place ops, so the reference is the out-of-place twin.
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = (x * 1.0).unsqueeze_(0).squeeze_(0).unsqueeze_(1).squeeze_((1,)).unsqueeze_(0).squeeze_().tanh()
    from reference import torch_partials

    import xa

    xa.backward(y, 3)
    ref = torch_partials(lambda z: z.tanh(), [x], 3)[0]
    for k in range(3):
        assert torch.allclose(x.xgrad[k], ref[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("spelling", ["F.hardsigmoid", "nn.Hardsigmoid", "batched"])
def test_hardsigmoid_slope_is_exact(spelling):
    # torch's own derivative of hardsigmoid is the slope 1/6 rounded to float32 (off by 3e-8 relative in
    # float64, and torch.func has no forward-mode derivative of it past the first order): the reference is
    # the same function written as relu6(x + 3) / 6, whose derivatives torch gets exact.
    from reference import torch_partials

    gen = torch.Generator().manual_seed(11)
    x = 3 * torch.randn(2, 6, generator=gen, dtype=torch.float64)  # every piece is hit

    def f(z):
        h = F.hardsigmoid(z) if spelling != "nn.Hardsigmoid" else nn.Hardsigmoid()(z)
        return h * z.sin()

    def ref(z):
        return F.relu6(z + 3.0) / 6.0 * z.sin()

    for direction in ("backward", "forward"):
        leaf = x.clone().requires_grad_(True)
        if spelling == "batched":
            xa.backward(torch.func.vmap(f)(leaf), 3, batch_dim=0, direction=direction)
            want = [torch.stack([torch_partials(ref, [x[b]], 3)[0][k] for b in range(2)]) for k in range(3)]
        else:
            xa.backward(f(leaf), 3, direction=direction)
            want = torch_partials(ref, [x], 3)[0]
        for k in range(3):
            assert torch.allclose(leaf.xgrad[k], want[k], atol=1e-12, rtol=0), (direction, k + 1)


@pytest.mark.parametrize("dim", [-1, 0])
def test_glu_high_orders(dim):
    # torch.func cannot take glu past order 2 (no forward-mode derivative of glu_jvp): the reference is
    # the same function written out, a * sigmoid(b) with a, b the halves along dim.
    from reference import torch_partials

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def ref(z):
        a, b = z.chunk(2, dim)
        return a * torch.sigmoid(b) * z.sum()

    for direction in ("backward", "forward"):
        leaf = x.clone().requires_grad_(True)
        xa.backward(F.glu(leaf, dim) * leaf.sum(), 4, direction=direction)
        want = torch_partials(ref, [x], 4)[0]
        for k in range(4):
            scale = max(1.0, want[k].abs().max().item())
            assert (leaf.xgrad[k] - want[k]).abs().max().item() / scale <= 1e-9, (direction, k + 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_huber_high_orders(reduction):
    # torch has no forward-mode derivative of huber_loss_backward, so torch.func cannot check it past the
    # first order: the reference is the same loss written as delta * smooth_l1_loss(beta=delta).
    from reference import torch_partials

    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)  # |x - t| on both sides of delta
    delta = 0.75

    def f(z, huber):
        a, b = 2 * z.tanh(), t.sin() * z
        if huber:
            return F.huber_loss(a, b, reduction=reduction, delta=delta) * z.sum()
        return delta * F.smooth_l1_loss(a, b, reduction=reduction, beta=delta) * z.sum()

    want = torch_partials(lambda z: f(z, False), [x], 4)[0]
    for direction in ("backward", "forward"):
        leaf = x.clone().requires_grad_(True)
        xa.backward(f(leaf, True), 4, direction=direction)
        for k in range(4):
            scale = max(1.0, want[k].abs().max().item())
            assert (leaf.xgrad[k] - want[k]).abs().max().item() / scale <= 1e-9, (direction, k + 1)

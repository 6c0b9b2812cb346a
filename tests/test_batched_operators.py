"""Every operator sample again, batched: two samples through ``torch.func.vmap`` of the sample's function.

``vmap`` runs the sample on a leading batch dim the way a batched network
does (torch's batching rules pick the batched kernels, which record their own
autograd nodes), then ``xa.backward(..., batch_dim=0)`` must give each
sample's own derivatives, in both directions, equal to the sample's
unbatched derivatives from nested ``torch.func`` Jacobians.
"""

import warnings
import zlib

import pytest
import torch
from reference import DEVICE, torch_partials
from test_operators import CASES

import xa

B = 2
TOL = 1e-9

# Samples whose vmap is not one batched computation, each for the reason given. They must keep
# failing (strict), so that a change in torch or xa that makes them pass is noticed.
LOOPED = "vmap has no batching rule here and runs a loop over samples joined by stack: not a batched graph"
NOT_BATCHED = {
    "lazy clone": LOOPED,
    "F.max_unpool2d": LOOPED,
    "torch.linalg.solve vector": "a batch of matrices goes to the generic fallback (a dense factor over all samples)",
    "torch.linalg.solve matrix fan-out": "as torch.linalg.solve vector",
    "F.max_unpool3d": LOOPED,
    "torch.take": LOOPED,
    "Tensor.take": LOOPED,
    "pad flip roll fan-out": LOOPED,
    "embedding masked_select fan-out": LOOPED,
    "torch.diagflat": LOOPED,
    "torch.column_stack": "vmap cannot run column_stack (no batching rule, no fallback)",
    "index_select 0-d index": "vmap of index_select with a 0-d index gives another shape than the per-sample op",
    "torch.masked_select": "a data-dependent selection over the flattened batch: the sample dim does not pass "
                           "through it, so the leaf is shared (B, s', B n), not batched",
    "Tensor.masked_select broadcast mask": "as torch.masked_select",
}


def _params():
    return [pytest.param(c, id=c[0], marks=pytest.mark.xfail(strict=True, reason=NOT_BATCHED[c[0]]))
            if c[0] in NOT_BATCHED else pytest.param(c, id=c[0]) for c in CASES]


def _pair(name, shapes, domain):
    gen = torch.Generator().manual_seed(zlib.crc32(("batched " + name).encode()))
    if domain is None:
        return [torch.randn(B, *s, generator=gen, dtype=torch.float64) for s in shapes]
    low, high = domain
    return [low + (high - low) * torch.rand(B, *s, generator=gen, dtype=torch.float64) for s in shapes]


def _batched(f, xs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no batching rule for ...": torch runs a loop, still one graph
        return torch.func.vmap(f)(*xs)


@pytest.mark.parametrize("case", _params())
def test_operator_batched(case):
    name, f, shapes, order, *domain = case
    xs = [x.to(DEVICE) for x in _pair(name, shapes, domain[0] if domain else None)]
    refs = [torch_partials(f, [x[b] for x in xs], order) for b in range(B)]
    for direction in ("backward", "forward"):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        out = _batched(f, leaves)
        xa.backward(out, order, batch_dim=0, direction=direction, create_graph=False)  # values (gradients: test_train)
        for i, leaf in enumerate(leaves):
            for k in range(order):
                want = torch.stack([refs[b][i][k] for b in range(B)])
                got = leaf.xgrad[k]
                assert got.shape == want.shape, (direction, i, k + 1, got.shape, want.shape)
                err = (got - want).abs().max().item() / max(1.0, want.abs().max().item()) if got.numel() else 0.0
                assert err <= TOL, f"{direction}, input {i}, order {k + 1}: error {err:.2e}"

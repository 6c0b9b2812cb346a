"""Samples of the normalization layers (layer_norm, group_norm, batch_norm in training and eval mode).

Same format as ``samples_core.py``. Weight and bias are inputs of the sample
where the spelling allows it; the ``mixed slots`` samples feed one leaf to the
input, the weight and the bias of the same node, so every mixed slot is reached.
Modules are built once here (torch.func cannot run their constructors) with
random affine parameters and running statistics; batch_norm in training mode
uses no running statistics, whose in-place update torch.func cannot trace.

torch's own derivatives of layer_norm and of batch_norm in training mode,
the reference here, are wrong in two places (checked against torch.func of
the written-out formula, which xa matches): from the third order on whenever
the upstream gradient depends on the inputs (pytorch/pytorch#175754, #186256:
the double backward takes the saved mean and rstd as constants), and, under
forward mode, already at the second order for input and weight together
(#196700). So those samples go past order two only where the output is used
linearly, and no leaf feeds both their input and their weight; group_norm and
eval batch_norm have no such limit.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
C143 = torch.randn(1, 4, 3, dtype=torch.float64)
C32 = torch.randn(3, 2, dtype=torch.float64)
RM = torch.randn(2, dtype=torch.float64)
RV = torch.rand(2, dtype=torch.float64) + 0.5


def _randomized(module):
    """The module in float64 with random affine parameters and running statistics."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
        for name, b in module.named_buffers():
            if name == "running_mean":
                b.copy_(torch.randn_like(b))
            elif name == "running_var":
                b.copy_(torch.rand_like(b) + 0.5)
    return module


LN = _randomized(nn.LayerNorm(4))
LN_2D = _randomized(nn.LayerNorm((2, 3), eps=1e-3))
LN_NOBIAS = _randomized(nn.LayerNorm(3, bias=False))
LN_PLAIN = nn.LayerNorm(4, elementwise_affine=False).double()
GN = _randomized(nn.GroupNorm(2, 4))
GN_PLAIN = nn.GroupNorm(1, 2, affine=False).double()
BN1 = _randomized(nn.BatchNorm1d(2, track_running_stats=False))
BN2 = _randomized(nn.BatchNorm2d(2, eps=1e-3, track_running_stats=False))
BN2_EVAL = _randomized(nn.BatchNorm2d(2)).eval()
BN1_EVAL = _randomized(nn.BatchNorm1d(2, affine=False)).eval()

CASES = [
    # -- layer_norm: NativeLayerNormBackward0
    ("F.layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b), [(2, 4), (4,), (4,)], 4),
    ("F.layer_norm tanh", lambda x, w, b: F.layer_norm(x, (4,), w, b).tanh() * w, [(2, 4), (4,), (4,)], 2),
    ("F.layer_norm no affine", lambda x: F.layer_norm(x, [4]) * 2.0 + x, [(2, 4)], 4),
    ("F.layer_norm 2 dims", lambda x, w, b: F.layer_norm(x, (2, 3), w, b, eps=1e-2), [(2, 2, 3), (2, 3), (2, 3)], 3),
    ("F.layer_norm 2 dims * x", lambda x, w, b: F.layer_norm(x, (2, 3), w, b, eps=1e-2).sigmoid() * x,
     [(2, 2, 3), (2, 3), (2, 3)], 2),
    ("F.layer_norm weight only", lambda x, w: F.layer_norm(x, (3,), weight=w) - w, [(2, 3), (3,)], 3),
    ("F.layer_norm bias only", lambda x, b: F.layer_norm(x, (3,), bias=b), [(2, 3), (3,)], 3),
    ("F.layer_norm one row", lambda x, w, b: F.layer_norm(x, (4,), w, b), [(4,), (4,), (4,)], 4),
    ("torch.layer_norm", lambda x, w, b: torch.layer_norm(x, (3,), w, b, 1e-5), [(3, 3), (3,), (3,)], 3),
    ("nn.LayerNorm", lambda x: LN(x), [(2, 4)], 3),
    ("nn.LayerNorm tanh", lambda x: LN(x).tanh() * x, [(2, 4)], 2),
    ("nn.LayerNorm 2 dims", lambda x: LN_2D(x), [(2, 2, 3)], 3),
    ("nn.LayerNorm no bias", lambda x: LN_NOBIAS(x), [(1, 2, 3)], 3),
    ("nn.LayerNorm no affine", lambda x: LN_PLAIN(x).sigmoid(), [(2, 4)], 2),
    # -- group_norm: NativeGroupNormBackward0
    ("F.group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3), (4,), (4,)], 4),
    ("F.group_norm tanh", lambda x, w, b: F.group_norm(x, 2, w, b).tanh() * w.reshape(4, 1),
     [(1, 4, 2), (4,), (4,)], 4),
    ("F.group_norm no affine", lambda x: F.group_norm(x, 2).tanh(), [(1, 4, 2)], 3),
    ("F.group_norm 2d spatial", lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-3).tanh(),
     [(1, 4, 2, 2), (4,), (4,)], 3),
    ("F.group_norm no spatial", lambda x, w, b: F.group_norm(x, 1, w, b) * x, [(2, 3), (3,), (3,)], 3),
    ("group_norm mixed slots", lambda z: F.group_norm(z.reshape(1, 4, 1) * C143, 2, z, z.sigmoid()).sin(),
     [(4,)], 4),
    ("nn.GroupNorm", lambda x: GN(x).tanh(), [(2, 4, 2)], 3),
    ("nn.GroupNorm no affine", lambda x: GN_PLAIN(x) * x, [(2, 2, 3)], 3),
    # -- batch_norm in training mode: NativeBatchNormBackward0, batch statistics
    ("F.batch_norm training", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
     [(3, 2), (2,), (2,)], 4),
    ("F.batch_norm training tanh", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).tanh() * x,
     [(3, 2), (2,), (2,)], 2),
    ("F.batch_norm training 3d", lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-3) + x,
     [(2, 2, 3), (2,), (2,)], 3),
    ("F.batch_norm training no affine", lambda x: F.batch_norm(x, None, None, training=True),
     [(2, 2, 2, 2)], 3),
    ("nn.BatchNorm1d training", lambda x: BN1(x), [(3, 2, 2)], 3),
    ("nn.BatchNorm2d training", lambda x: BN2(x).tanh(), [(2, 2, 2, 1)], 2),
    # -- batch_norm in eval mode: running statistics, affine in x
    ("F.batch_norm eval", lambda x, w, b: F.batch_norm(x, RM, RV, w, b, training=False).tanh() * w,
     [(3, 2), (2,), (2,)], 4),
    ("F.batch_norm eval 3d", lambda x, w, b: F.batch_norm(x, RM, RV, w, b, False, eps=1e-2) * x,
     [(2, 2, 3), (2,), (2,)], 3),
    ("batch_norm eval mixed slots", lambda z: F.batch_norm(z * C32, RM, RV, z, z.tanh(), False).sin(), [(2,)], 4),
    ("nn.BatchNorm2d eval", lambda x: BN2_EVAL(x).tanh(), [(2, 2, 2, 1)], 3),
    ("nn.BatchNorm1d eval no affine", lambda x: BN1_EVAL(x) * x, [(3, 2)], 3),
]

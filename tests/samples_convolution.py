"""Samples of convolution, transposed convolution, average and max pooling, each in the spellings users write.

Same format as ``samples_core.py``. A convolution is linear in its input alone,
so the higher orders come from composing with ``tanh`` or a product; weight
and bias are inputs of the sample so their derivatives are checked too. Shapes
are tiny: the reference's order-k Jacobian has ``out * in^k`` entries.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import xa_ops.convolution  # noqa: F401  (registers the rules until xa_ops imports it)

torch.manual_seed(0)
CONV1 = nn.Conv1d(2, 4, 3, stride=2, padding=1).double()
CONV1_SAME = nn.Conv1d(2, 2, 3, padding="same", dilation=2, bias=False).double()
CONV2 = nn.Conv2d(2, 4, 3, padding=1, groups=2).double()
CONV2_SAME = nn.Conv2d(2, 2, 3, padding="same", bias=False).double()
W132 = torch.randn(3, 2, 2, dtype=torch.float64)  # constants: an operand that does not require grad
X125 = torch.randn(1, 2, 5, dtype=torch.float64)
B3 = torch.randn(3, dtype=torch.float64)
CONVT1 = nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1).double()
CONVT2 = nn.ConvTranspose2d(4, 2, 2, stride=(2, 1), groups=2, dilation=(1, 2), bias=False).double()
MAXPOOL2 = nn.MaxPool2d(2, stride=1, padding=1)

CASES = [
    # -- conv1d
    ("F.conv1d", lambda x, w, b: torch.tanh(F.conv1d(x, w, b)), [(1, 2, 5), (2, 2, 3), (2,)], 4),
    ("F.conv1d stride padding dilation groups",
     lambda x, w, b: torch.tanh(F.conv1d(x, w, b, stride=2, padding=2, dilation=2, groups=2)),
     [(2, 4, 7), (4, 2, 2), (4,)], 3),
    ("torch.conv1d fan-out", lambda x, w: torch.tanh(torch.conv1d(x, w, padding=1)) * x, [(1, 2, 5), (2, 2, 3)], 4),
    ("F.conv1d padding='same'", lambda x, w, b: F.conv1d(x, w, b, padding="same").sigmoid(),
     [(1, 3, 4), (3, 3, 3), (3,)], 3),
    ("F.conv1d unbatched", lambda x, w, b: F.conv1d(x, w, b, stride=2).tanh(), [(2, 6), (3, 2, 2), (3,)], 3),
    ("F.conv1d constant weight", lambda x, b: F.conv1d(x, W132, b, padding=1).tanh(), [(1, 2, 5), (3,)], 3),
    ("F.conv1d constant input and bias", lambda w: F.conv1d(X125, w, B3, dilation=2).tanh(), [(3, 2, 2)], 3),
    ("nn.Conv1d", lambda x: CONV1(x).tanh(), [(2, 2, 7)], 3),
    ("nn.Conv1d padding='same' dilation", lambda x: torch.tanh(CONV1_SAME(x)) * x, [(1, 2, 6)], 3),
    ("conv1d twice shared weight", lambda x, w: F.conv1d(torch.tanh(F.conv1d(x, w, padding=1)), w, padding=1),
     [(1, 2, 5), (2, 2, 3)], 4),
    # -- conv2d
    ("F.conv2d stride padding groups",
     lambda x, w, b: torch.tanh(F.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2)),
     [(1, 4, 4, 4), (4, 2, 3, 3), (4,)], 3),
    ("F.conv2d", lambda x, w, b: torch.tanh(F.conv2d(x, w, b)), [(1, 1, 3, 3), (2, 1, 2, 2), (2,)], 4),
    ("torch.conv2d per-dim stride padding dilation",
     lambda x, w: torch.conv2d(x, w, stride=(2, 1), padding=(0, 1), dilation=(1, 2)).tanh(),
     [(1, 2, 4, 4), (3, 2, 2, 2)], 3),
    ("F.conv2d depthwise", lambda x, w: (F.conv2d(x, w, groups=4) * F.conv2d(x, w, groups=4)).sum(),
     [(1, 4, 3, 3), (4, 1, 2, 2)], 4),
    ("F.conv2d unbatched", lambda x, w, b: F.conv2d(x, w, b, padding=1).tanh(), [(2, 3, 3), (2, 2, 2, 2), (2,)], 3),
    # (2, 2, 4, 4) peaked at 13 GB in the batched test: the order-3 reference is out * in^3 entries
    ("nn.Conv2d groups", lambda x: CONV2(x).tanh(), [(2, 2, 3, 3)], 3),
    ("nn.Conv2d padding='same' fan-out", lambda x: torch.tanh(CONV2_SAME(x)) * x, [(1, 2, 4, 4)], 3),
    ("conv2d then avg_pool2d", lambda x, w: F.avg_pool2d(torch.tanh(F.conv2d(x, w, padding=1)), 2).sum(),
     [(1, 1, 4, 4), (2, 1, 3, 3)], 4),
    # -- conv3d (the same node)
    ("F.conv3d", lambda x, w, b: F.conv3d(x, w, b, stride=2, padding=1).tanh(),
     [(1, 1, 3, 3, 3), (2, 1, 2, 2, 2), (2,)], 3),
    # -- avg_pool2d
    ("F.avg_pool2d", lambda x: torch.tanh(F.avg_pool2d(x, 2)), [(1, 2, 4, 4)], 3),
    ("F.avg_pool2d stride padding", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1).tanh(), [(2, 2, 5, 4)], 3),
    ("avg_pool2d count_include_pad=False",
     lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False).tanh(), [(1, 2, 5, 4)], 3),
    ("avg_pool2d ceil_mode", lambda x: F.avg_pool2d(x, 3, stride=2, ceil_mode=True).tanh(), [(1, 1, 6, 5)], 3),
    ("avg_pool2d ceil_mode padding no pad count",
     lambda x: F.avg_pool2d(x, 2, stride=2, padding=1, ceil_mode=True, count_include_pad=False).tanh(),
     [(1, 1, 5, 4)], 3),
    # the last window along H runs past the padding: torch divides by its clipped length, 2, not 3
    ("avg_pool2d ceil_mode padding", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True).tanh(),
     [(1, 1, 6, 5)], 3),
    ("avg_pool2d divisor_override", lambda x: F.avg_pool2d(x, 2, stride=1, divisor_override=3).tanh(),
     [(1, 1, 3, 4)], 3),
    ("nn.AvgPool2d unbatched", lambda x: nn.AvgPool2d((2, 3), stride=(1, 2))(x).sigmoid(), [(2, 4, 5)], 3),
    ("avg_pool2d fan-out", lambda x: torch.tanh(F.avg_pool2d(x, 3, stride=1, padding=1)) * x, [(1, 1, 3, 3)], 4),
    # -- avg_pool1d (recorded as unsqueeze, avg_pool2d, squeeze)
    ("F.avg_pool1d", lambda x: F.avg_pool1d(x, 3, stride=2, padding=1).tanh(), [(2, 2, 7)], 3),
    ("avg_pool1d ceil_mode no pad count",
     lambda x: F.avg_pool1d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False).tanh(),
     [(1, 2, 6)], 3),
    ("nn.AvgPool1d", lambda x: torch.tanh(nn.AvgPool1d(2)(x)) * x.sum(), [(1, 2, 6)], 3),
    # -- avg_pool3d
    ("F.avg_pool3d", lambda x: F.avg_pool3d(x, 2, stride=1, padding=1, ceil_mode=True).tanh(), [(1, 1, 3, 2, 3)], 3),
    # -- conv_transpose (the same node, transposed: weight is (C_in, C_out/groups, K..))
    ("F.conv_transpose1d", lambda x, w, b: torch.tanh(F.conv_transpose1d(x, w, b)), [(1, 2, 3), (2, 2, 3), (2,)], 4),
    ("F.conv_transpose1d stride padding output_padding dilation groups",
     lambda x, w, b: torch.tanh(F.conv_transpose1d(x, w, b, stride=2, padding=1, output_padding=1, groups=2,
                                                   dilation=2)),
     [(1, 4, 3), (4, 1, 2), (2,)], 3),
    ("torch.conv_transpose1d fan-out", lambda x, w: torch.tanh(torch.conv_transpose1d(x, w, stride=2)).sum() * x,
     [(1, 2, 3), (2, 1, 2)], 4),
    ("F.conv_transpose1d unbatched", lambda x, w: F.conv_transpose1d(x, w, stride=3, padding=1).tanh(),
     [(2, 3), (2, 2, 3)], 3),
    ("F.conv_transpose2d", lambda x, w, b: torch.tanh(F.conv_transpose2d(x, w, b)), [(1, 1, 2, 2), (1, 2, 2, 2), (2,)],
     4),
    ("F.conv_transpose2d stride padding output_padding groups",
     lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=(1, 0), groups=2).tanh(),
     [(1, 2, 2, 3), (2, 2, 3, 2), (4,)], 3),
    ("F.conv_transpose2d per-dim dilation padding",
     lambda x, w: torch.tanh(F.conv_transpose2d(x, w, stride=(1, 2), padding=(1, 0), dilation=(2, 1))),
     [(2, 2, 2, 2), (2, 1, 3, 2)], 3),
    ("nn.ConvTranspose1d", lambda x: CONVT1(x).tanh(), [(2, 2, 3)], 3),
    ("nn.ConvTranspose2d groups dilation", lambda x: torch.tanh(CONVT2(x)) * CONVT2(x), [(1, 4, 2, 2)], 3),
    ("conv2d then conv_transpose2d shared weight",
     lambda x, w: F.conv_transpose2d(torch.tanh(F.conv2d(x, w, stride=2)), w, stride=2),
     [(1, 1, 4, 4), (2, 1, 2, 2)], 3),
    # -- max_pool (piecewise linear: the first derivative selects the saved indices)
    ("F.max_pool2d", lambda x: torch.tanh(F.max_pool2d(x, 2)), [(1, 2, 4, 4)], 4),
    ("F.max_pool2d stride padding dilation",
     lambda x: F.max_pool2d(x, 3, stride=2, padding=1, dilation=(1, 2)).tanh(), [(2, 2, 4, 5)], 3),
    ("max_pool2d ceil_mode", lambda x: F.max_pool2d(x, (2, 3), stride=2, ceil_mode=True).tanh(), [(1, 1, 5, 6)], 3),
    ("max_pool2d return_indices fan-out",
     lambda x: torch.tanh(F.max_pool2d(x, 2, stride=1, return_indices=True)[0]).sum() * x, [(1, 1, 3, 3)], 4),
    ("nn.MaxPool2d unbatched", lambda x: MAXPOOL2(torch.tanh(x)) * MAXPOOL2(x), [(2, 3, 3)], 4),
    ("conv2d then max_pool2d", lambda x, w: F.max_pool2d(torch.tanh(F.conv2d(x, w, padding=1)), 2).sum(),
     [(1, 1, 4, 4), (2, 1, 3, 3)], 4),
    # -- max_pool1d (recorded as unsqueeze, max_pool2d, squeeze)
    ("F.max_pool1d", lambda x: F.max_pool1d(x, 3, stride=2, padding=1).tanh(), [(2, 2, 7)], 4),
    ("max_pool1d ceil_mode dilation", lambda x: (F.max_pool1d(x, 2, stride=2, dilation=2, ceil_mode=True) ** 3),
     [(1, 2, 7)], 4),
    ("nn.MaxPool1d", lambda x: torch.tanh(nn.MaxPool1d(2)(x)) * x.sum(), [(1, 2, 6)], 3),
    # -- max_pool3d
    ("F.max_pool3d", lambda x: F.max_pool3d(x, 2, stride=1, padding=1).tanh(), [(1, 1, 2, 3, 2)], 3),
]

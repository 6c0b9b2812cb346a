"""Samples of the losses: each reduction, each spelling, targets that require grad where torch allows it.

Same format as ``samples_core.py``. Targets, class indices and weights are
constants made once here. A loss that is quadratic or linear in its input
(mse, nll) is applied to a nonlinear function of it, so that its orders up
to 4 are not all zero. BCE takes probabilities: its samples draw from
(0.05, 0.95), where torch's clamp of the logs at -100 is far away; there
torch's own second and higher derivatives, which add 1e-12 to ``x (1 - x)``,
are off by about 1e-11 relative, the largest error of these samples.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import xa_ops.losses  # noqa: F401  (registers the rules until xa_ops imports it)

_gen = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=_gen, dtype=torch.float64, device="cpu").to(torch.get_default_device())


def _rand(*shape, low=0.0, high=1.0):
    return (low + (high - low) * torch.rand(*shape, generator=_gen, dtype=torch.float64, device="cpu")).to(
        torch.get_default_device())


PROB = (0.05, 0.95)
T23, T34 = _randn(2, 3), _randn(3, 4)  # regression targets
P23, P34 = _rand(2, 3, low=0.05, high=0.95), _rand(3, 4, low=0.05, high=0.95)  # probability targets
Q34 = torch.softmax(_randn(3, 4), 1)  # class probabilities
W3, W4 = _rand(3, low=0.5, high=1.5), _rand(4, low=0.5, high=1.5)  # class / entry weights
POS4 = _rand(4, low=0.5, high=2.0)  # pos_weight
IDX3 = torch.tensor([1, 0, 3])  # classes of a (3, 4) input
IDX3_IGNORED = torch.tensor([1, -100, 3])  # the default ignore_index
IDX0 = torch.tensor(2)  # the class of a (4,) input
IDX_HW = torch.tensor([[[0, 2], [1, 1]], [[2, 0], [1, 2]]])  # (N, H, W) classes of a (2, 3, 2, 2) input
IDX_D = torch.tensor([[2, 0, 1], [1, 1, 0]])  # (N, d) classes of a (2, 3, 3) input
NET = _randn(4, 3)  # a layer in front of the loss

CASES = [
    # -- mse_loss
    ("F.mse_loss", lambda x: F.mse_loss(x.tanh(), T34), [(3, 4)], 4),
    ("F.mse_loss sum", lambda x: F.mse_loss(x, T34, reduction="sum") * x.sum(), [(3, 4)], 3),
    ("F.mse_loss none", lambda x: F.mse_loss(x.sin(), T23, reduction="none"), [(2, 3)], 4),
    ("mse_loss target grad", lambda x, t: F.mse_loss(x, t) * t.sum(), [(2, 3), (2, 3)], 4),
    ("mse_loss target grad none", lambda x, t: F.mse_loss(x.tanh(), t.sin(), reduction="none"), [(2, 3), (2, 3)], 3),
    ("nn.MSELoss", lambda x: nn.MSELoss()(x, T23).exp(), [(2, 3)], 4),
    ("nn.MSELoss sum", lambda x, t: nn.MSELoss(reduction="sum")(x, t), [(2, 3), (2, 3)], 3),
    ("mse_loss fan-out", lambda x: F.mse_loss(x.tanh(), x.sin()), [(2, 3)], 4),
    ("mse_loss of a net", lambda x: F.mse_loss(torch.tanh(x @ NET), T23), [(2, 4)], 4),
    # -- l1_loss (recorded as sub, abs, mean / sum)
    ("F.l1_loss", lambda x: F.l1_loss(x.tanh(), T34), [(3, 4)], 4),
    ("F.l1_loss sum", lambda x, t: F.l1_loss(x, t.sin(), reduction="sum"), [(2, 3), (2, 3)], 4),
    ("F.l1_loss none", lambda x, t: F.l1_loss(x, t, reduction="none") * x, [(2, 3), (2, 3)], 3),
    ("nn.L1Loss", lambda x: nn.L1Loss()(torch.sigmoid(x @ NET), T23.sigmoid()), [(2, 4)], 4),
    # -- smooth_l1_loss (inputs ~N(0,1): both pieces are hit)
    ("F.smooth_l1_loss", lambda x: F.smooth_l1_loss(2 * x.tanh(), T34), [(3, 4)], 4),
    ("F.smooth_l1_loss beta sum", lambda x, t: F.smooth_l1_loss(x, t, reduction="sum", beta=0.5) * x.sum(),
     [(2, 3), (2, 3)], 4),
    ("nn.SmoothL1Loss none", lambda x, t: nn.SmoothL1Loss(reduction="none", beta=2.0)(2 * x.tanh(), t),
     [(2, 3), (2, 3)], 3),
    ("smooth_l1_loss beta=0", lambda x: F.smooth_l1_loss(x.tanh(), T23, beta=0.0), [(2, 3)], 3),
    # -- binary_cross_entropy
    ("F.binary_cross_entropy", lambda p: F.binary_cross_entropy(p, P34), [(3, 4)], 4, PROB),
    ("F.binary_cross_entropy weight sum", lambda p: F.binary_cross_entropy(p, P34, weight=W4, reduction="sum"),
     [(3, 4)], 4, PROB),
    ("F.binary_cross_entropy none", lambda p: F.binary_cross_entropy(p, P23, weight=W3, reduction="none"),
     [(2, 3)], 4, PROB),
    ("binary_cross_entropy target grad", lambda p, t: F.binary_cross_entropy(p, t), [(2, 3), (2, 3)], 4, PROB),
    ("binary_cross_entropy target grad none",
     lambda p, t: F.binary_cross_entropy(p, t, reduction="none") * t, [(2, 3), (2, 3)], 3, PROB),
    ("nn.BCELoss", lambda p, t: nn.BCELoss(weight=W3, reduction="sum")(p, t), [(2, 3), (2, 3)], 3, PROB),
    ("binary_cross_entropy fan-out", lambda p: F.binary_cross_entropy(p, p * p), [(2, 3)], 4, PROB),
    ("binary_cross_entropy of a net", lambda x: F.binary_cross_entropy(torch.sigmoid(x @ NET), P23),
     [(2, 4)], 4),
    # -- binary_cross_entropy_with_logits. torch.func's own third derivative fails ("ZeroTensors are immutable")
    # unless pos_weight is given or the target depends on the input, so the other samples stop at order 2.
    ("F.binary_cross_entropy_with_logits", lambda x: F.binary_cross_entropy_with_logits(x, P34), [(3, 4)], 2),
    ("bce_with_logits weights", lambda x: F.binary_cross_entropy_with_logits(x, P34, weight=W4, pos_weight=POS4),
     [(3, 4)], 4),
    ("nn.BCEWithLogitsLoss", lambda x: nn.BCEWithLogitsLoss(pos_weight=POS4)(3 * x, P34), [(3, 4)], 4),
    ("bce_with_logits none", lambda x: F.binary_cross_entropy_with_logits(x, P23, weight=W3, reduction="none"),
     [(2, 3)], 2),
    ("bce_with_logits target grad", lambda x, t: F.binary_cross_entropy_with_logits(x, t), [(2, 3), (2, 3)], 2, PROB),
    ("bce_with_logits target grad pos_weight sum",
     lambda x, t: F.binary_cross_entropy_with_logits(x + t, t.sigmoid(), pos_weight=POS4, reduction="sum"),
     [(3, 4), (3, 4)], 4, PROB),
    ("bce_with_logits target grad none",
     lambda x, t: nn.BCEWithLogitsLoss(pos_weight=POS4, reduction="none")(x * t, t.sigmoid()), [(3, 4), (3, 4)], 3),
    ("bce_with_logits fan-out", lambda x: F.binary_cross_entropy_with_logits(x, torch.sigmoid(x)), [(3, 4)], 4),
    ("bce_with_logits fan-out weight", lambda x: nn.BCEWithLogitsLoss(weight=W4, reduction="sum")(x, x.sigmoid()),
     [(3, 4)], 4),
    ("bce_with_logits of a net",
     lambda x: F.binary_cross_entropy_with_logits(x @ NET, P23, pos_weight=POS4[:3]), [(2, 4)], 4),
    # -- nll_loss
    ("F.nll_loss", lambda x: F.nll_loss(x.tanh(), IDX3), [(3, 4)], 4),
    ("F.nll_loss log_softmax", lambda x: F.nll_loss(F.log_softmax(x, 1), IDX3), [(3, 4)], 4),
    ("F.nll_loss weight", lambda x: F.nll_loss(x.sin(), IDX3, weight=W4), [(3, 4)], 3),
    ("F.nll_loss ignore_index", lambda x: F.nll_loss(x.tanh(), IDX3, weight=W4, ignore_index=3), [(3, 4)], 3),
    ("F.nll_loss ignored -100", lambda x: F.nll_loss(x.exp(), IDX3_IGNORED), [(3, 4)], 3),
    ("F.nll_loss sum", lambda x: F.nll_loss(x, IDX3, weight=W4, reduction="sum") * x, [(3, 4)], 3),
    ("F.nll_loss none", lambda x: F.nll_loss(x.sigmoid(), IDX3_IGNORED, weight=W4, reduction="none"), [(3, 4)], 4),
    ("nn.NLLLoss", lambda x: nn.NLLLoss()(x.tanh(), IDX3), [(3, 4)], 3),
    ("nll_loss 1d", lambda x: F.nll_loss(x.exp(), IDX0), [(4,)], 4),
    ("nll_loss 1d none", lambda x: F.nll_loss(x.tanh(), IDX0, weight=W4, reduction="none"), [(4,)], 3),
    ("nll_loss 2d", lambda x: F.nll_loss(x.tanh(), IDX_HW, weight=W3), [(2, 3, 2, 2)], 3),
    ("nll_loss 2d none", lambda x: F.nll_loss(x.sin(), IDX_HW, reduction="none", ignore_index=1), [(2, 3, 2, 2)], 3),
    ("nll_loss 3d input sum", lambda x: F.nll_loss(x.tanh(), IDX_D, reduction="sum"), [(2, 3, 3)], 3),
    # -- cross_entropy with class indices: log_softmax, then nll_loss
    ("F.cross_entropy", lambda x: F.cross_entropy(x, IDX3), [(3, 4)], 4),
    ("F.cross_entropy weight ignore_index", lambda x: F.cross_entropy(x, IDX3, weight=W4, ignore_index=0),
     [(3, 4)], 4),
    ("F.cross_entropy sum", lambda x: F.cross_entropy(x, IDX3_IGNORED, reduction="sum"), [(3, 4)], 4),
    ("F.cross_entropy none", lambda x: F.cross_entropy(x, IDX3, weight=W4, reduction="none"), [(3, 4)], 3),
    ("nn.CrossEntropyLoss", lambda x: nn.CrossEntropyLoss()(x, IDX3) * x, [(3, 4)], 3),
    ("cross_entropy 1d", lambda x: F.cross_entropy(x, IDX0), [(4,)], 4),
    ("cross_entropy spatial", lambda x: F.cross_entropy(x, IDX_D, weight=W3), [(2, 3, 3)], 3),
    ("cross_entropy of a net", lambda x: F.cross_entropy(torch.tanh(x @ NET), IDX3[:2]), [(2, 4)], 4),
    ("cross_entropy fan-out", lambda x: F.cross_entropy(x, IDX3) * F.nll_loss(x.tanh(), IDX3), [(3, 4)], 3),
    # -- cross_entropy with label smoothing: also a smoothing sum, masked where the target is ignored
    ("cross_entropy label_smoothing", lambda x: F.cross_entropy(x, IDX3, label_smoothing=0.2), [(3, 4)], 4),
    ("cross_entropy label_smoothing weight", lambda x: F.cross_entropy(x, IDX3_IGNORED, weight=W4,
                                                                       label_smoothing=0.1), [(3, 4)], 4),
    ("cross_entropy label_smoothing none", lambda x: F.cross_entropy(x, IDX3, reduction="none", ignore_index=3,
                                                                     label_smoothing=0.25), [(3, 4)], 3),
    ("nn.CrossEntropyLoss label_smoothing sum",
     lambda x: nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.3)(x, IDX_D), [(2, 3, 3)], 3),
    # -- cross_entropy with class probabilities as targets (which may require grad)
    ("cross_entropy probabilities", lambda x: F.cross_entropy(x, Q34), [(3, 4)], 4),
    ("cross_entropy probabilities weight none", lambda x: F.cross_entropy(x, Q34, weight=W4, reduction="none"),
     [(3, 4)], 3),
    ("cross_entropy probabilities target grad", lambda x, q: F.cross_entropy(x, q.softmax(1)), [(2, 3), (2, 3)], 4),
    ("cross_entropy probabilities label_smoothing",
     lambda x, q: F.cross_entropy(x, q, label_smoothing=0.2, reduction="sum"), [(2, 3), (2, 3)], 3),
    ("nn.CrossEntropyLoss probabilities 1d", lambda x: nn.CrossEntropyLoss(label_smoothing=0.1)(x, Q34[0]),
     [(4,)], 4),
    # -- huber_loss: torch has no forward-mode derivative of its backward, so torch.func stops at order 1
    # here; test_huber_high_orders in test_operators.py checks orders 2-4 against delta * smooth_l1
    ("F.huber_loss", lambda x: F.huber_loss(2 * x.tanh(), T34), [(3, 4)], 1),
    ("F.huber_loss delta sum target grad", lambda x, t: F.huber_loss(x, t, reduction="sum", delta=0.5),
     [(2, 3), (2, 3)], 1),
    ("nn.HuberLoss none", lambda x: nn.HuberLoss(reduction="none", delta=2.0)(3 * x, T23), [(2, 3)], 1),
]

"""Samples of the reductions (mean, logsumexp, log_softmax, max, min, amax, amin, sums over several dims).

Same format as ``samples_core.py``. max / min are smooth only away from ties;
random inputs have none, and the tie samples build them with ``expand`` to
check that torch's even split is followed.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import xa_ops.reductions  # noqa: F401  (registers the rules until xa_ops imports it)

CASES = [
    # -- mean
    ("torch.mean", lambda x: torch.mean(x.tanh()) * x, [(2, 3)], 4),
    ("Tensor.mean", lambda x: x.mean(), [(2, 3)], 2),
    ("Tensor.mean dim", lambda x: x.mean(1).sigmoid(), [(2, 3)], 4),
    ("torch.mean dims", lambda x: torch.mean(x.tanh(), (0, 2)) * x.mean(dim=(-1, -3)), [(2, 3, 2)], 3),
    ("mean keepdim", lambda x: x.tanh().mean(-1, keepdim=True) * x, [(2, 3)], 3),
    ("mean dim=[]", lambda x: x.tanh().mean(dim=[]), [(2, 2)], 3),
    ("F.adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x.tanh(), 1) * x, [(2, 3)], 3),
    ("nn.AdaptiveAvgPool2d", lambda x: nn.AdaptiveAvgPool2d(1)(x).tanh(), [(2, 3, 2)], 3),
    # -- sums over several dims
    ("torch.sum dims", lambda x: torch.sum(x.tanh(), (0, 2)), [(2, 3, 2)], 3),
    ("Tensor.sum neg dims", lambda x: x.sum(dim=(-1, -3)).tanh(), [(2, 3, 2)], 4),
    ("sum dim=()", lambda x: x.tanh().sum(dim=()), [(2, 2)], 3),
    # -- logsumexp
    ("torch.logsumexp", lambda x: torch.logsumexp(x, 1), [(2, 3)], 4),
    ("Tensor.logsumexp", lambda x: x.logsumexp(0) * x, [(3, 2)], 3),
    ("logsumexp keepdim", lambda x: x.logsumexp(-1, keepdim=True) * x, [(2, 3)], 3),
    ("logsumexp 1d", lambda x: torch.logsumexp(x, 0), [(4,)], 5),
    ("logsumexp adjacent dims", lambda x: torch.logsumexp(x, (1, 2)).tanh(), [(2, 2, 3)], 4),
    ("logsumexp split dims", lambda x: x.logsumexp((0, 2)), [(2, 2, 3)], 4),
    ("logsumexp split dims keepdim", lambda x: x.logsumexp((-1, 0), keepdim=True).sigmoid() * x, [(2, 3, 2)], 3),
    ("torch.special.logsumexp", lambda x: torch.special.logsumexp(x, 1).sum(), [(2, 3)], 4),
    # -- log_softmax
    ("torch.log_softmax", lambda x: torch.log_softmax(x, 1), [(2, 3)], 4),
    ("Tensor.log_softmax", lambda x: x.log_softmax(0) * x, [(3, 2)], 3),
    ("F.log_softmax", lambda x: F.log_softmax(x, dim=-1), [(4,)], 5),
    ("nn.LogSoftmax", lambda x: nn.LogSoftmax(dim=1)(x).tanh(), [(2, 3, 2)], 3),
    ("torch.special.log_softmax", lambda x: torch.special.log_softmax(x, 0).sum(0), [(3, 2)], 4),
    ("log_softmax fan-out", lambda x: x.log_softmax(-1) * x.softmax(-1), [(2, 3)], 4),
    # -- max / min along a dim
    ("torch.max dim", lambda x: torch.max(x.tanh(), 1).values * x.sum(1), [(2, 3)], 4),
    ("Tensor.max dim", lambda x: x.max(dim=0)[0].sigmoid(), [(3, 2)], 3),
    ("max keepdim", lambda x: x.max(-1, keepdim=True).values * x, [(2, 3)], 3),
    ("torch.min dim", lambda x: torch.min(x, 0).values.tanh(), [(3, 2)], 4),
    ("Tensor.min keepdim", lambda x: x.sigmoid().min(2, keepdim=True)[0] * x, [(2, 2, 3)], 3),
    # -- max / min of all entries
    ("torch.max", lambda x: torch.max(x).tanh() * x, [(2, 3)], 4),
    ("Tensor.max", lambda x: x.max() * x.sum(), [(3,)], 3),
    ("torch.min", lambda x: torch.min(x.tanh()), [(2, 3)], 4),
    ("Tensor.min", lambda x: x.min().sigmoid(), [(4,)], 3),
    ("max ties", lambda x: x.expand(3, 4).max().tanh(), [(4,)], 4),
    ("min ties", lambda x: x.unsqueeze(0).expand(2, 3).min() * x, [(3,)], 3),
    # -- amax / amin
    ("torch.amax", lambda x: torch.amax(x, 1).tanh(), [(2, 3)], 4),
    ("Tensor.amax dims keepdim", lambda x: x.amax((0, 2), keepdim=True) * x, [(2, 3, 2)], 3),
    ("amax all", lambda x: x.amax().sigmoid(), [(2, 3)], 3),
    ("torch.amin", lambda x: torch.amin(x.tanh(), 0) * x, [(3, 2)], 4),
    ("Tensor.amin neg dim", lambda x: x.amin(-1).sigmoid(), [(2, 3)], 3),
    ("amax ties", lambda x: x.unsqueeze(0).expand(3, 4).amax(0).tanh(), [(4,)], 4),
    ("amin ties dims", lambda x: x.expand(2, 3, 2).amin((0, 2)) * x.sum(), [(3, 1)], 3),
    # -- var, std: small groups run whole (dense T_k), larger ones as mean/sub/square/sum pieces
    ("torch.var", lambda x: torch.var(x, 1).tanh(), [(2, 3)], 4),
    ("Tensor.var all", lambda x: x.var() * x, [(2, 3)], 3),
    ("var correction=0 keepdim", lambda x: x.var(-1, correction=0, keepdim=True) * x, [(2, 3)], 3),
    ("var unbiased=False dims", lambda x: torch.var(x.sin(), (0, 2), unbiased=False), [(2, 3, 2)], 3),
    ("var pieces", lambda x: x.var(1).sin() * x.sum(1), [(4, 8)], 3),
    ("var pieces dims correction", lambda x: x.tanh().var((0, 2), correction=2, keepdim=True) * x, [(4, 3, 5)], 3),
    ("torch.std", lambda x: torch.std(x, 1), [(2, 3)], 4),
    ("Tensor.std all", lambda x: x.std().tanh() * x, [(2, 3)], 3),
    ("std correction=0 keepdim", lambda x: x.std(0, correction=0, keepdim=True) * x, [(3, 2)], 3),
    ("std pieces", lambda x: x.std(-1).log() * x.sum(-1), [(4, 8)], 3),
    ("std pieces dims", lambda x: x.std((1, 2), unbiased=False, keepdim=True) * x, [(2, 3, 3)], 3),
    # -- vector norms
    ("torch.linalg.vector_norm", lambda x: torch.linalg.vector_norm(x), [(2, 3)], 4),
    ("vector_norm dim keepdim", lambda x: torch.linalg.vector_norm(x, dim=1, keepdim=True) * x, [(2, 3)], 3),
    ("vector_norm ord 3", lambda x: torch.linalg.vector_norm(x, 3, dim=-1).tanh(), [(2, 3)], 4),
    ("vector_norm ord 1", lambda x: torch.linalg.vector_norm(x, 1, dim=0) * x, [(3, 2)], 3),
    # torch.func fails past order 2 here (an in-place op in torch's norm backward under vmap)
    ("vector_norm ord 0.5", lambda x: torch.linalg.vector_norm(x, 0.5), [(3,)], 2),
    ("vector_norm ord inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1).sin(), [(2, 3)], 3),
    ("vector_norm ord -inf", lambda x: torch.linalg.vector_norm(x.tanh(), -float("inf")) * x, [(4,)], 3),
    ("vector_norm ord 0", lambda x: torch.linalg.vector_norm(x, 0) * x, [(4,)], 3),
    ("Tensor.norm", lambda x: x.norm().sigmoid() * x, [(2, 3)], 3),
    ("torch.norm p dim", lambda x: torch.norm(x, p=3, dim=(0, 2)).tanh(), [(2, 3, 2)], 3),
    ("F.normalize", lambda x: F.normalize(x, dim=1), [(2, 3)], 4),
    ("F.pairwise_distance", lambda x, y: F.pairwise_distance(x, y).tanh(), [(2, 3), (2, 3)], 3),
    ("vector_norm pieces", lambda x: torch.linalg.vector_norm(x, dim=1).log() * x.sum(1), [(4, 8)], 3),
    ("vector_norm pieces ord 3", lambda x: torch.linalg.vector_norm(x, 3, dim=(0, 2)) * x[0, :, 0], [(4, 3, 5)], 3),
    ("vector_norm pieces ord 1 inf", lambda x: x.norm(1, dim=1) * x.norm(float("inf"), dim=1), [(4, 8)], 3),
    # -- values picked along a dim by torch's saved indices
    ("torch.sort values fan-out", lambda x: torch.sort(x, 1)[0] * x, [(2, 4)], 3),
    ("torch.topk", lambda x: torch.topk(x, 2, 0)[0].tanh(), [(3, 2)], 3),
    ("torch.kthvalue", lambda x: torch.kthvalue(x, 2, 1)[0] * x.sum(1), [(2, 3)], 3),
    ("torch.median dim", lambda x: torch.median(x, 1)[0].exp(), [(2, 3)], 3),
    ("torch.nanmedian dim keepdim", lambda x: torch.nanmedian(x, 0, keepdim=True)[0] * x, [(3, 2)], 3),
    ("torch.mode", lambda x: torch.mode(x, 1)[0].sin(), [(2, 3)], 3),
    ("torch.median all", lambda x: torch.median(x) * x, [(5,)], 3),
    ("torch.nanmedian all", lambda x: torch.nanmedian(x).exp(), [(2, 3)], 3),
    # -- dist: the norm of x - y (a composite whose norm is a composite too)
    ("torch.dist", lambda x, y: torch.dist(x, y, 3).exp(), [(2, 3), (3,)], 3),
    ("torch.dist p=2 fan-out", lambda x: torch.dist(x, x.flip(0)) * x, [(4,)], 3),
]

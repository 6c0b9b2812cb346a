"""Samples of the elementwise math and activation rules, orders 1-4 (some to 5)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

POS = (0.5, 2.0)  # domain for log, sqrt, fractional powers, denominators
PRELU = nn.PReLU(init=0.3).double()

CASES = [
    ("torch.exp", lambda x: torch.exp(x) * x, [(3,)], 5),
    ("Tensor.exp", lambda x: x.exp().sum(), [(2, 2)], 4),
    ("torch.exp2", lambda x: torch.exp2(x), [(3,)], 4),
    ("torch.expm1", lambda x: torch.expm1(x) * x, [(3,)], 4),
    ("torch.log", lambda x: torch.log(x) * x, [(3,)], 5, POS),
    ("Tensor.log", lambda x: x.log().sum(), [(2, 2)], 4, POS),
    ("torch.log2", lambda x: torch.log2(x), [(3,)], 4, POS),
    ("torch.log1p", lambda x: torch.log1p(x), [(3,)], 4, POS),
    ("torch.sin", lambda x: torch.sin(x) * x, [(3,)], 5),
    ("torch.cos", lambda x: torch.cos(x).prod(), [(3,)], 4),
    ("torch.tan", lambda x: torch.tan(x), [(3,)], 4, (-1.0, 1.0)),
    ("torch.sqrt", lambda x: torch.sqrt(x) * x, [(3,)], 4, POS),
    ("x ** 0.5", lambda x: x**0.5, [(3,)], 4, POS),
    ("torch.rsqrt", lambda x: torch.rsqrt(x), [(3,)], 4, POS),
    ("torch.square", lambda x: torch.square(x).tanh(), [(3,)], 4),
    ("x ** 3", lambda x: (x**3).sum(), [(3,)], 5),
    ("x ** -1.5", lambda x: x**-1.5, [(3,)], 4, POS),
    ("torch.pow number", lambda x: torch.pow(x, 2.5), [(3,)], 4, POS),
    ("pow tensors", lambda x, p: torch.pow(x, p), [(3,), (3,)], 4, POS),
    ("pow tensors broadcast", lambda x, p: x**p, [(2, 3), (3,)], 3, POS),
    ("number ** tensor", lambda p: 2.0**p, [(3,)], 4),
    ("torch.reciprocal", lambda x: torch.reciprocal(x) * x.sum(), [(3,)], 4, POS),
    ("1 / x", lambda x: 1.0 / x, [(3,)], 4, POS),
    ("torch.abs", lambda x: torch.abs(x) * x, [(3,)], 4),
    ("x / y", lambda x, y: x / y, [(3,), (3,)], 4, POS),
    ("torch.div broadcast", lambda x, y: torch.div(x, y).tanh(), [(2, 3), (3,)], 3, POS),
    ("x / number", lambda x: (x / 4.0).sin(), [(3,)], 4),
    ("x / const", lambda x: x / torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), [(3,)], 4),
    # activations
    ("F.elu", lambda x: F.elu(x, alpha=0.7), [(4,)], 4),
    ("nn.ELU", lambda x: nn.ELU()(x) * x, [(4,)], 4),
    ("F.selu", lambda x: F.selu(x), [(4,)], 4),
    # alpha = 0.5: torch computes 1/alpha in float32 (its own derivative is off by 1e-8 for alpha = 1.3)
    ("F.celu", lambda x: F.celu(x, alpha=0.5), [(4,)], 4),
    # slopes exact in float32: torch's own leaky_relu derivative rounds the slope to float32
    ("F.leaky_relu", lambda x: F.leaky_relu(x, 0.125) * x, [(4,)], 4),
    ("nn.LeakyReLU", lambda x: nn.LeakyReLU(0.25)(x).sum(), [(4,)], 4),
    ("F.prelu", lambda x, w: F.prelu(x, w) * x, [(2, 3, 2), (3,)], 4),
    ("nn.PReLU", lambda x: PRELU(x) * x, [(2, 3)], 3),
    ("F.gelu", lambda x: F.gelu(x), [(4,)], 4),
    ("F.gelu tanh", lambda x: F.gelu(x, approximate="tanh"), [(4,)], 4),
    ("nn.GELU", lambda x: nn.GELU()(x) * x, [(3,)], 3),
    ("F.silu", lambda x: F.silu(x), [(4,)], 4),
    ("nn.SiLU", lambda x: nn.SiLU()(x).sum(), [(4,)], 4),
    ("F.softplus", lambda x: F.softplus(x), [(4,)], 4),
    ("F.softplus beta", lambda x: F.softplus(x, beta=2.0, threshold=5.0) * x, [(4,)], 4),
    ("F.mish", lambda x: F.mish(x), [(4,)], 4),
    ("F.logsigmoid", lambda x: F.logsigmoid(x), [(4,)], 4),
    ("torch.erf", lambda x: torch.erf(x), [(4,)], 4),
    ("F.hardtanh", lambda x: F.hardtanh(x) * x, [(4,)], 4),
    ("F.relu6", lambda x: F.relu6(3 * x) * x, [(4,)], 4),
    ("torch.clamp", lambda x: torch.clamp(x, -0.5, 0.5) * x, [(4,)], 4),
    ("Tensor.clamp min", lambda x: x.clamp(min=0.1).sum() * x, [(4,)], 4),
    ("Tensor.clamp_min", lambda x: x.clamp_min(0.1) * x.tanh(), [(4,)], 3),
    ("Tensor.clamp_max", lambda x: x.clamp_max(-0.1) * x.sin(), [(2, 3)], 3),
    ("torch.where", lambda x, y: torch.where(x > 0, x, y) * y, [(4,), (4,)], 4),
    ("torch.where const", lambda x: torch.where(x > 0, x * x, 0.0), [(4,)], 4),
]

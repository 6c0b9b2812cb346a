"""Real networks end to end, against torch.func at the orders users ask for (float64)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close_to_torch

torch.manual_seed(0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = F.avg_pool2d(torch.relu(self.conv(x)), 2)
        return F.log_softmax(self.fc(torch.flatten(h, 1)), dim=1)


CNN = SmallCNN().double()
LABELS = torch.tensor([2, 0])


def test_cnn_order_2_wrt_input():
    def loss(x):
        return F.nll_loss(CNN(x), LABELS)

    assert_close_to_torch(loss, [torch.randn(2, 1, 4, 4, dtype=torch.float64)], 2, tol=1e-9)


def test_cnn_order_2_wrt_conv_weight():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)

    def loss(w):
        h = F.avg_pool2d(torch.relu(F.conv2d(x, w, CNN.conv.bias, padding=1)), 2)
        return F.nll_loss(F.log_softmax(CNN.fc(torch.flatten(h, 1)), dim=1), LABELS)

    assert_close_to_torch(loss, [CNN.conv.weight.detach().clone()], 2, tol=1e-9)


class EncoderBlock(nn.Module):
    def __init__(self, d=4, heads=2, hidden=8):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


BLOCK = EncoderBlock().double().train()


def test_transformer_block_order_2_wrt_input():
    # torch.func cannot run the fused attention kernel in forward mode: the reference
    # (run under torch.func) takes sdpa's math backend, the graph xa reads the fused node.
    from samples_attention import fused

    assert_close_to_torch(fused(lambda x: BLOCK(x).sum(-1)), [torch.randn(1, 3, 4, dtype=torch.float64)], 2, tol=1e-9)


PINN_W = [
    torch.randn(16, 6, dtype=torch.float64) / 2,
    torch.randn(16, 16, dtype=torch.float64) / 4,
    torch.randn(1, 16, dtype=torch.float64) / 4,
]


def test_pinn_with_sin_features_order_4_wrt_input():
    def u(x):
        features = torch.cat([x, torch.sin(3.0 * x)])  # Fourier-style input features
        h = torch.tanh(PINN_W[0] @ features)
        h = torch.tanh(PINN_W[1] @ h)
        return PINN_W[2] @ h

    assert_close_to_torch(u, [torch.randn(3, dtype=torch.float64)], 4, tol=1e-9)


# torch's own layer_norm and training batch_norm derivatives are wrong from the
# third order on in nonlinear contexts (pytorch/pytorch#175754, #186256) and under
# nested forward mode (#196700): here the reference is torch.func of the formula.
def _layer_norm_formula(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _batch_norm_formula(x, w, b, eps=1e-5):
    mean = x.mean((0, 2), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[:, None] + b[:, None]


def _against_formula(fused, formula, inputs, order):
    from reference import torch_partials

    import xa

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    xa.backward(fused(*leaves), order)
    ref = torch_partials(formula, inputs, order)
    for i, leaf in enumerate(leaves):
        for k in range(order):
            assert torch.allclose(leaf.xgrad[k], ref[i][k], atol=1e-9, rtol=1e-9), (i, k + 1)


def test_layer_norm_order_4_in_a_nonlinear_context_against_the_formula():
    x, w, b = (
        torch.randn(2, 4, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
    )
    _against_formula(
        lambda x, w, b: torch.tanh(F.layer_norm(x, (4,), w, b)) * x,
        lambda x, w, b: torch.tanh(_layer_norm_formula(x, w, b)) * x,
        [x, w, b],
        4,
    )


def test_batch_norm_training_order_4_in_a_nonlinear_context_against_the_formula():
    x, w, b = (
        torch.randn(3, 2, 2, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
    )
    _against_formula(
        lambda x, w, b: torch.sin(F.batch_norm(x, None, None, w, b, training=True)),
        lambda x, w, b: torch.sin(_batch_norm_formula(x, w, b)),
        [x, w, b],
        4,
    )

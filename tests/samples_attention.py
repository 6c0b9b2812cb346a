"""Samples of attention: scaled_dot_product_attention, baddbmm, nn.MultiheadAttention.

Same format as ``samples_core.py``. 4-d inputs reach the fused CPU kernel's
node; 3-d inputs, dropout and a mask that requires grad take torch's unfused
form (bmm, mul by a number, _safe_softmax). Self-attention feeds one leaf to
query, key and value, so every mixed slot is reached. Modules are built once
here (torch.func cannot run their constructors), in training mode with no
dropout; the ``functional_call`` samples pass the module's weights as inputs.

torch.func cannot run the fused CPU kernel in forward mode (NotImplementedError),
so under a torch.func transform (the reference) the samples run the same call
with sdpa's math backend, torch's own unfused form of the same function; the
graph xa reads is recorded outside any transform and holds the fused node.
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
MASK = torch.randn(3, 3, dtype=torch.float64)
MASK34 = torch.randn(3, 4, dtype=torch.float64)
BOOL = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
CAUSAL = nn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64)
KEEP = torch.tensor([[False, False, True]])  # key_padding_mask: the last key of the one batch is left out
MHA = nn.MultiheadAttention(4, 2, batch_first=True).double()
MHA_SEQ_FIRST = nn.MultiheadAttention(4, 2).double()
MHA_KV = nn.MultiheadAttention(4, 2, kdim=3, vdim=2, batch_first=True).double()
MHA_NOBIAS = nn.MultiheadAttention(4, 1, bias=False, batch_first=True).double()


def fused(fn):
    """``fn`` as written, or with sdpa's math backend when run by torch.func (see the module docstring)."""

    def run(*args):
        with sdpa_kernel(SDPBackend.MATH) if torch._C._are_functorch_transforms_active() else nullcontext():
            return fn(*args)

    return run


sdpa = F.scaled_dot_product_attention

CASES = [
    # -- F.scaled_dot_product_attention, fused: ScaledDotProductFlashAttentionForCpuBackward0
    ("sdpa", fused(lambda q, k, v: sdpa(q, k, v)), [(1, 2, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)], 3),
    ("sdpa self", fused(lambda x: sdpa(x, x, x)), [(1, 2, 3, 2)], 3),
    ("sdpa self tanh", fused(lambda x: sdpa(x, x.tanh(), x).tanh() * x), [(1, 2, 3, 2)], 3),
    ("sdpa longer keys", fused(lambda q, k, v: sdpa(q, k, v).sin()), [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)], 3),
    ("sdpa float mask", fused(lambda q, k, v: sdpa(q, k, v, attn_mask=MASK34)),
     [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)], 3),
    ("sdpa bool mask", fused(lambda x: sdpa(x, x, x, attn_mask=BOOL)), [(1, 2, 3, 2)], 3),
    ("sdpa is_causal", fused(lambda x: sdpa(x, x, x, is_causal=True)), [(1, 2, 3, 2)], 3),
    ("sdpa is_causal longer keys", fused(lambda q, k: sdpa(q, k, k, is_causal=True)), [(1, 1, 2, 2), (1, 1, 3, 2)], 3),
    ("sdpa scale", fused(lambda q, k, v: sdpa(q, k, v, scale=0.3)), [(2, 1, 3, 2), (2, 1, 2, 2), (2, 1, 2, 2)], 3),
    ("sdpa mask scale * causal",
     fused(lambda x: sdpa(x, x, x, attn_mask=MASK, scale=1.5) * sdpa(x, x, x, is_causal=True)), [(2, 1, 3, 2)], 2),
    # -- unfused form: MulBackward1, SafeSoftmaxBackward0
    # 3-d inputs: torch 2.13 takes the unfused form, torch 2.14 the fused kernel (through unsqueeze)
    ("sdpa 3d", fused(lambda q, k, v: sdpa(q, k, v)), [(2, 3, 2), (2, 3, 2), (2, 3, 2)], 3),
    ("sdpa 3d self mask", fused(lambda x: sdpa(x, x, x, attn_mask=MASK)), [(1, 3, 2)], 3),
    ("sdpa mask requires grad", fused(lambda x, m: sdpa(x, x, x, attn_mask=m)), [(1, 1, 3, 2), (3, 3)], 3),
    # -- baddbmm
    ("torch.baddbmm", lambda m, a, b: torch.baddbmm(m, a, b), [(2, 2, 3), (2, 2, 4), (2, 4, 3)], 3),
    ("baddbmm alpha beta bcast", lambda m, a, b: torch.baddbmm(m, a, b, beta=0.5, alpha=2.0).tanh(),
     [(3,), (2, 2, 4), (2, 4, 3)], 3),
    ("Tensor.baddbmm self", lambda a: a.baddbmm(a, a.mT).sigmoid(), [(2, 2, 2)], 3),
    # -- nn.MultiheadAttention: linear, bmm / baddbmm, softmax, mean (need_weights) or the fused kernel (not)
    ("nn.MultiheadAttention", lambda x: MHA(x, x, x)[0], [(1, 3, 4)], 3),
    ("MHA weights", lambda x: MHA(x, x, x)[1], [(2, 3, 4)], 2),
    ("MHA per-head weights", lambda x: MHA(x, x, x, average_attn_weights=False)[1], [(1, 2, 4)], 3),
    ("MHA need_weights=False", fused(lambda x: MHA(x, x, x, need_weights=False)[0].tanh()), [(1, 3, 4)], 3),
    ("MHA seq first", lambda x: MHA_SEQ_FIRST(x, x, x)[0], [(3, 1, 4)], 3),
    ("MHA seq first need_weights=False", fused(lambda x: MHA_SEQ_FIRST(x, x, x, need_weights=False)[0]),
     [(3, 2, 4)], 2),
    ("MHA unbatched", fused(lambda x: MHA(x, x, x, need_weights=False)[0] * x), [(2, 4)], 3),
    ("MHA attn_mask", lambda x: MHA(x, x, x, attn_mask=MASK)[0], [(1, 3, 4)], 3),
    ("MHA causal", lambda x: MHA(x, x, x, attn_mask=CAUSAL, is_causal=True)[0], [(1, 3, 4)], 3),
    ("MHA causal need_weights=False",
     fused(lambda x: MHA(x, x, x, need_weights=False, attn_mask=CAUSAL, is_causal=True)[0]), [(1, 3, 4)], 3),
    ("MHA key_padding_mask", fused(lambda x: MHA(x, x, x, key_padding_mask=KEEP, need_weights=False)[0]),
     [(1, 3, 4)], 3),
    ("MHA kdim vdim", lambda q, k, v: MHA_KV(q, k, v)[0], [(1, 2, 4), (1, 3, 3), (1, 3, 2)], 3),
    ("MHA kdim vdim need_weights=False", fused(lambda q, k, v: MHA_KV(q, k, v, need_weights=False)[0]),
     [(1, 2, 4), (1, 3, 3), (1, 3, 2)], 2),
    ("MHA no bias", lambda x: MHA_NOBIAS(x, x, x)[0], [(1, 2, 4)], 3),
    ("MHA weights as inputs", lambda x, w: functional_call(MHA, {"in_proj_weight": w}, (x, x, x))[0],
     [(1, 2, 4), (12, 4)], 3),
    ("MHA weights as inputs need_weights=False",
     fused(lambda x, w, b: functional_call(MHA, {"out_proj.weight": w, "out_proj.bias": b}, (x, x, x),
                                           {"need_weights": False})[0].tanh()), [(1, 2, 4), (4, 4), (4,)], 3),
]

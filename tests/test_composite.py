"""Composite nodes (xa.composite): softmax, log_softmax, logsumexp, the normalizations, attention
and linalg.solve run as graphs of structured pieces.

Every case is compared by value, in float64, with nested torch.func Jacobians of
the written-out formula (torch's own higher derivatives of layer_norm and
batch_norm are wrong from the third order on, see samples_normalization.py, and
the fused attention kernel has no forward-mode derivative), in both directions,
unbatched and per sample, at orders up to 4, with fan-out (the input also read
elsewhere) and non-scalar sources. The dense fused rules the composites replace
stay as the rule of a node that a user swaps in under their own name: both must
agree. The pieces keep the node's place in the graph (target=, retain_partials),
show in explain, and a node that mixes samples still raises with its name.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from reference import DEVICE, torch_partials
from torch.func import vmap

import xa
import xa.composite
from xa.capture import Graph
from xa.resolve import resolve

D = torch.float64
EPS = 1e-5


@pytest.fixture(autouse=True)
def every_node_a_composite(monkeypatch):
    """These small cases would keep their nodes whole (their dense factors are small): expand them all."""
    monkeypatch.setattr(xa.composite, "DENSE_LIMIT", 0)


def _norm(x, dims, eps=EPS):
    d = x - x.mean(dims, keepdim=True)
    return d * torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)


def _attention(q, k, v, scale=None, mask=None):
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return torch.softmax(s if mask is None else s + mask, dim=-1) @ v


MASK = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(3), device="cpu").to(DEVICE)
CAUSAL = torch.zeros(3, 3, dtype=D, device=DEVICE).masked_fill(
    ~torch.ones(3, 3, dtype=torch.bool, device=DEVICE).tril(), -torch.inf)

# (name, f as users write it, the written-out reference, input shapes, order)
CASES = [
    ("softmax * x", lambda x: torch.softmax(x, 1) * x, None, [(2, 5)], 3),
    ("softmax dim 0 of tanh", lambda x: torch.softmax(torch.tanh(x) * x, 0).sum(0), None, [(3, 4)], 4),
    ("softmax of a scalar source", lambda x, c: (torch.softmax(x, 0) * c).sum(), None, [(6,), (6,)], 4),
    ("log_softmax fan-out", lambda x: F.log_softmax(x, -1) * x.sin(), None, [(2, 4)], 3),
    ("cross_entropy", lambda x, w: F.cross_entropy(x @ w, torch.tensor([1, 0, 2])), None, [(3, 4), (4, 3)], 3),
    ("logsumexp keepdim", lambda x: torch.logsumexp(x, 1, keepdim=True) * x, None, [(2, 4)], 3),
    ("logsumexp two dims", lambda x: torch.logsumexp(x.exp(), (0, 2)), None, [(2, 3, 2)], 4),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (5,), w, b) * x,
     lambda x, w, b: (_norm(x, (1,)) * w + b) * x, [(2, 5), (5,), (5,)], 3),
    ("layer_norm two dims, no affine", lambda x: F.layer_norm(x, (2, 3)).tanh(),
     lambda x: _norm(x, (1, 2)).tanh(), [(2, 2, 3)], 4),
    ("layer_norm weight only", lambda x, w: F.layer_norm(x, (3,), weight=w).sin(),
     lambda x, w: (_norm(x, (1,)) * w).sin(), [(2, 3), (3,)], 3),
    ("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b).sin(),
     lambda x, w, b: (_norm(x.reshape(2, 2, 6), (2,)).reshape(2, 4, 3) * w.reshape(4, 1) + b.reshape(4, 1)).sin(),
     [(2, 4, 3), (4,), (4,)], 3),
    ("group_norm 2-d", lambda x: F.group_norm(x, 1).exp(),
     lambda x: _norm(x.reshape(2, 1, 4), (2,)).reshape(2, 4).exp(), [(2, 4)], 3),
    ("batch_norm training", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).sin() * x,
     lambda x, w, b: (_norm(x, (0, 2)) * w.reshape(4, 1) + b.reshape(4, 1)).sin() * x, [(3, 4, 2), (4,), (4,)], 3),
    ("batch_norm bias only", lambda x, b: F.batch_norm(x, None, None, None, b, training=True) ** 2,
     lambda x, b: (_norm(x, (0,)) + b) ** 2, [(3, 2), (2,)], 3),
    ("attention 3-d", lambda q, k, v: F.scaled_dot_product_attention(q, k, v).sin(),
     lambda q, k, v: _attention(q, k, v).sin(), [(2, 3, 4), (2, 5, 4), (2, 5, 3)], 3),
    ("attention causal 4-d", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).tanh(),
     lambda q, k, v: _attention(q, k, v, mask=CAUSAL).tanh(), [(1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 2)], 3),
    ("self-attention with mask and scale",
     lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=MASK, scale=0.3).exp(),
     lambda x: _attention(x, x, x, scale=0.3, mask=MASK).exp(), [(1, 1, 4, 3)], 3),
    # torch's own third derivatives of linalg.solve w.r.t. A are wrong: the reference is inv(A) @ b
    ("linalg.solve", lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3, dtype=D, device=a.device), b).sin(),
     lambda a, b: (torch.linalg.inv(a + 3 * torch.eye(3, dtype=D, device=a.device)) @ b).sin(),
     [(3, 3), (3,)], 3),
    ("linalg.solve matrix fan-out", lambda a: torch.linalg.solve(a + 3 * torch.eye(3, dtype=D, device=a.device), a) * a,
     lambda a: (torch.linalg.inv(a + 3 * torch.eye(3, dtype=D, device=a.device)) @ a) * a, [(3, 3)], 3),
]


def _inputs(name, shapes):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return [torch.randn(*s, generator=gen, dtype=D, device="cpu").to(DEVICE) for s in shapes]


def _check(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < 1e-9, f"{what}: error {err:.3e}"


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_composite_matches_torch(case, direction):
    name, f, ref, shapes, order = case
    xs = _inputs(name, shapes)
    want = torch_partials(ref or f, xs, order)
    leaves = [x.clone().requires_grad_() for x in xs]
    xa.backward(f(*leaves), order, direction=direction)
    for i, leaf in enumerate(leaves):
        for k in range(order):
            _check(leaf.xgrad[k], want[i][k], f"{name}, {direction}, input {i}, order {k + 1}")


# batch_norm normalizes over the samples (a BatchMixingError per sample); vmap has no batching rule
# for the fused CPU attention kernel with a mask, and runs a loop: not one batched graph.
# A batch of matrices takes solve to the generic fallback, whose dense factor spans all samples.
PER_SAMPLE = [c for c in CASES if "batch_norm" not in c[0] and "with mask" not in c[0] and "solve" not in c[0]]


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("case", PER_SAMPLE, ids=[c[0] for c in PER_SAMPLE])
def test_composite_per_sample(case, direction):
    """Two samples through vmap; each sample's own derivatives w.r.t. its first input, order up to 3."""
    name, f, ref, shapes, order = case
    order = min(order, 3)
    xs = _inputs("batched " + name, shapes)
    pairs = [torch.stack([x, x.flip(0) * 0.7 + 0.1]) for x in xs]
    leaves = [p.clone().requires_grad_(n == 0) for n, p in enumerate(pairs)]
    xa.backward(vmap(f)(*leaves), order, direction=direction, batch_dim=0)
    for b in range(2):
        rest = [p[b] for p in pairs[1:]]
        want = torch_partials(lambda x0, rest=rest: (ref or f)(x0, *rest), [pairs[0][b]], order)[0]
        for k in range(order):
            _check(leaves[0].xgrad[k][b], want[k], f"{name}, {direction}, sample {b}, order {k + 1}")


def _whole(rule):
    """The same rule with no ``composite``: the node stays whole (a user's own rule)."""
    return lambda ctx, slots: rule(ctx, slots)


@pytest.mark.parametrize("node,f,shapes", [
    ("SoftmaxBackward0", lambda x: torch.softmax(x * x, 1), [(2, 4)]),
    ("LogSoftmaxBackward0", lambda x: F.log_softmax(x, 0).tanh(), [(4, 2)]),
    ("LogsumexpBackward0", lambda x: torch.logsumexp(x, 1) * x[:, 0], [(2, 3)]),
    ("NativeGroupNormBackward0", lambda x, w: F.group_norm(x, 2, w), [(1, 4, 2), (4,)]),
])
def test_the_dense_rule_and_the_composite_agree(node, f, shapes):
    xs = _inputs(node, shapes)
    got = []
    for configurations in (None, {node: _whole(xa.registry.lookup(node))}):
        leaves = [x.clone().requires_grad_() for x in xs]
        y = f(*leaves)
        graph = Graph(y)
        names = {v.name for v in graph.values}
        resolve(graph, configurations or {})
        assert (node in {v.name for v in graph.values}) == (configurations is not None), names
        xa.backward(y, 3, configurations=configurations)
        got.append([leaf.xgrad for leaf in leaves])
    for a, b in zip(*got):
        for k in range(3):
            _check(a[k], b[k], f"{node} order {k + 1}")


@pytest.mark.parametrize("n,order,whole", [(3, 3, True), (4, 2, True), (30, 2, False), (8, 4, False)])
def test_small_dense_nodes_stay_whole(monkeypatch, n, order, whole):
    """At the default limit a softmax whose dense factor is small keeps its one dense term; both are exact."""
    monkeypatch.setattr(xa.composite, "DENSE_LIMIT", 4096)
    x = torch.randn(2, n, dtype=D, requires_grad=True)
    y = torch.softmax(x.sin(), 1) * x
    out = io.StringIO()
    xa.explain(y, order, file=out)
    assert ("SoftmaxBackward0 (exp)" not in out.getvalue()) == whole
    xa.backward(y, order)
    want = torch_partials(lambda x: torch.softmax(x.sin(), 1) * x, [x], order)[0]
    for k in range(order):
        _check(x.xgrad[k], want[k], f"order {k + 1}")


def test_softmax_output_is_still_a_target_and_retained():
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    s = torch.softmax(x * x, 1)
    y = (s * s.flip(1)).sum()
    sup = xa.Superset(y).retain_partials(s).backward(3)
    want = torch_partials(lambda t: (t * t.flip(1)).sum(), [s.detach()], 3)[0]
    for k in range(3):
        _check(sup.operator_partials(s)[k], want[k], f"retained order {k + 1}")
        _check(x.xgrad[k], torch_partials(lambda x: (torch.softmax(x * x, 1) * torch.softmax(x * x, 1).flip(1)).sum(),
                                          [x], 3)[0][k], f"leaf order {k + 1}")
    sup = xa.backward(y, 2, target=s)
    _check(sup.operator_partials(s)[1], want[1], "target order 2")


def test_explain_names_the_pieces_and_runs_what_it_shows():
    x = torch.randn(30, dtype=D, requires_grad=True)
    y = (torch.softmax(x, 0) * torch.arange(30, dtype=D)).sum()
    out = io.StringIO()
    plan = xa.explain(y, order=4, file=out)
    text = out.getvalue()
    for piece in ("SoftmaxBackward0 (exp)", "SoftmaxBackward0 (sum)", "SoftmaxBackward0 (divide)"):
        assert piece in text
    sup = xa.backward(y, 4)
    assert sup.plan.cached and sup.plan.flops == plan.flops
    assert _largest_factor(plan) <= 30  # no factor is dense: none is larger than the input


def _largest_factor(plan):
    """Entries of the largest local-factor operand any term reads."""
    return max(math.prod(shape) for step in plan.steps for t in step.terms
               for shape in t.shapes[len(t.sources):])


def test_a_softmax_over_the_samples_names_the_node():
    x = torch.randn(3, 2, dtype=D, requires_grad=True)
    with pytest.raises(xa.BatchMixingError, match="SoftmaxBackward0"):
        xa.backward(torch.softmax(x, 0), 2, batch_dim=0)
    assert x.grad is None and not hasattr(x, "xgrad")


@pytest.mark.parametrize("n,order", [(30, 4), (300, 2)])
def test_softmax_cases_once_slow(n, order):
    """Two softmax cases once slow (nested torch.func was 121x and 286x faster): exact, and no n^(k+1) factor."""
    gen = torch.Generator().manual_seed(n)
    x, c = (torch.randn(n, generator=gen, dtype=D, device="cpu").to(DEVICE) for _ in range(2))
    f = lambda x: (torch.softmax(x, 0) * c).sum()  # noqa: E731
    leaf = x.clone().requires_grad_()
    sup = xa.backward(f(leaf), order)
    want = torch_partials(f, [x], order)[0]
    for k in range(order):
        _check(leaf.xgrad[k], want[k], f"order {k + 1}")
    assert _largest_factor(sup.plan) <= n


def test_a_cached_composite_plan_reads_new_values():
    """The second call hits the plan cache with other values of x (the pieces' saved values change): new numbers."""
    f = lambda x: (torch.softmax(x, 1) * x).sum(1)  # noqa: E731
    for seed in (0, 1):
        x = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(seed), device="cpu").to(DEVICE)
        leaf = x.clone().requires_grad_()
        sup = xa.backward(f(leaf), 3)
        assert sup.plan.cached or seed == 0  # the second call runs the first call's plan
        want = torch_partials(f, [x], 3)[0]
        for k in range(3):
            _check(leaf.xgrad[k], want[k], f"call {seed}, order {k + 1}")

"""The public surface: Superset, target, retained partials, errors, and torch's graph left intact."""

import math

import pytest
import torch
from reference import torch_partials

import xa
from xa import terms


def leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def close(a, b, tol=1e-10):
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def test_backward_returns_superset_and_sets_xgrad_shapes():
    x, w = leaf(3), leaf(2, 3, seed=1)
    y = torch.tanh(w @ x)
    sup = xa.backward(y, order=3)
    assert isinstance(sup, xa.Superset)
    assert [t.shape for t in x.xgrad] == [(2, 3), (2, 3, 3), (2, 3, 3, 3)]
    assert [t.shape for t in w.xgrad] == [(2, 6), (2, 6, 6), (2, 6, 6, 6)]
    ref = torch_partials(lambda x, w: torch.tanh(w @ x), [x, w], 3)
    for k in range(3):
        assert close(x.xgrad[k], ref[0][k]) and close(w.xgrad[k], ref[1][k])


def test_torch_backward_still_works_and_grad_untouched():
    x = leaf(4)
    y = (torch.tanh(x) * x).sum()
    xa.backward(y, order=2)
    assert x.grad is None
    y.backward()
    assert close(x.grad, x.xgrad[0][0])


def test_float32_results_in_leaf_dtype():
    x = leaf(3).detach().float().requires_grad_(True)
    xa.backward(torch.sigmoid(x * x).sum(), order=3)
    ref = torch_partials(lambda z: torch.sigmoid(z * z).sum(), [x.double()], 3)[0]
    for k in range(3):
        assert x.xgrad[k].dtype == torch.float32
        assert (x.xgrad[k].double() - ref[k]).abs().max() < 1e-4


def test_only_leaves_the_source_depends_on_get_xgrad():
    x, unused = leaf(3), leaf(3, seed=1)
    xa.backward(torch.tanh(x).sum(), order=1)
    assert hasattr(x, "xgrad") and not hasattr(unused, "xgrad")


def test_target_leaf_only():
    x, w = leaf(3), leaf(3, seed=1)
    xa.backward(torch.tanh(x * w).sum(), order=2, target=w)
    assert hasattr(w, "xgrad") and not hasattr(x, "xgrad")
    ref = torch_partials(lambda x, w: torch.tanh(x * w).sum(), [x, w], 2)[1]
    assert close(w.xgrad[1], ref[1])


def test_target_intermediate_and_retained_partials():
    x = leaf(3)
    h = torch.tanh(x)
    g = h * 2.0
    y = torch.softmax(g * g, dim=0)
    sup = xa.Superset.construct(y)
    sup.retain_partials([g])
    sup.backward(order=3)
    ref = torch_partials(lambda g: torch.softmax(g * g, dim=0), [g], 3)[0]
    got = sup.operator_partials(g)
    assert len(got) == 3
    for k in range(3):
        assert close(got[k], ref[k])
    # the leaves got theirs in the same run
    refx = torch_partials(lambda x: torch.softmax((torch.tanh(x) * 2.0) ** 2, dim=0), [x], 3)[0]
    assert close(x.xgrad[2], refx[2], 1e-9)
    # an intermediate target: only that one is computed
    x.xgrad = None
    sup2 = xa.backward(y, order=2, target=h)
    refh = torch_partials(lambda h: torch.softmax((h * 2.0) * (h * 2.0), dim=0), [h], 2)[0]
    assert close(sup2.operator_partials(h)[1], refh[1])
    assert x.xgrad is None


def test_clear_retentions_and_remove_partials():
    x = leaf(3)
    h = torch.tanh(x)
    y = (h * h).sum()
    sup = xa.Superset.construct(y).retain_partials(h)
    sup.backward(order=2)
    assert sup.operator_partials(h)[0].shape == (1, 3)
    sup.clear_retentions()
    with pytest.raises(KeyError):
        sup.operator_partials(h)
    sup.remove_partials()
    assert not hasattr(x, "xgrad")


def test_retained_source_itself_is_identity():
    x = leaf(3)
    y = torch.tanh(x)
    sup = xa.Superset.construct(y).retain_partials(y).backward(order=2)
    first, second = sup.operator_partials(y)
    assert torch.equal(first, torch.eye(3, dtype=torch.float64))
    assert torch.equal(second, torch.zeros(3, 3, 3, dtype=torch.float64))


def test_plan_cache_skips_path_search():
    def run():
        x = leaf(4)
        w = leaf(4, 4, seed=1)
        return xa.backward(torch.softmax(torch.tanh(w @ x) * x, dim=0), order=3)

    first = run()
    before = terms.path_searches
    second = run()
    assert terms.path_searches == before
    assert second.plan.steps is first.plan.steps and second.plan.cached and not first.plan.cached


def test_explain_prints_plan_without_running(capsys):
    x = leaf(3)
    y = torch.tanh(x * x).sum()
    plan = xa.explain(y, order=3)
    text = capsys.readouterr().out
    assert "TanhBackward0" in text and "FLOPs" in text and "->" in text
    assert "incoming block" in text and "local factor" in text and "execution order" in text
    assert plan.flops > 0
    assert not hasattr(x, "xgrad")


def test_configurations_swap_a_rule_for_one_call():
    from xa.families import elementwise

    x = leaf(3)
    y = torch.tanh(x)
    # a deliberately different rule (derivatives of the identity) must be used for this call only
    fake = elementwise(lambda ctx, k: torch.ones_like(ctx.saved("result")) if k == 1 else None)
    xa.backward(y, order=1, configurations=[{"TanhBackward0": fake}])
    assert torch.equal(x.xgrad[0], torch.eye(3, dtype=torch.float64))
    xa.backward(y, order=1)
    assert close(x.xgrad[0], torch.diag(1 - torch.tanh(x.detach()) ** 2))


# ---------------------------------------------------------------- errors


class Cumsum(torch.autograd.Function):
    """A custom Function with no rule (its node, CumsumBackward, is named after the class: no fallback)."""

    @staticmethod
    def forward(ctx, x):
        return x.cumsum(0)

    @staticmethod
    def backward(ctx, g):
        return g.flip(0).cumsum(0).flip(0)


def test_unsupported_operator_names_node_place_and_closest_names():
    x = leaf(3)
    y = Cumsum.apply(torch.tanh(x))
    with pytest.raises(xa.UnsupportedOperatorError) as err:
        xa.backward(y, order=2)
    msg = str(err.value)
    assert "no rule for torch node CumsumBackward " in msg and "CumsumBackward0" in msg and "xa.supported()" in msg
    assert "MmBackward0" not in msg and len(msg) < 400  # not the whole registry on one line
    assert isinstance(err.value, xa.XaError)
    assert not hasattr(x, "xgrad")
    y.sum().backward()  # torch's graph is intact
    assert x.grad is not None


def test_an_operation_torch_cannot_differentiate_is_refused_by_name():
    from samples_indexing import NARROW_COPY_RECORDED

    x = leaf(4, 2)
    y = torch.narrow_copy(x, 0, 1, 2).tanh()
    if NARROW_COPY_RECORDED:  # newer torch differentiates narrow_copy, and so does xa
        assert "NarrowCopyBackward0" in xa.supported()
        xa.backward(y, order=2)
        assert x.xgrad[1].shape == (4, 8, 8)
        return
    with pytest.raises(xa.UnsupportedOperatorError, match="recorded no derivative") as err:
        xa.backward(y, order=2)
    assert "TanhBackward0" in str(err.value)  # where it sits
    assert not hasattr(x, "xgrad")


@pytest.mark.parametrize("order,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                       (True, TypeError), ("2", TypeError), (None, TypeError)])
def test_bad_order(order, exc):
    x = leaf(3)
    y = torch.tanh(x).sum()
    with pytest.raises(exc, match="order"):
        xa.backward(y, order=order)
    y.backward()
    assert x.grad is not None


def test_source_without_grad_fn():
    x = leaf(3)
    with pytest.raises(xa.SourceError, match="grad_fn"):
        xa.backward(x, order=1)
    with pytest.raises(xa.SourceError, match="grad_fn"):
        xa.backward(torch.ones(3), order=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        xa.backward([1.0], order=1)


def test_freed_graph():
    x = leaf(3)
    y = torch.tanh(x).sum()
    y.backward()
    with pytest.raises(xa.GraphFreedError, match="TanhBackward0"):
        xa.backward(y, order=2)


def test_modified_in_place():
    x = leaf(3)
    h = torch.tanh(x)
    y = (h * 3.0).sum()
    h.add_(1.0)
    with pytest.raises(xa.GraphModifiedError, match="in place"):
        xa.backward(y, order=2)


def test_target_not_in_graph():
    x, other = leaf(3), leaf(3, seed=1)
    y = torch.tanh(x).sum()
    with pytest.raises(xa.TargetError, match="does not depend on target"):
        xa.backward(y, order=2, target=other)
    with pytest.raises(TypeError, match="target"):
        xa.backward(y, order=2, target="x")
    assert not hasattr(x, "xgrad")
    y.backward()
    assert x.grad is not None


def test_bad_configurations():
    y = torch.tanh(leaf(3)).sum()
    with pytest.raises(TypeError, match="configuration"):
        xa.backward(y, order=1, configurations=[{"TanhBackward0": 3}])
    with pytest.raises(TypeError, match="configuration"):
        xa.backward(y, order=1, configurations=5)


def test_registry_refuses_duplicates():
    with pytest.raises(xa.RegistryError, match="TanhBackward0"):
        xa.register("TanhBackward0", lambda ctx, slots: None)


def test_bad_rule_is_reported_with_its_node():
    x = leaf(3)
    y = torch.tanh(x)

    def wrong(ctx, slots):
        lab = xa.LabelMaker()
        return lab.factor(lab.dims((2,)), [lab.dims((3,))])

    with pytest.raises(xa.RuleError, match="TanhBackward0"):
        xa.backward(y, order=1, configurations={"TanhBackward0": wrong})


# ---------------------------------------------------------------- direction


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_both_directions_agree_with_torch(direction):
    from reference import assert_close_to_torch

    w = torch.randn(4, 3, dtype=torch.float64)

    def f(x, a):
        h = torch.tanh(w @ x) * a
        return torch.softmax(h + h * h, dim=0)

    assert_close_to_torch(f, [torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)], 4,
                          tol=1e-9, direction=direction)


def test_auto_direction_prices_both_and_takes_the_cheaper():
    # a small input feeding a wide network: forward jets are far cheaper than backprop blocks
    x = leaf(3)
    w1, w2 = torch.randn(32, 3, dtype=torch.float64), torch.randn(1, 32, dtype=torch.float64)
    y = w2 @ torch.tanh(w1 @ x)
    sup = xa.backward(y, order=3)
    assert set(sup.plan.prices) == {"forward", "backward"}
    assert sup.plan.direction == "forward" and sup.plan.prices["forward"] < sup.plan.prices["backward"]
    # a wide input and a scalar output: backprop wins
    big = leaf(32)
    z = torch.tanh(big).sum()
    sup = xa.backward(z, order=3)
    assert sup.plan.direction == "backward" and sup.plan.prices["backward"] < sup.plan.prices["forward"]


def test_forward_direction_refuses_intermediate_partials():
    x = leaf(3)
    h = torch.tanh(x)
    with pytest.raises(ValueError, match="direction"):
        xa.backward(h.sum(), order=2, target=h, direction="forward")
    with pytest.raises(ValueError, match="direction"):
        xa.backward(h.sum(), order=2, direction="sideways")


# ---------------------------------------------------------------- memory budget


def _mlp_source(seed=0):
    x = leaf(4, seed=seed)
    w = leaf(24, 4, seed=seed + 1)
    v = torch.randn(6, 24, dtype=torch.float64)
    h = torch.tanh(w @ x)
    return x, w, torch.softmax(v @ (h * h + h), dim=0)


def test_over_budget_runs_in_chunks_with_the_same_numbers():
    x, w, y = _mlp_source()
    # target=x: wide hidden blocks, small results, so the blocks dominate the memory
    # the plain-data budget (with autograd's tape, tests/test_train.py)
    full = xa.backward(y, order=3, target=x, direction="backward", create_graph=False)
    want = [t.clone() for t in x.xgrad]
    chunked = xa.backward(y, order=3, target=x, direction="backward", max_memory=full.plan.peak_elements * 8 * 0.6,
                          create_graph=False)
    assert chunked.plan.block_shapes[(0,)][0] < y.numel()  # it did split the source rows
    for a, b in zip(x.xgrad, want):
        assert close(a, b, 1e-12)


def test_chunked_retained_partials():
    x = leaf(4)
    w = torch.randn(24, 4, dtype=torch.float64)
    h = torch.tanh(x)
    g = torch.tanh(w @ h)
    y = torch.softmax(g * g, dim=0)
    sup = xa.Superset.construct(y).retain_partials(h)
    want = [t.clone() for t in sup.backward(order=2, direction="backward", create_graph=False).operator_partials(h)]
    # the softmax factor and its workspace do not shrink with fewer rows: a budget a little under the peak
    got = sup.backward(order=2, max_memory=sup.plan.peak_elements * 8 * 0.9, create_graph=False).operator_partials(h)
    assert sup.plan.block_shapes[(0,)][0] < 24
    for a, b in zip(got, want):
        assert close(a, b, 1e-12)


def test_memory_budget_error_before_allocating():
    x, w, y = _mlp_source()
    with pytest.raises(xa.MemoryBudgetError, match="max_memory") as err:
        xa.backward(y, order=3, max_memory=1000)
    assert isinstance(err.value, MemoryError)
    assert "max_memory=1000 B" in str(err.value) and "0.0 MiB" not in str(err.value)  # units that show the numbers
    assert "forward plan would need" in str(err.value)  # with direction="auto", both directions' needs
    assert not hasattr(x, "xgrad") and not hasattr(w, "xgrad")
    with pytest.raises(TypeError, match="max_memory"):
        xa.backward(y, order=1, max_memory="1GB")
    with pytest.raises(ValueError, match="max_memory"):
        xa.backward(y, order=1, max_memory=0)
    y.sum().backward()
    assert x.grad is not None


def test_explain_reports_opt_einsums_own_flops_and_both_prices(capsys):
    import opt_einsum as oe

    x, w = leaf(4), leaf(3, 4, seed=1)
    y = torch.softmax(torch.tanh(w @ x) * (w @ x), dim=0)
    plan = xa.explain(y, order=3)
    text = capsys.readouterr().out
    assert "forward" in text and "backward" in text and "estimated peak" in text
    terms = [t for step in plan.steps for t in step.terms if t.info is not None]
    assert terms
    for t in terms:
        _, info = oe.contract_path(t.equation, *t.shapes, shapes=True)
        assert t.flops == int(info.opt_cost)
    assert plan.flops == sum(t.flops for t in terms)
    assert plan.peak_elements > 0 and plan.peak_bytes == plan.peak_elements * 8
    again = xa.explain(y, order=3)
    assert again.cached and "from the cache" in capsys.readouterr().out


def test_operator_list_is_exactly_the_registry():
    from pathlib import Path

    from xa.registry import README_END, README_START, supported_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    block = text[text.index(README_START):text.index(README_END) + len(README_END)]
    assert block == supported_markdown(), "docs/operators.md drifted from the registry: run `python3 dev.py readme`"


def test_rule_without_multi_output_is_refused_for_other_outputs():
    from xa.families import linear

    x = leaf(4)
    y = torch.tanh(x.split(2)[1])
    plain = linear(lambda ctx, lab: (lab.dims(ctx.out_shape),) * 2)
    with pytest.raises(xa.UnsupportedOperatorError, match="output 1"):
        xa.backward(y, order=1, configurations={"SplitBackward0": plain})


def test_views_hand_their_blocks_on_and_retained_partials_stay_right():
    """A view's blocks are its input's (no copy); a retained view's partials are still its own, unchanged."""
    x = leaf(6)
    W = leaf(2, 3, seed=1)
    v = x.view(2, 3)                     # a view, retained: its snapshot must not be the aliased block
    h = torch.tanh(v * W).reshape(-1)    # a reshape of a fresh value: its blocks alias, nobody keeps them
    y = torch.softmax(h * h.flip(0), dim=0)
    sup = xa.Superset.construct(y).retain_partials([v, h]).backward(order=3)
    f_v = lambda z: torch.softmax((torch.tanh(z * W.detach()).reshape(-1)) * torch.tanh(z * W.detach()).reshape(-1)
                                  .flip(0), dim=0)  # noqa: E731
    want = torch_partials(f_v, [v.detach()], 3)[0]
    for got, ref in zip(sup.operator_partials(v), want):
        assert torch.allclose(got, ref.reshape(got.shape), atol=1e-10, rtol=0)
    f_h = lambda z: torch.softmax(z * z.flip(0), dim=0)  # noqa: E731
    for got, ref in zip(sup.operator_partials(h), torch_partials(f_h, [h.detach()], 3)[0]):
        assert torch.allclose(got, ref.reshape(got.shape), atol=1e-10, rtol=0)
    f_x = lambda z: f_v(z.view(2, 3))  # noqa: E731
    want_x = torch_partials(f_x, [x.detach()], 3)[0]
    for got, ref in zip(x.xgrad, want_x):
        assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    plain = xa.backward(y, order=3)  # nothing retained: the views' blocks are handed on, not copied
    assert any(t.alias for s in plain.plan.steps if s.name == "ViewBackward0" for t in s.terms)
    for got, ref in zip(x.xgrad, want_x):
        assert torch.allclose(got, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_division_by_a_python_float_keeps_float64(order):
    """``x / math.sqrt(6)``: torch saves the number as a 0-d tensor that would compute in float32."""
    x = leaf(3)
    y = torch.tanh(x / math.sqrt(6)) * math.pi
    xa.backward(y, order)
    want = torch_partials(lambda z: torch.tanh(z / math.sqrt(6)) * math.pi, [x], order)[0]
    for got, ref in zip(x.xgrad, want):
        assert (got - ref).abs().max().item() <= 1e-14


def _constants(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)


_r = _constants()
ONLY_ONE_INPUT_REQUIRES_GRAD = [
    ("addmv", lambda x, b=_r(3), M=_r(3, 4): torch.addmv(b, M, x), (4,)),
    ("vdot", lambda x, c=_r(4): torch.vdot(c, x).reshape(1) * x, (4,)),
    ("addr", lambda x, b=_r(3, 4), c=_r(4): torch.addr(b, x, c), (3,)),
    ("cross", lambda x, c=_r(3): torch.linalg.cross(x, c) * x, (3,)),
    ("div floor", lambda x, c=_r(3).abs() + 1: torch.div(x, c, rounding_mode="floor") + x * x, (3,)),
    ("masked_fill", lambda x: x.masked_fill(torch.tensor([True, False, True]), 2.0) * x, (3,)),
    ("bilinear", lambda x, y=_r(1, 3), W=_r(2, 4, 3): torch.nn.functional.bilinear(x.reshape(1, 4), y, W), (4,)),
    # torch keeps neither the value nor the shape of these constants: the fallback calls the op with zeros
    # of the output's shape in their place, else a 0-d zero (their value is never read by the derivatives)
    ("masked_fill tensor value", lambda x, v=_r(1).reshape(()): x.masked_fill(torch.tensor([True, False, True]), v)
     * x, (3,)),
    ("index_put", lambda x, v=_r(2): x.index_put((torch.tensor([2, 0]),), v) * x, (3,)),
    ("index_put broadcast value", lambda x, v=_r(1): x.index_put((torch.tensor([1]),), v).tanh(), (3,)),
    # ... or of the shape the node's saved arguments give it (the slice a scatter or index_copy writes)
    ("diagonal_scatter", lambda x, c=_r(2): torch.diagonal_scatter(x, c, 1) * x, (2, 3)),
    ("select_scatter", lambda x, c=_r(2): torch.select_scatter(x, c, 1, -1).tanh(), (2, 3)),
    ("index_copy", lambda x, c=_r(3, 1): x.index_copy(-1, torch.tensor([1]), c) * x, (3, 2)),
    ("addmv bias", lambda x, M=_r(3, 4), v=_r(4): torch.addmv(x, M, v, beta=0.5).tanh() * x, (3,)),
    ("addr bias", lambda x, a=_r(3), b=_r(4): torch.addr(x, a, b).sin(), (3, 4)),
    # a solve's B is not saved when it does not require grad: rebuilt from the saved matrix and solution
    ("linalg.lu_solve LU", lambda x, B=_r(3, 2): torch.linalg.lu_solve(x + 3 * torch.eye(3, dtype=x.dtype),
                                                                       torch.tensor([1, 2, 3], dtype=torch.int32),
                                                                       B, adjoint=True) * x[0, 0], (3, 3)),
    ("solve_triangular", lambda x, B=_r(3, 2): torch.linalg.solve_triangular(x + 3 * torch.eye(3, dtype=x.dtype),
                                                                              B, upper=True).tanh(), (3, 3)),
    ("solve_triangular right unit", lambda x, B=_r(2, 3): torch.linalg.solve_triangular(
        x, B, upper=False, left=False, unitriangular=True) * x.sum(), (3, 3)),
]


@pytest.mark.parametrize("case", ONLY_ONE_INPUT_REQUIRES_GRAD, ids=[c[0] for c in ONLY_ONE_INPUT_REQUIRES_GRAD])
def test_nodes_whose_other_inputs_are_constants(case):
    """The generic fallback rebuilds a call whose other inputs do not require grad (torch keeps no shape, and
    may keep no value, for them): the derivatives w.r.t. the one that does, as torch's."""
    _, f, shape = case
    x = leaf(*shape)
    xa.backward(f(x), 2)
    for got, want in zip(x.xgrad, torch_partials(f, [x], 2)[0]):
        assert close(got, want, 1e-12)


def test_a_constant_input_torch_did_not_save_is_a_typed_refusal():
    x = leaf(3)
    with pytest.raises(xa.UnsupportedOperatorError, match="HypotBackward0.*'other'"):
        xa.backward(torch.hypot(x, _constants(1)(3)), 2)


def test_a_constant_whose_shape_torch_did_not_keep_is_a_typed_refusal():
    """slice_scatter's ``src`` that does not require grad: torch keeps neither its value nor its shape, and the
    op takes no stand-in of the output's shape or 0-d: refused, naming the argument, before any number is made."""
    x = leaf(3, 3)
    with pytest.raises(xa.UnsupportedOperatorError, match="'src'.*neither its value nor its shape"):
        xa.backward(torch.slice_scatter(x, _constants(2)(3, 2), 1, 0, 2) * x, 2)
    assert not hasattr(x, "xgrad")


def test_a_solves_right_hand_side_rebuilt_from_its_solution():
    """``B`` of solve_triangular, an intermediate torch did not save: rebuilt as ``A @ X``, checked against the
    saved solution; both inputs' derivatives as torch's."""
    f = lambda a, z: torch.linalg.solve_triangular(a + 3 * torch.eye(3, dtype=a.dtype), torch.tanh(z), upper=True)
    a, z = leaf(3, 3), leaf(3, 2, seed=1)
    xa.backward(f(a, z), 3)
    for x, want in zip((a, z), torch_partials(f, [a, z], 3)):
        for got, ref in zip(x.xgrad, want):
            assert close(got, ref, 1e-12)


@pytest.mark.parametrize("whole", [True, False], ids=["node whole", "pieces"])
@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_a_norm_of_a_zero_row_has_torchs_zero_derivatives(direction, whole, monkeypatch):
    """``vector_norm`` and ``F.normalize`` of a zero row (padding): torch's subgradient 0 at every order, not NaN."""
    import xa.composite

    monkeypatch.setattr(xa.composite, "DENSE_LIMIT", 4096 if whole else 0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1] = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    x.requires_grad_(True)
    for f in (lambda z: torch.linalg.vector_norm(z, dim=1),
              lambda z: torch.nn.functional.normalize(z, dim=1) * z.sum()):
        xa.backward(f(x), 3, direction=direction)
        for got, want in zip(x.xgrad, torch_partials(f, [x], 3)[0]):
            assert bool(torch.isfinite(got).all()) and close(got, want, 1e-12)


def test_a_complex_intermediate_is_a_typed_refusal_naming_the_node():
    x = leaf(8)
    y = torch.fft.rfft(x).abs().sum()
    with pytest.raises(xa.UnsupportedOperatorError, match="FftR2CBackward0 gives a complex tensor"):
        xa.backward(y, 2)
    assert not hasattr(x, "xgrad")
    y.backward()  # torch's graph is as it was
    assert x.grad is not None

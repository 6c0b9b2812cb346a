"""Each pairwise step of a contraction path (a tensordot, a broadcast product, a small sum, a diagonal read,
torch.einsum) gives torch.einsum's numbers, with and without the buffers an arena hands it."""

import string

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xa import terms

LABELS = string.ascii_lowercase[:7]


@st.composite
def equations(draw):
    """Two or three operands over a few labels: shared, summed, kept, batch (shared and kept), repeated."""
    sizes = {c: draw(st.integers(1, 5)) for c in LABELS}
    count = draw(st.integers(2, 3))
    operands = []
    for _ in range(count):
        labels = draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=4))
        operands.append("".join(labels))
    present = sorted(set("".join(operands)))
    out = draw(st.lists(st.sampled_from(present), unique=True, max_size=len(present)).map("".join))
    return f"{','.join(operands)}->{out}", sizes


def _run(equation, sizes, seed, buffers: bool):
    inputs = equation.split("->")[0].split(",")
    g = torch.Generator().manual_seed(seed)
    ops = [torch.randn([sizes[c] for c in labels], generator=g, dtype=torch.float64) for labels in inputs]
    _, path = terms.contraction(equation, tuple(tuple(o.shape) for o in ops))
    outs = copies = None
    if buffers:  # what the arena lays out: every step's result and a tensordot's (or small sum's) scratch
        outs = [torch.full((max(1, _numel(s)),), float("nan"), dtype=torch.float64) if writes else None
                for s, writes in zip(path.shapes, path.writes)]
        copies = [tuple(torch.full((c,), float("nan"), dtype=torch.float64) if c else None for c in pair)
                  for pair in path.copies]
    return path(*ops, backend="torch", outs=outs, copies=copies), torch.einsum(equation, *ops)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=equations(), seed=st.integers(0, 2**16))
def test_every_step_equals_einsum(case, seed):
    equation, sizes = case
    for buffers in (False, True):
        got, want = _run(equation, sizes, seed, buffers)
        assert got.shape == want.shape, equation
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=equation)


def test_a_sum_of_few_rows_with_a_batch_label_is_a_product_and_a_sum():
    """``rx,rx->x`` (a jet's squared rows summed per entry): a small sum, not torch.einsum's bmm of 1 x 1 blocks."""
    _, path = terms.contraction("abc,abc->bc", ((4, 50, 30), (4, 50, 30)))
    assert [type(step).__name__ for _, step in path.steps] == ["_SmallSum"]
    assert path.writes == [True] and path.copies == [(4 * 50 * 30, 0)]
    # many rows: still a product no larger than an operand, and one sum (a dense Laplacian's 400 inputs)
    _, path = terms.contraction("abc,abc->bc", ((400, 5, 30), (400, 5, 30)))
    assert [type(step).__name__ for _, step in path.steps] == ["_SmallSum"]
    # a product larger than either operand (labels free in both): the batched matmul, in less memory
    _, path = terms.contraction("abc,abd->bcd", ((4, 5, 30), (4, 5, 20)))
    assert all(type(step).__name__ != "_SmallSum" for _, step in path.steps)
    a, b = torch.randn(4, 50, 30, dtype=torch.float64), torch.randn(4, 50, 30, dtype=torch.float64)
    _, path = terms.contraction("abc,abc->bc", ((4, 50, 30), (4, 50, 30)))
    torch.testing.assert_close(path(a, b), (a * b).sum(0), rtol=0, atol=1e-14)


def test_a_summed_label_of_one_operand_alone_is_left_to_einsum():
    """A small sum multiplies before it sums: a label only one operand has would be multiplied out first."""
    _, path = terms.contraction("abc,bc->c", ((3, 4, 5), (4, 5)))
    assert all(type(step).__name__ != "_SmallSum" for _, step in path.steps)

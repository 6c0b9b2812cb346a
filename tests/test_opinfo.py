"""torch's operator database as the test source: every op of ``op_db`` with forward-mode AD.

Each op's smallest float64 samples (``tests/opinfo.py``) go through ``xa.backward`` in both
directions at orders up to 3 (capped so the reference stays small) and are compared value by
value with nested torch.func. An op is handled, or it is in ``opinfo_expected.EXPECTED`` with the
outcome it has and the reason (xa refuses it with a typed error, torch cannot give a reference,
...): a wrong number or an untyped error fails, and so does a handled share under 90%.
"""

import io

import pytest
import torch
from opinfo import ops, outcome
from opinfo_expected import EXPECTED

import xa

OPS = ops()
HANDLED_SHARE = 0.90
SUMMARY: dict = {}  # key -> (status, detail), for the terminal summary (conftest)


@pytest.fixture(scope="module")
def outcomes():
    """Every op's outcome, computed once (about half a minute)."""
    found = {key: outcome(op) for key, op in OPS.items()}
    SUMMARY.update(found)
    return found


@pytest.mark.parametrize("key", sorted(OPS))
def test_op(key, outcomes):
    status, detail = outcomes[key]
    assert status not in ("wrong", "crash"), f"{key}: {status}, {detail}"
    if status == "handled":
        assert float(detail) <= 1e-7
        return
    expected = EXPECTED.get(key)
    assert expected is not None, f"{key} is not handled ({status}: {detail}) and not in opinfo_expected.EXPECTED"
    assert status == expected[0], f"{key}: {status} ({detail}), expected {expected}"


def test_handled_share(outcomes):
    counted = [s for s, _ in outcomes.values() if s in ("handled", "refused", "wrong", "crash")]
    share = counted.count("handled") / len(counted)
    assert share >= HANDLED_SHARE, f"handled {counted.count('handled')} of {len(counted)} ({share:.0%})"


def test_fallback_is_marked_in_explain_and_refused_per_sample():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.special.i1e(x) * x
    out = io.StringIO()
    xa.explain(y, 2, file=out)
    assert "SpecialI1EBackward0 (fallback: dense, aten::special_i1e)" in out.getvalue()
    want = torch.func.jacfwd(torch.func.jacrev(lambda t: torch.special.i1e(t) * t))(x.detach())
    xa.backward(y, 2)
    assert torch.allclose(x.xgrad[1], want.reshape(6, 6, 6), atol=1e-12)
    del x.xgrad
    with pytest.raises(xa.BatchMixingError, match="generic fallback"):
        xa.backward(torch.func.vmap(lambda t: torch.special.i1e(t) * t)(x), 2, batch_dim=0)
    assert not hasattr(x, "xgrad")

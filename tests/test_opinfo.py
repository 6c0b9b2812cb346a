"""torch's operator database as the test source: every op of ``op_db`` with forward-mode AD.

Each op's smallest float64 samples (``tests/opinfo.py``) go through ``xa.backward`` in both
directions at orders up to 3 (capped so the reference stays small) and are compared value by
value with nested torch.func, in two modes: every float64 tensor argument requires grad
(``all``), or only the first one does and the others are constants of the call (``first``:
torch may then save neither their value nor their shape). An op is handled, or it is in
``opinfo_expected.EXPECTED[mode]`` with the outcome it has and the reason (xa refuses it with a
typed error, torch cannot give a reference, ...): a wrong number or an untyped error fails, and
so does a handled share under 90% (``all``) or 85% (``first``).
"""

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from opinfo import ops, outcome
from opinfo_expected import EXPECTED

import xa

OPS = ops()
MODES = ("all", "first")
HANDLED_SHARE = {"all": 0.90, "first": 0.85}
SUMMARY: dict = {}  # mode -> {key: (status, detail)}, for the terminal summary (conftest)


def _sweep(mode):
    return {key: outcome(op, mode=mode) for key, op in OPS.items()}


@pytest.fixture(scope="module", params=MODES)
def outcomes(request):
    """``(mode, {key: outcome})``: every op's outcome in one mode, computed once (a minute or two)."""
    mode = request.param
    # in a thread of its own, on a short stack: torch's sample generators walk the whole call stack (with
    # source lines: inspect.stack() looking for a unittest test, format_stack() in every manual_seed), and
    # under pytest's frames that more than doubled the sweep's time
    with ThreadPoolExecutor(max_workers=1) as pool:
        found = pool.submit(_sweep, mode).result()
    SUMMARY[mode] = found
    return mode, found


@pytest.mark.parametrize("key", sorted(OPS))
def test_op(key, outcomes):
    mode, found = outcomes
    status, detail = found[key]
    assert status not in ("wrong", "crash"), f"{key} ({mode}): {status}, {detail}"
    if status == "one-input":
        pytest.skip(detail)
    if status == "handled":
        assert float(detail) <= 1e-7
        return
    expected = EXPECTED[mode].get(key)
    assert expected is not None, (f"{key} ({mode}) is not handled ({status}: {detail}) and not in "
                                  f"opinfo_expected.EXPECTED[{mode!r}]")
    assert status == expected[0], f"{key} ({mode}): {status} ({detail}), expected {expected}"


def test_handled_share(outcomes):
    mode, found = outcomes
    counted = [s for s, _ in found.values() if s in ("handled", "refused", "wrong", "crash")]
    share = counted.count("handled") / len(counted)
    assert share >= HANDLED_SHARE[mode], f"{mode}: handled {counted.count('handled')} of {len(counted)} ({share:.0%})"


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

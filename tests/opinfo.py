"""torch's operator database as a test source: each op's own float64 sample inputs, through xa and torch.func.

``op_db`` (``torch.testing._internal.common_methods_invocations``) lists every
operator torch tests, with sample inputs. For each op that supports forward-mode
AD in float64, :func:`check` takes its smallest usable samples (every tensor
argument shrunk to at most 3 entries per dim when the op still runs on that, so
that a 20 x 20 elementwise sample is a 3 x 3 one), differentiates the op w.r.t.
every float64 tensor argument with ``xa.backward`` in both directions, and
compares every order with nested ``torch.func`` (``jacrev`` then ``jacfwd``;
where torch has no forward-mode derivative for the op, nested reverse mode,
``torch.autograd.functional.jacobian`` with ``create_graph``). The order is
capped per sample so that the reference stays small.

The sweep runs in two modes: ``"all"`` (every float64 tensor argument requires
grad) and ``"first"`` (only the first one does; the others are constants of the
call, which torch may not save, so the fallback must rebuild them or refuse).

``python tests/opinfo.py [order] [mode]`` prints each op's outcome and the counts.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass

import torch
from reference import torch_partials
from torch.autograd.functional import jacobian

import xa

D = torch.float64
MAX_ENTRIES = 200_000  # s * n^k of the largest reference tensor a sample may need
SHRINK = 3


def ops():
    """``{key: OpInfo}`` for every op with forward-mode AD and float64 on the CPU (key: ``name.variant``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db
    out = {}
    for op in op_db:
        if op.supports_forward_ad and D in op.supported_dtypes("cpu"):
            key = op.name + ("." + op.variant_test_name if op.variant_test_name else "")
            out.setdefault(key, op)
    return out


@dataclass
class Sample:
    """One call of the op: its arguments, with the positions of the float64 tensors xa differentiates."""

    op: object
    items: list  # the positional arguments (a list input is flattened in place: ("list", [tensors]))
    kwargs: dict
    where: list  # (argument index, index in a list argument or None) of each differentiated tensor

    def tensors(self):
        return [self.items[a] if b is None else self.items[a][b] for a, b in self.where]

    def __call__(self, *values):
        items = [list(x) if isinstance(x, (list, tuple)) else x for x in self.items]
        for (a, b), v in zip(self.where, values):
            if b is None:
                items[a] = v
            else:
                items[a][b] = v
        out = self.op(*items, **self.kwargs)
        if isinstance(out, (tuple, list)):  # several outputs (max with indices, ...): the first float one
            out = next(o for o in out if isinstance(o, torch.Tensor) and o.dtype == D)
        return out


def _where(items) -> list:
    where = []
    for a, x in enumerate(items):
        if isinstance(x, torch.Tensor) and x.dtype == D and x.numel():
            where.append((a, None))
        elif isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
            where.extend((a, b) for b, t in enumerate(x) if t.dtype == D and t.numel())
    return where


def _sample(op, s, shrink: bool, mode: str):
    items = [s.input, *s.args]
    if shrink:
        items = [_shrunk(x) for x in items]
    where = _where(items)
    if mode == "first":
        # the first float64 tensor alone requires grad, every other one is a constant of the call; a
        # sample with one such tensor is the same in both modes, and tested in "all"
        if len(where) < 2:
            return None
        where = where[:1]
    if not where:
        return None
    return Sample(op, items, dict(s.kwargs), where)


def _shrunk(x):
    if isinstance(x, torch.Tensor):
        for d, n in enumerate(x.shape):
            if n > SHRINK:
                x = x.narrow(d, 0, SHRINK)
        return x.clone()
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return [_shrunk(t) for t in x]
    return x


def samples(op, count: int = 2, mode: str = "all"):
    """Up to ``count`` usable samples, smallest first: each runs, gives a float64 tensor, is small, and
    gives the same on a second call.
    ``mode``: ``"all"`` differentiates every float64 tensor argument, ``"first"`` the first one alone
    (only samples with another float64 tensor argument, which stays a constant)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            raw = list(op.sample_inputs("cpu", D, requires_grad=False))
        except Exception:  # noqa: BLE001 - torch's own sample generator failing is its problem
            return []
        for s in raw:
            for shrink in (True, False):
                sample = _sample(op, s, shrink, mode)
                if sample is None:
                    continue
                try:
                    with torch.no_grad():
                        out = sample(*sample.tensors())
                        again = sample(*sample.tensors())
                except Exception:  # noqa: BLE001 - a shrunk sample the op refuses
                    continue
                if not isinstance(out, torch.Tensor) or out.dtype != D or out.numel() == 0:
                    continue
                if not torch.equal(out.nan_to_num(), again.nan_to_num()):
                    continue  # a fresh random draw per call (dropout in training mode): no reference
                n = max(t.numel() for t in sample.tensors())
                if out.numel() * n > MAX_ENTRIES:
                    continue
                found.append((out.numel() * n, len(found), sample))
                break
    return [s for _, _, s in sorted(found, key=lambda t: t[:2])[:count]]


def _has_constants(op) -> bool:
    """Whether a sample of ``op`` has two float64 tensor arguments (without running the op)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return any(len(_where([s.input, *s.args])) > 1 for s in op.sample_inputs("cpu", D, requires_grad=False))
        except Exception:  # noqa: BLE001 - torch's own sample generator failing is its problem
            return False


def order_for(sample, top: int) -> int:
    s = sample(*sample.tensors()).numel()
    n = max(t.numel() for t in sample.tensors())
    k = 1
    while k < top and s * n ** (k + 1) <= MAX_ENTRIES:
        k += 1
    return k


class RandomSample(Exception):
    """The sample's call draws random numbers (dropout in training mode): no reference; vmap says so."""


def reference(sample, order: int):
    """``out[i][k-1]``: d^k op / d(tensor i)^k flattened to xa's layout; torch.func (the suite's own
    :func:`reference.torch_partials`), else, where torch has no forward-mode derivative, nested reverse mode."""
    base = [t.detach() for t in sample.tensors()]
    try:
        return torch_partials(sample, base, order)
    except Exception as err:  # noqa: BLE001 - no forward-mode derivative (or no vmap rule): reverse mode
        if "random operation" in str(err):
            raise RandomSample from None
    s = sample(*base).numel()
    out = []
    for i, x in enumerate(base):
        def fi(z, i=i):
            vals = list(base)
            vals[i] = z
            return sample(*vals)

        per = []
        for k in range(1, order + 1):
            g = fi
            for level in range(1, k + 1):
                g = (lambda inner, cg: lambda z: jacobian(inner, z, create_graph=cg))(g, level < k)
            per.append(g(x).detach())
        out.append([d.reshape((s,) + (x.numel(),) * (k + 1)) for k, d in enumerate(per)])
    return out


def check(sample, order: int, direction: str, want=None) -> float:
    """The largest error of ``xa.backward`` against :func:`reference` (or ``want``), relative to max(1, |ref|)."""
    want = reference(sample, order) if want is None else want
    leaves = [t.detach().clone().requires_grad_() for t in sample.tensors()]
    y = sample(*leaves)
    xa.backward(y, order, direction=direction)
    worst = 0.0
    for i, leaf in enumerate(leaves):
        got = getattr(leaf, "xgrad", None)
        for k in range(order):
            w = want[i][k]
            if got is None:  # no path from the leaf: every derivative must be zero
                worst = max(worst, w.abs().max().item() if w.numel() else 0.0)
                continue
            assert got[k].shape == w.shape, (i, k + 1, got[k].shape, w.shape)
            if w.numel():
                worst = max(worst, (got[k] - w).abs().max().item() / max(1.0, w.abs().max().item()))
    return worst


def _solve_through_inverse(A, B, *, left=True, out=None):
    inverse = torch.linalg.inv(A)
    if B.dim() == A.dim() - 1:  # a batch of vectors
        return (inverse @ B.unsqueeze(-1)).squeeze(-1)
    return inverse @ B if left else B @ inverse


# Ops whose own third derivatives torch gets wrong (checked against a written-out formula): their
# reference is a written-out equivalent, whose derivatives torch gets right.
REFERENCE = {
    "linalg.solve": _solve_through_inverse,
    "linalg.solve_ex": lambda A, B, *, left=True, check_errors=False: (_solve_through_inverse(A, B, left=left),),
}

# Ops whose result is random (a fresh draw per call): no reference can be computed for them.
RANDOM = {"svd_lowrank", "pca_lowrank", "bernoulli", "nn.functional.rrelu", "nn.functional.fractional_max_pool2d",
          "nn.functional.fractional_max_pool3d", "nn.functional.dropout", "nn.functional.dropout2d",
          "nn.functional.dropout3d", "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout.with_train",
          "nn.functional.feature_alpha_dropout.without_train", "normal", "normal.number_mean", "uniform",
          "multinomial", "nn.functional.gumbel_softmax"}


def outcome(op, top: int = 3, mode: str = "all"):
    """``(status, detail)``: ``handled`` (with the error), ``refused`` (the typed error), ``no-sample``,
    ``no-grad`` (torch records no graph), ``torch-fails`` (no reference), or ``wrong``; in mode
    ``"first"`` (:func:`samples`), ``one-input`` where no sample has a second float64 tensor."""
    key = op.name + ("." + op.variant_test_name if op.variant_test_name else "")
    if key in RANDOM:
        return "random", "the op draws random numbers: no reference"
    found = samples(op, mode=mode)
    if not found:
        if mode == "first" and not _has_constants(op):
            return "one-input", "no sample has a second float64 tensor argument: the same as mode 'all'"
        return "no-sample", "no float64 sample small enough"
    worst, checked = 0.0, 0
    for sample in found:
        order = order_for(sample, top)
        leaves = [t.detach().clone().requires_grad_() for t in sample.tensors()]
        try:
            if sample(*leaves).grad_fn is None:
                return "no-grad", "the op's output records no graph"
            written = REFERENCE.get(key)
            want = reference(sample if written is None else dataclasses.replace(sample, op=written), order)
        except RandomSample:
            continue
        except Exception as err:  # noqa: BLE001
            return "torch-fails", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
        for direction in ("backward", "forward"):
            try:
                worst = max(worst, check(sample, order, direction, want))
            except xa.XaError as err:
                return "refused", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
            except Exception as err:  # noqa: BLE001 - an untyped error is a bug of xa: reported, not hidden
                return "crash", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        checked += 1
    if not checked:
        return "random", "every sample draws random numbers: no reference"
    return ("handled" if worst <= 1e-7 else "wrong"), f"{worst:.1e}"


if __name__ == "__main__":
    import signal
    import time
    from collections import Counter

    def _alarm(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, _alarm)
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    mode = sys.argv[2] if len(sys.argv) > 2 else "all"
    counts = Counter()
    for key, op in ops().items():
        signal.alarm(60)
        start = time.process_time()
        try:
            status, detail = outcome(op, top, mode)
        except TimeoutError:
            status, detail = "timeout", "over 60 s"
        signal.alarm(0)
        counts[status] += 1
        print(f"{key:45} {status:12} {time.process_time() - start:6.2f}s cpu  {detail}", flush=True)
    tested = counts["handled"] + counts["refused"] + counts["wrong"]
    print(dict(counts), f"handled {counts['handled']} of {tested} ({100 * counts['handled'] / max(tested, 1):.0f}%)",
          f"of {len(ops())} ops")

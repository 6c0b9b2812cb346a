"""Random computation graphs against torch.func, orders 1 to 4.

Hypothesis draws a small program: a few operators applied to a pool of
intermediate tensors (so a tensor can be read by several operators), with
weights that are either constants or further leaves. The program is turned
into Python source for ``f(*leaves)``, which is what runs, and is shown on
failure (``note``) together with the seed: a failing example is its own
reproduction. Constants are drawn once, outside ``f``, so that xa and
torch.func differentiate the same function.

Every tensor stays tiny (at most 12 elements, fewer for the leaves at the
higher orders), every value is float64 in about [-1.5, 1.5].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from reference import DEVICE, assert_close_to_torch

DTYPE = torch.float64
TOL = 1e-8
MAX_NUMEL = 12  # any tensor in a program
MAX_OPS = 6  # program lines, the folding-in of unreached leaves included
MAX_LEAF_NUMEL = {1: 12, 2: 12, 3: 8, 4: 6}  # per leaf, by order
NUMBERS = (2.0, -0.5, 0.75, -1.25, 1.5)  # python-number operands

SETTINGS = dict(deadline=None, database=None, derandomize=True, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def numel(shape) -> int:
    return math.prod(shape)


def broadcast(a, b) -> tuple:
    return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))


class Program:
    """A program under construction: source lines, the pool of tensors, leaves and constants."""

    def __init__(self, data, order: int, max_leaves: int, chain: bool = False):
        self.data = data
        self.chain = chain
        self.order = order
        self.max_leaves = max_leaves
        self.lines: list[str] = []
        self.pool: list[dict] = []  # {"name", "shape", "leaves": frozenset, "reads": int}
        self.leaves: list[tuple] = []  # (name, shape)
        self.consts: list[tuple] = []  # shapes
        self.features: set[str] = set()

    # ------------------------------------------------------------ drawing

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def dim_size(self):
        return self.draw(st.integers(1, 3))

    def leaf_shape(self):
        cap = MAX_LEAF_NUMEL[self.order]
        ndim = self.draw(st.sampled_from([2, 1, 3, 0]))
        shape = tuple(self.dim_size() for _ in range(ndim))
        while numel(shape) > cap:  # shrink the largest dim until it fits
            i = max(range(len(shape)), key=lambda j: shape[j])
            shape = shape[:i] + (shape[i] - 1,) + shape[i + 1:]
        return shape

    # ------------------------------------------------------------ pool

    def new_leaf(self, shape):
        name = f"x{len(self.leaves)}"
        self.leaves.append((name, tuple(shape)))
        entry = {"name": name, "shape": tuple(shape), "leaves": frozenset([name]), "reads": 0}
        self.pool.append(entry)
        return entry

    def const(self, shape):
        self.consts.append(tuple(shape))
        return {"name": f"C[{len(self.consts) - 1}]", "shape": tuple(shape), "leaves": frozenset(), "reads": 0}

    def pick(self, candidates=None):
        """An operand from the pool; index 0 is the newest, so shrinking prefers chains."""
        if candidates is None and self.chain:
            return self.pool[-1]
        cands = self.pool if candidates is None else candidates
        entry = cands[-1 - self.draw(st.integers(0, len(cands) - 1))]
        return entry

    def read(self, *entries):
        for e in entries:
            if e["leaves"]:  # constants do not count
                if e["reads"] >= 1:
                    self.features.add("fan-out")
                e["reads"] += 1

    def emit(self, expr, shape, *operands):
        shape = tuple(shape)
        assert numel(shape) <= MAX_NUMEL
        self.read(*operands)
        name = f"t{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        leaves = frozenset().union(*(o["leaves"] for o in operands))
        entry = {"name": name, "shape": shape, "leaves": leaves, "reads": 0}
        self.pool.append(entry)
        return entry

    def operand(self, shape, allow_pool=True):
        """A second operand of exactly ``shape``: a pool tensor, a new leaf or a constant."""
        kinds = ["const"]
        if len(self.leaves) < self.max_leaves and numel(shape) <= MAX_LEAF_NUMEL[self.order]:
            kinds.append("leaf")
        pooled = [e for e in self.pool if e["shape"] == tuple(shape)] if allow_pool else []
        if pooled:
            kinds.append("pool")
        kind = self.draw(st.sampled_from(kinds))
        if kind == "leaf":
            self.features.add("weight leaf")
            return self.new_leaf(shape)
        if kind == "pool":
            return self.pick(pooled)
        return self.const(shape)

    # ------------------------------------------------------------ operators

    def op_unary(self, a):
        s = a["shape"]
        fn = self.draw(st.sampled_from(["tanh", "sigmoid", "relu", "neg", "rsub", "scale", "rscale", "shift",
                                        "softmax", "F.relu", "F.softmax"]))
        n = a["name"]
        if fn in ("softmax", "F.softmax"):
            if not s:
                return None
            d = self.draw(st.integers(-len(s), len(s) - 1))
            expr = f"torch.softmax({n}, dim={d})" if fn == "softmax" else f"F.softmax({n}, dim={d})"
        elif fn == "neg":
            expr = f"-{n}"
        elif fn == "rsub":
            c = self.draw(st.sampled_from((1.0,) + NUMBERS))
            expr = f"{c} - {n}"
        elif fn in ("scale", "rscale"):
            c = self.draw(st.sampled_from(NUMBERS))
            expr = f"{n} * {c}" if fn == "scale" else f"{c} * {n}"
        elif fn == "shift":
            c = self.draw(st.sampled_from(NUMBERS))
            expr = f"{n} + {c}"
        elif fn == "F.relu":
            expr = f"F.relu({n})"
        else:
            expr = f"torch.{fn}({n})"
        return self.emit(expr, s, a)

    def op_reduce(self, a):
        s, n = a["shape"], a["name"]
        fn = self.draw(st.sampled_from(["sum", "sum_dim", "prod", "prod_dim", "sum_dims", "prod_dim"]))
        if fn in ("sum", "prod") or not s:
            fn = "prod" if fn.startswith("prod") else "sum"
            if fn == "prod" and numel(s) > 6:
                return None
            return self.emit(f"{n}.{fn}()", (), a)
        d = self.draw(st.integers(-len(s), len(s) - 1))
        keep = self.draw(st.booleans())
        out = list(s)
        if keep:
            out[d] = 1
        else:
            del out[d]
        if fn == "sum_dim":
            return self.emit(f"{n}.sum({d}, keepdim={keep})" if keep else f"torch.sum({n}, dim={d})", out, a)
        if fn == "prod_dim":
            if s[d] > 3:
                return None
            return self.emit(f"torch.prod({n}, {d}, keepdim={keep})", out, a)
        # sum over two dims
        if len(s) < 2:
            return None
        d2 = self.draw(st.sampled_from([i for i in range(len(s)) if i != d % len(s)]))
        dims = sorted({d % len(s), d2})
        out = [1 if i in dims else x for i, x in enumerate(s) if keep or i not in dims]
        return self.emit(f"{n}.sum(dim={tuple(dims)}, keepdim={keep})", out, a)

    def op_shape(self, a):
        s, n = a["shape"], a["name"]
        fn = self.draw(st.sampled_from(["permute", "transpose", "t", "T", "view", "reshape", "flatten",
                                        "unsqueeze", "expand"]))
        r = len(s)
        if fn == "permute":
            if r < 2:
                return None
            perm = self.draw(st.permutations(list(range(r))))
            return self.emit(f"{n}.permute({', '.join(map(str, perm))})", [s[i] for i in perm], a)
        if fn == "transpose":
            if r < 2:
                return None
            d0, d1 = self.draw(st.lists(st.integers(0, r - 1), min_size=2, max_size=2, unique=True))
            out = list(s)
            out[d0], out[d1] = out[d1], out[d0]
            return self.emit(f"torch.transpose({n}, {d0}, {d1})", out, a)
        if fn == "t":
            if r > 2:
                return None
            return self.emit(f"{n}.t()", s[::-1], a)
        if fn == "T":
            if r != 2:
                return None
            return self.emit(f"{n}.T", s[::-1], a)
        if fn in ("view", "reshape"):
            total = numel(s)
            out = self.draw(st.sampled_from(factorizations(total)))
            # view needs strides that fit; .contiguous() makes it so (a no-op where they already do)
            expr = f"{n}.contiguous().view({list(out)})" if fn == "view" else f"{n}.reshape({list(out)})"
            return self.emit(expr, out, a)
        if fn == "flatten":
            if r == 0:
                return self.emit(f"{n}.flatten()", (1,), a)
            start = self.draw(st.integers(0, r - 1))
            if start == r - 1:  # flattening one dim returns the tensor itself
                return None
            out = s[:start] + (numel(s[start:]),)
            return self.emit(f"torch.flatten({n}, {start})" if start else f"{n}.flatten()", out, a)
        if fn == "unsqueeze":
            d = self.draw(st.integers(0, r))
            return self.emit(f"{n}.unsqueeze({d})", s[:d] + (1,) + s[d:], a)
        # expand: a new leading dim, or a size-1 dim grown
        k = self.dim_size()
        ones = [i for i, x in enumerate(s) if x == 1]
        if ones and self.draw(st.booleans()):
            i = self.draw(st.sampled_from(ones))
            out = s[:i] + (k,) + s[i + 1:]
        else:
            out = (k,) + s
        if numel(out) > MAX_NUMEL:
            return None
        self.features.add("broadcast")
        return self.emit(f"{n}.expand({list(out)})", out, a)

    def op_binary(self, a):
        """``*``, ``+`` / ``torch.add(alpha=)``, ``-`` / ``torch.sub(alpha=)`` with broadcasting."""
        s = a["shape"]
        fn = self.draw(st.sampled_from(["mul", "add", "sub", "add_alpha", "sub_alpha"]))
        # the other operand: a pool tensor that broadcasts with a, or a new broadcastable shape
        compatible = [e for e in self.pool if _broadcastable(s, e["shape"])]
        if self.draw(st.booleans()):
            b = self.pick(compatible)  # may be a itself: x * x, x + x
            out = broadcast(s, b["shape"])
            if numel(out) > MAX_NUMEL:
                return None
        else:
            kept = [x if self.draw(st.booleans()) else 1 for x in s[len(s) - self.draw(st.integers(0, len(s))):]]
            # a new leading dim broadcasts ``a`` (only in front of all of a's dims)
            lead = (self.dim_size(),) if len(kept) == len(s) < 3 and self.draw(st.booleans()) else ()
            out = broadcast(s, lead + tuple(kept))
            if numel(out) > MAX_NUMEL:
                return None
            b = self.operand(lead + tuple(kept), allow_pool=False)
        if out != tuple(s) or out != b["shape"]:
            self.features.add("broadcast")
        x, y = (a, b) if self.draw(st.booleans()) else (b, a)
        if fn == "mul":
            return self.emit(f"{x['name']} * {y['name']}", out, a, b)
        if fn in ("add", "sub"):
            return self.emit(f"{x['name']} {'+' if fn == 'add' else '-'} {y['name']}", out, a, b)
        alpha = self.draw(st.sampled_from(NUMBERS))
        return self.emit(f"torch.{fn[:3]}({x['name']}, {y['name']}, alpha={alpha})", out, a, b)

    def op_matrix(self, a):
        """matmul / mm / mv / dot / bmm / F.linear / addmm against a weight (constant or leaf)."""
        s, n = a["shape"], a["name"]
        r = len(s)
        if r == 0:
            return None
        fn = self.draw(st.sampled_from(["right", "left", "vector", "linear", "addmm", "batched"]))
        m = self.dim_size()
        if fn == "right":  # a @ W
            if numel(s[:-1] + (m,)) > MAX_NUMEL:
                return None
            w = self.operand((s[-1], m))
            mm = "torch.mm" if r == 2 and self.draw(st.booleans()) else None
            expr = f"{mm}({n}, {w['name']})" if mm else f"{n} @ {w['name']}"
            return self.emit(expr, s[:-1] + (m,), a, w)
        if fn == "left":  # W @ a
            out = (m,) if r == 1 else s[:-2] + (m, s[-1])
            if numel(out) > MAX_NUMEL:
                return None
            w = self.operand((m, s[0] if r == 1 else s[-2]))
            return self.emit(f"torch.matmul({w['name']}, {n})", out, a, w)
        if fn == "vector":  # a @ v: dot for 1-D, mv for 2-D
            w = self.operand((s[-1],))
            return self.emit(f"{n} @ {w['name']}", s[:-1], a, w)
        if fn == "linear":
            out = s[:-1] + (m,)
            if numel(out) > MAX_NUMEL:
                return None
            w = self.operand((m, s[-1]))
            if self.draw(st.booleans()):
                bias = self.operand((m,))
                return self.emit(f"F.linear({n}, {w['name']}, {bias['name']})", out, a, w, bias)
            return self.emit(f"F.linear({n}, {w['name']})", out, a, w)
        if fn == "addmm":
            if r != 2 or s[0] * m > MAX_NUMEL:
                return None
            w = self.operand((s[1], m))
            bshape = self.draw(st.sampled_from([(s[0], m), (m,), (1, m)]))
            bias = self.operand(bshape)
            if bias["shape"] != (s[0], m):
                self.features.add("broadcast")
            return self.emit(f"torch.addmm({bias['name']}, {n}, {w['name']})", (s[0], m), a, bias, w)
        # batched: a (b, i, k) @ W (b, k, m)
        out = (s[0], s[1], m) if r == 3 else ()
        if r != 3 or numel(out) > MAX_NUMEL:
            return None
        w = self.operand((s[0], s[2], m))
        expr = f"torch.bmm({n}, {w['name']})" if self.draw(st.booleans()) else f"{n} @ {w['name']}"
        return self.emit(expr, out, a, w)

    def op_residual(self, a):
        """``h + g(h)`` for a shape-preserving ``g``: h is read twice."""
        s, n = a["shape"], a["name"]
        g = self.draw(st.sampled_from(["tanh", "sigmoid", "relu", "softmax", "square", "linear"]))
        if g == "softmax":
            if not s:
                return None
            inner = f"torch.softmax({n}, dim=-1)"
        elif g == "square":
            inner = f"{n} * {n}"
        elif g == "linear":
            if not s:
                return None
            w = self.operand((s[-1], s[-1]))
            self.features.add("residual")
            return self.emit(f"{n} + torch.tanh({n} @ {w['name']})", s, a, a, w)
        else:
            inner = f"torch.{g}({n})"
        self.features.add("residual")
        return self.emit(f"{n} + {inner}", s, a, a)

    # repeated names weigh the draw; reductions last, so that shrinking avoids them
    OPS = ("op_unary", "op_binary", "op_matrix", "op_shape", "op_residual",
           "op_unary", "op_binary", "op_matrix", "op_shape", "op_reduce")

    def step(self):
        a = self.pick()
        op = self.draw(st.sampled_from(self.OPS))
        return getattr(self, op)(a)

    # ------------------------------------------------------------ finishing

    def finish(self, scalar_source: bool):
        """Make the last tensor the source and fold in any leaf it does not reach yet."""
        out = self.pool[-1]
        for name, _ in self.leaves:
            if name in out["leaves"]:
                continue
            t = next(e for e in reversed(self.pool) if name in e["leaves"])
            how = self.draw(st.sampled_from(["add_sum", "mul_sigmoid", "add_tanh_sum"]))
            if how == "add_sum":
                out = self.emit(f"{out['name']} + {t['name']}.sum()", out["shape"], out, t)
            elif how == "mul_sigmoid":
                out = self.emit(f"{out['name']} * torch.sigmoid({t['name']}.sum())", out["shape"], out, t)
            else:
                out = self.emit(f"{out['name']} + torch.tanh({t['name']}).sum()", out["shape"], out, t)
        if scalar_source and out["shape"]:
            out = self.emit(f"{out['name']}.sum()", (), out)
        self.source = out
        shape = out["shape"]
        self.features.add("scalar source" if numel(shape) == 1 else f"{min(len(shape), 2)}-D source")
        self.features.add(f"{len(self.leaves)} leaves")
        self.features.add(f"order {self.order}")
        self.features.add(f"{len(self.lines)} ops")

    def source_code(self) -> str:
        args = ", ".join(name for name, _ in self.leaves)
        body = "\n".join("    " + line for line in self.lines)
        return f"def f({args}):\n{body}\n    return {self.source['name']}\n"


def _broadcastable(a, b) -> bool:
    try:
        torch.broadcast_shapes(tuple(a), tuple(b))
    except RuntimeError:
        return False
    return True


def factorizations(n: int) -> list:
    """Shapes of at most 3 dims with ``n`` elements."""
    out = [(n,)]
    for i in range(1, n + 1):
        if n % i == 0:
            out.append((i, n // i))
            for j in range(1, n // i + 1):
                if (n // i) % j == 0:
                    out.append((i, j, n // i // j))
    return out


def values(gen, shape):
    return (torch.rand(shape, generator=gen, dtype=DTYPE, device="cpu") * 3.0 - 1.5).to(DEVICE)


def build(data, *, order, n_initial, max_leaves, n_ops, scalar_source=False, chain=False):
    """Draw a program; return ``(f, leaves, program)``."""
    prog = Program(data, order, max_leaves, chain)
    for _ in range(n_initial):
        prog.new_leaf(prog.leaf_shape())
    applied, attempts = 0, 0
    while applied < n_ops and attempts < 4 * n_ops:
        unreached = sum(name not in prog.pool[-1]["leaves"] for name, _ in prog.leaves)
        if len(prog.lines) + unreached + scalar_source >= MAX_OPS:
            break
        attempts += 1
        if prog.step() is not None:
            applied += 1
    if not prog.lines:  # nothing applied: a plain chain step
        prog.op_unary(prog.pool[-1])
    prog.finish(scalar_source)
    assume(len(prog.lines) <= MAX_OPS)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    leaves = [values(gen, shape) for _, shape in prog.leaves]
    consts = [values(gen, shape) for shape in prog.consts]
    code = prog.source_code()
    namespace = {"torch": torch, "F": F, "C": consts}
    exec(code, namespace)  # noqa: S102
    note(f"order {order}, seed {seed}\nleaves: {[(n, list(s)) for n, s in prog.leaves]}"
         f"\nconstants: {[list(s) for s in prog.consts]}\n{code}")
    for feat in sorted(prog.features):
        event(feat)
    return namespace["f"], leaves, prog


def check(f, leaves, order):
    # Both directions: backprop of joint blocks, and forward jets from each leaf.
    err = assert_close_to_torch(f, leaves, order, tol=TOL, directions=("backward", "forward"))
    if currently_in_test_context():
        event(f"error < 1e-{min(16, max(0, int(-math.log10(err)) if err > 0 else 16))}")
    WORST[0] = max(WORST[0], err)
    return err


WORST = [0.0]

# ---------------------------------------------------------------- random programs

ORDERS = st.integers(1, 4)


@settings(max_examples=600, **SETTINGS)
@given(data=st.data(), order=ORDERS)
def test_random_graph(data, order):
    """Anything: one or two starting leaves, up to three with weight leaves, 1 to 6 ops."""
    n_ops = data.draw(st.integers(1, 6 if order <= 2 else 4), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=data.draw(st.integers(1, 2)), max_leaves=3, n_ops=n_ops)
    check(f, leaves, order)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data(), order=ORDERS)
def test_random_chain(data, order):
    """One leaf: each op reads the newest tensor (a chain); weights are constants or earlier tensors."""
    n_ops = data.draw(st.integers(2, 6 if order <= 2 else 4), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=1, max_leaves=1, n_ops=n_ops, chain=True)
    assert len(leaves) == 1
    check(f, leaves, order)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data(), order=ORDERS)
def test_random_graph_multi_leaf(data, order):
    """Two or three leaves from the start (each leaf's pure partials are checked)."""
    n_initial = data.draw(st.integers(2, 3), label="n_initial")
    n_ops = data.draw(st.integers(1, 5 if order <= 2 else 3), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=n_initial, max_leaves=3, n_ops=n_ops)
    assert len(leaves) >= 2
    check(f, leaves, order)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), order=ORDERS)
def test_random_graph_scalar_source(data, order):
    """The same programs summed to a scalar at the end."""
    n_ops = data.draw(st.integers(1, 5 if order <= 2 else 3), label="n_ops")
    f, leaves, _ = build(data, order=order, n_initial=data.draw(st.integers(1, 2)), max_leaves=3, n_ops=n_ops,
                         scalar_source=True)
    check(f, leaves, order)


# ---------------------------------------------------------------- named fan-out cases


def _rand(gen, *shape):
    return values(gen, shape)


def test_square_order5():
    """``x * x``: one tensor read twice by one operator; only orders 1 and 2 are nonzero."""
    gen = torch.Generator().manual_seed(0)
    x = _rand(gen, 3)
    check(lambda x: x * x, [x], 5)


def test_residual_tanh_matvec_order4():
    """``x + tanh(W @ x)``: x read by the add and the matvec; W a second leaf."""
    gen = torch.Generator().manual_seed(1)
    x, w = _rand(gen, 3), _rand(gen, 3, 3)
    check(lambda x, w: x + torch.tanh(w @ x), [x, w], 4)


def test_addmm_fanout_softmax_order3():
    """``softmax(relu(addmm(T0, T1, T2)) + T0, dim=1)``: T0 read by addmm and by add."""
    gen = torch.Generator().manual_seed(2)
    t0, t1, t2 = _rand(gen, 2, 3), _rand(gen, 2, 4), _rand(gen, 4, 3)
    check(lambda t0, t1, t2: torch.softmax(torch.relu(torch.addmm(t0, t1, t2)) + t0, dim=1), [t0, t1, t2], 3)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print(f"\nlargest error against torch.func in tests/test_random_graphs.py: {WORST[0]:.3e}")

"""The generic fallback: a node xa has no rule for, differentiated through its ATen operator.

torch names a node after the operator it differentiates (``SpecialI1EBackward0``
is ``aten::special_i1e``, ``LinalgCrossBackward0`` is ``aten::linalg_cross``), and
saves on it, under the schema's own argument names (``_saved_self``,
``_saved_dim``), what its backward formula needs. When those recover every
argument, the operator can be called again at the point: its local derivatives
of any order over any slots are ``jacrev`` then nested ``jacfwd`` of that call
(torch.func's own order for a Hessian), dense factors of the output's and the
inputs' shapes that the planner treats as any other factor.

Which argument is which input slot: the node's inputs are the schema's
floating-point tensor arguments, in order (an integer or boolean tensor, an
index or a mask, is never differentiated). An argument is recovered from

* what torch saved under its name;
* the leaf itself, when the slot is a leaf of the graph;
* zeros, when nothing the node saved depends on the point (no ``result``, no
  index or mask computed from it, no other tensor but the arguments): torch's
  backward formulas then never read that argument's value, so every first
  derivative is independent of it, the op is affine in it, and every
  derivative is the same at zeros (where the input does not require grad, torch keeps no shape for
  it either: zeros of the output's shape, else 0-d, the first the op takes);
* what the saved outputs determine (``linalg_inv_ex``'s ``A`` from its inverse, a solve's ``B``
  from its matrix and solution);
* the schema's default, only if a saved output lets the call be checked (an
  argument torch did not save because its backward does not read it may still
  change the output: eigh's ``UPLO``), or the argument cannot change a value.

Otherwise the node is refused with a typed error naming the argument. Every
saved attribute that names an argument must be one of the overload's. Where the
node saved outputs, the recomputed call is compared with them before any
derivative is taken, and a derivative over two positions of one input must be
symmetric (torch's derivatives of ops that assume a symmetric or triangular
input are not those of a function of every entry), so a wrong reading of the
arguments or a derivative torch does not mean as one is an error, never a wrong
number. The factors are dense (``n_out * n_in^k`` entries): ``explain`` marks them.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import torch
from torch.func import jacfwd, jacrev

from .errors import UnsupportedOperatorError
from .factor import LabelMaker, planned, signed

FALLBACK_WORKSPACE = 2  # nested jacfwd holds the result and the tangents it is built from


@lru_cache(maxsize=None)
def _packet(node: str):
    """The ``torch.ops.aten`` packet a node name differentiates, or ``None``."""
    m = re.fullmatch(r"(.+?)Backward\d*(?:_copy)?", node)
    if not m:
        return None
    camel = m.group(1)
    candidates = []
    for digits in (True, False):
        s = re.sub(r"(\d)D\b|(\d)D(?=[A-Z])", lambda g: (g.group(1) or g.group(2)) + "d", camel) if digits else camel
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", s).lower()
        candidates += [snake, re.sub(r"(?<=\d)_(?=[a-z]\b)", "", snake), re.sub(r"(?<=\d)_", "", snake),
                       snake.replace("_", "")]
    for name in candidates + ["_" + c for c in candidates]:  # FftC2R is aten::_fft_c2r
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "overloads"):
            return packet
    return None


def _is_tensor(arg) -> bool:
    return isinstance(arg.type, torch.TensorType)


def _saved_value(ctx, name):
    value = ctx.saved(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return signed(value)
    if isinstance(value, tuple):
        return [signed(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class _Call:
    """The op's overload, how to rebuild each argument, ``slots`` (input slot -> argument name), and the
    saved outputs the recomputed call is checked against."""

    def __init__(self, overload, args, slots, outputs):
        self.overload, self.args, self.slots, self.outputs = overload, args, slots, outputs


# attributes torch saves that are not arguments: sizes, strides and options of the inputs, results
def _derived(name: str) -> bool:
    return bool(re.fullmatch(r"result\d*|.*_sym_.*|.*_(scalar_type|options|"
                             r"info|sizes|strides|numel|dim)|[A-Z].*|indices|eigenvalues|eigenvectors|LU|pivots|"
                             r"U|S|Vh|Q|R|L|inverse|tensors", name))


# arguments whose default a call may take unchecked: they never change the value (error checks, out layout)
_HARMLESS = {"check_errors", "memory_format", "non_blocking", "copy", "layout", "pin_memory", "device", "dtype",
             "unroll_dim"}


def _bind(ctx, packet, leaves):
    """The first overload whose arguments can all be recovered from the node; or a reason why none can."""
    saved = set(ctx._saved)
    n_slots = len(ctx.in_shapes)
    reasons = []
    for name in packet.overloads():
        overload = getattr(packet, name)
        schema = overload._schema
        if any(a.is_out for a in schema.arguments) or schema.is_mutable:
            continue
        tensor_args = [a for a in schema.arguments if _is_tensor(a)]
        # differentiable tensor arguments: those not saved as integer or boolean tensors
        diff = [a.name for a in tensor_args
                if not (a.name in saved and isinstance(ctx._saved[a.name], torch.Tensor)
                        and not ctx._saved[a.name].is_floating_point())]
        if len(diff) != n_slots:
            reasons.append(f"{name}: {len(diff)} tensor arguments for {n_slots} inputs")
            continue
        args = {}
        # the point may be read from zeros only if nothing saved depends on it
        own = {a.name for a in schema.arguments}
        pointwise = all(k in own for k, v in ctx._saved.items() if isinstance(v, torch.Tensor))
        missing = None
        defaulted: list = []
        # every attribute torch saved that names an argument must be one of this overload's
        # (div's rounding_mode picks div.Tensor_mode over div.Tensor)
        extra = [k for k in saved if k not in own and not _derived(k)]
        if extra:
            reasons.append(f"{name}: does not take {', '.join(extra)}")
            continue
        for a in schema.arguments:
            # a tensor input torch left empty (the other operand of a product whose own gradient is not
            # needed: addmv's vec when only vec requires grad) is read from the leaf or zeros instead
            if a.name in saved and not (a.name in diff and ctx._saved[a.name] is None):
                args[a.name] = ("saved", a.name)
            elif a.name in ("size", "output_size") and a.name not in diff:
                # a view's or an adaptive pool's target size is the output's shape (its trailing dims)
                args[a.name] = ("out_shape", None)
            elif (packet.__name__, a.name) in RECOVERED:
                args[a.name] = ("recovered", RECOVERED[packet.__name__, a.name])
            elif a.name in diff and leaves[diff.index(a.name)] is not None:
                args[a.name] = ("leaf", diff.index(a.name))
            elif a.name in diff and pointwise:
                args[a.name] = ("zeros", diff.index(a.name))
            elif a.has_default_value():
                args[a.name] = ("default", a.default_value)
                defaulted.append(a.name)
            elif a.type.kind() == "OptionalType":
                args[a.name] = ("default", None)
                defaulted.append(a.name)
            elif pointwise and str(a.type) in ("Scalar", "float", "int", "SymInt"):
                # a number the backward formula does not read (index_fill's value): no derivative of the
                # node depends on it, and nothing saved depends on the point
                args[a.name] = ("default", 0)
            else:
                missing = a.name
                break
        if missing is not None:
            reasons.append(f"{name}: argument {missing!r} is neither saved on the node nor recoverable")
            continue
        outputs = [r.name for r in schema.returns if r.name and r.name in saved]
        if "result" in saved:
            outputs.append("result")
        if defaulted and not outputs and not set(defaulted) <= _HARMLESS:
            # an argument torch did not save because its backward does not need it may still change the
            # output (eigh's UPLO); with no saved output to check the call against, it cannot be trusted
            reasons.append(f"{name}: {', '.join(defaulted)} not saved, and no saved output to check the call")
            continue
        return _Call(overload, args, diff, outputs)
    return "; ".join(reasons) or "no overload of the operator takes these inputs"


def _solved_rhs(ctx, A):
    """The right-hand side ``B`` of a solve whose matrix ``A`` and solution (``result``) torch saved."""
    X = ctx.saved("result").to(ctx.dtype)
    return A @ X if ctx.saved("left") else X @ A


def _lu_rhs(ctx):
    P, L, U = torch.lu_unpack(ctx.saved("LU").to(ctx.dtype), ctx.saved("pivots"))
    A = P @ L @ U
    return _solved_rhs(ctx, A.mH if ctx.saved("adjoint") else A)


def _triangular_rhs(ctx):
    A = ctx.saved("self").to(ctx.dtype)
    unit = bool(ctx.saved("unitriangular"))  # the diagonal is not read: ones
    T = A.triu(int(unit)) if ctx.saved("upper") else A.tril(-int(unit))
    return _solved_rhs(ctx, T + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) if unit else T)


# Arguments torch does not save but that its saved outputs determine: (op, argument) -> how. (A solve's B
# is not saved when it does not require grad: the derivative in A reads the solution instead.)
RECOVERED = {
    ("linalg_inv_ex", "A"): lambda ctx: torch.linalg.inv(ctx.saved("inverse").to(ctx.dtype)),
    ("linalg_lu_solve", "B"): _lu_rhs,
    ("linalg_solve_triangular", "B"): _triangular_rhs,
}

# Operators whose own higher derivatives torch gets wrong: the fallback would repeat the error.
WRONG_IN_TORCH = {
    "as_strided": "as_strided reads the input's storage, whose layout the node does not record whole",
    "as_strided_scatter": "as_strided_scatter reads the input's storage, whose layout the node does not record whole",
    "linalg_det": "torch's third derivatives of linalg_det (forward over reverse mode) are wrong (checked against "
                  "the cofactor expansion); write det as a product of its LU factors' diagonal, or use slogdet",
}


@lru_cache(maxsize=None)
def fallback_rule(node: str):
    """A rule for torch node ``node`` through its ATen operator, or ``None`` where none is found (one object
    per name: the rule objects are in the plan cache's key)."""
    packet = _packet(node)
    if packet is None:
        return None

    def rule(ctx, slots):
        if packet.__name__ in WRONG_IN_TORCH:
            raise UnsupportedOperatorError(f"no rule for torch node {ctx.name}, and the generic fallback is not used "
                                           f"for it: {WRONG_IN_TORCH[packet.__name__]}")
        leaves = ctx.leaves
        call = _bind(ctx, packet, leaves)
        if isinstance(call, str):
            raise UnsupportedOperatorError(
                f"no rule for torch node {ctx.name}, and the generic fallback through aten::{packet.__name__} "
                f"cannot rebuild its arguments from what torch saved ({call}); xa.extend.register adds a rule")
        # an input that does not require grad has no shape in the graph: only the slots differentiated
        # (which do) need one; the op is read at such an input's saved value, or at zeros where it may be
        shapes = [None if s is None else tuple(s) for s in ctx.in_shapes]
        out_shape = tuple(ctx.out_shape)
        lab = LabelMaker()
        y = lab.dims(out_shape)
        xs = [lab.dims(shapes[s]) for s in slots]
        dense_shape = out_shape + tuple(n for s in slots for n in shapes[s])

        def build():
            values = []
            unknown = []  # constant inputs torch kept neither the value nor the shape of
            for s in range(len(shapes)):
                kind, what = call.args[call.slots[s]]
                if kind == "saved":
                    values.append(ctx.saved(what).to(ctx.dtype))
                elif kind == "recovered":
                    values.append(what(ctx))
                elif kind == "leaf":
                    values.append(leaves[what].to(device=ctx.device, dtype=ctx.dtype))
                else:
                    # a constant input torch did not save enters affinely (nothing saved depends on it): any
                    # value does, of a shape the op takes
                    if shapes[s] is None:
                        unknown.append(s)
                    shape = shapes[s] if shapes[s] is not None else out_shape
                    values.append(torch.zeros(shape, dtype=ctx.dtype, device=ctx.device))

            def f(*point):
                out = _call(ctx, call, point)
                return out[ctx.output] if isinstance(out, (tuple, list)) else out

            if unknown:
                values = _stand_ins(ctx, call, packet, f, values, unknown)

            try:
                return _dense(ctx, call, packet, f, values, slots, dense_shape, out_shape, shapes)
            except UnsupportedOperatorError:
                raise
            except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError, AttributeError) as err:
                raise UnsupportedOperatorError(
                    f"no rule for torch node {ctx.name}, and the generic fallback through aten::{packet.__name__} "
                    f"failed to differentiate it with torch.func: {(str(err).splitlines() or [''])[0][:200]}"
                ) from None

        dense = planned(ctx, dense_shape, build)
        return lab.factor(y, xs, [(dense, y + sum(xs, ()))], workspace=FALLBACK_WORKSPACE * math.prod(dense_shape))

    rule.fallback = packet.__name__
    rule.multi_output = True
    return rule


def _stand_ins(ctx, call, packet, f, values, unknown):
    """Zeros for the constant inputs whose value and shape torch did not keep: of the output's shape (an
    operand broadcast against it), else 0-d (a fill value); the first the op takes and gives the output's
    shape with. Their value is never read by the derivatives; their shape is only checked by the op."""
    out_shape = tuple(ctx.out_shape)
    out = torch.empty(out_shape, device="meta")
    known = {s: STAND_IN_SHAPES[packet.__name__, call.slots[s]](ctx, out) for s in unknown
             if (packet.__name__, call.slots[s]) in STAND_IN_SHAPES}
    for shape in (out_shape, ()):
        trial = list(values)
        for s in unknown:
            trial[s] = torch.zeros(known.get(s, shape), dtype=ctx.dtype, device=ctx.device)
        try:
            with torch.no_grad():
                out = f(*trial)
        except (RuntimeError, IndexError, ValueError, TypeError):
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape) == out_shape:
            return trial
    names = ", ".join(repr(call.slots[s]) for s in unknown if s not in known)
    raise UnsupportedOperatorError(
        f"no rule for torch node {ctx.name}, and the generic fallback through aten::{packet.__name__} cannot "
        f"rebuild its input {names}: it does not require grad here, so torch kept neither its value nor its "
        "shape, and the op takes neither zeros of the output's shape nor a 0-d zero in its place; let it "
        "require grad, or register a rule (xa.extend.register)")


# The shape of a constant input torch kept neither the value nor the shape of, where the node's saved
# arguments determine it (the slice a scatter writes): (op, argument) -> shape, from a meta output.
STAND_IN_SHAPES = {
    ("diagonal_scatter", "src"): lambda ctx, out: out.diagonal(
        *(_saved_value(ctx, name) for name in ("offset", "dim1", "dim2"))).shape,
    ("select_scatter", "src"): lambda ctx, out: out.select(_saved_value(ctx, "dim"), _saved_value(ctx, "index")).shape,
    ("index_copy", "source"): lambda ctx, out: _indexed_shape(out.shape, _saved_value(ctx, "dim"),
                                                              ctx.saved("index").numel()),
}


def _indexed_shape(shape, dim, n):
    """``shape`` with dim ``dim`` as long as an index of ``n`` entries (a 0-d shape stays 0-d)."""
    shape = list(shape)
    if shape:
        shape[dim % len(shape)] = n
    return tuple(shape)


def _dense(ctx, call, packet, f, values, slots, dense_shape, out_shape, shapes):
    """Check the call against the saved outputs, then nest reverse and forward mode over the slots."""
    _check_outputs(ctx, call, packet, values)
    # reverse mode first, then forward mode, as torch.func's hessian: torch's forward-over-forward
    # derivatives of some ops are wrong where this composition is right (linalg_det at order 2)
    g = jacrev(f, argnums=slots[0])
    for s in slots[1:]:  # the first slot's dims come first
        g = jacfwd(g, argnums=s)
    dense = g(*values).reshape(dense_shape).clone()  # torch.func may hand out an expanded zero without storage
    _check_symmetric(ctx, packet, dense, out_shape, shapes, slots)
    return dense


def _argument(ctx, kind, what, name, call):
    if kind == "saved":
        return _saved_value(ctx, what)
    if kind == "out_shape":
        return _size_for(ctx, name, call)
    if kind == "recovered":
        return what(ctx)
    return what


def _size_for(ctx, name, call):
    """A ``size`` argument is the whole output shape; an adaptive pool's ``output_size`` its trailing dims."""
    if name == "size":
        return list(ctx.out_shape)
    spatial = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
               "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3}
    k = spatial.get(call.overload._schema.name.split("::")[-1], len(ctx.out_shape))
    return list(ctx.out_shape[len(ctx.out_shape) - k:])


def _call(ctx, call, point):
    """The op at ``point`` (one tensor per input slot), every other argument rebuilt: all its outputs."""
    kwargs = {}
    for name, (kind, what) in call.args.items():
        if name in call.slots:
            kwargs[name] = point[call.slots.index(name)]
        else:
            kwargs[name] = _argument(ctx, kind, what, name, call)
    return call.overload(**kwargs)


def _check_outputs(ctx, call, packet, values) -> None:
    """The call at the point must give what torch saved of its outputs; else the arguments were misread."""
    if not call.outputs:
        return
    got = _call(ctx, call, values)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    names = [r.name for r in call.overload._schema.returns]
    for name in call.outputs:
        index = names.index(name) if name in names else 0
        want = ctx.saved(name)
        have = got[index] if index < len(got) else None
        if not isinstance(want, torch.Tensor) or not isinstance(have, torch.Tensor):
            continue
        if want.shape != have.shape or not torch.allclose(have.to(want.dtype), want, rtol=1e-6, atol=1e-9,
                                                           equal_nan=True):
            raise UnsupportedOperatorError(
                f"the generic fallback for {ctx.name} (aten::{packet.__name__}) did not reproduce the output "
                f"{name!r} torch saved: the node's arguments cannot be read back from what it saved")


def _check_symmetric(ctx, packet, dense, out_shape, shapes, slots) -> None:
    """A derivative over two positions of the same input must be symmetric in them. torch's derivatives of
    ops that assume a structured input (cholesky, eigh read one triangle) are not: refused, never used."""
    flat = dense.reshape(math.prod(out_shape), *(math.prod(shapes[s]) for s in slots))
    for a in range(len(slots)):
        for b in range(a + 1, len(slots)):
            if slots[a] != slots[b]:
                continue
            swapped = flat.transpose(1 + a, 1 + b)
            if not torch.allclose(flat, swapped, rtol=1e-7, atol=1e-9, equal_nan=True):
                raise UnsupportedOperatorError(
                    f"no rule for torch node {ctx.name}, and torch's own derivatives of aten::{packet.__name__} "
                    f"are not symmetric in input {slots[a]} (the op assumes a structured input, a symmetric or "
                    "triangular matrix): they are not the derivatives of a function of every entry, so the "
                    "generic fallback cannot use them")

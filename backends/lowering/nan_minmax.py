"""Maximum and minimum that keep NaN the way ONNX Runtime keeps it, in forms LLVM vectorizes.

What the code generator does: TVM's LLVM backend emits ``max(a, b)`` as ``a > b ? a : b`` (one
``vmaxps`` on x86), so a NaN in ``b`` comes out and a NaN in ``a`` is dropped (``max(NaN, 0)`` is 0:
a Relu written ``maximum(x, 0)`` turned NaN into 0). ``min`` likewise (``a < b ? a : b``).

The forms here, measured against ONNX Runtime 1.32 (CPUExecutionProvider):

* a constant operand goes first: ``max(c, x)`` is still one ``vmaxps`` and returns ``x`` when ``x``
  is NaN (Relu, Clip's bounds, HardSigmoid). ORT's Clip ignores a NaN bound (``x < lo ? lo : x``),
  which is exactly ``max(lo, x)``, so Clip puts its bounds first whether they are constants or not.
* two tensors (Max, Min): ``select(a <= inf, max(a, b), a)``: ``a <= inf`` is false only for NaN,
  and LLVM turns it into one ordered compare (``vcmpordps``) and a blend. ``isnan`` is not used:
  TVM lowers it to a call that is not vectorized (the loop became gathers and scatters), and TVM's
  simplifier folds ``a != a`` to false.
* reductions (ReduceMax / ReduceMin): ORT's reduce kernels start from the first element and skip
  later NaNs, so the answer is NaN when the first element of the reduced set is NaN (measured for
  rows of 3 to 100 along the inner, outer and a middle axis). graphopt answers exactly that. ORT
  itself is not consistent beyond it: along a contiguous axis of 17-37 its vectorized kernel also
  keeps some NaNs among the first four, or skips a first NaN in rows off a 16-byte boundary.
  ONNX's reference implementation (numpy's ``maximum.reduce``) answers NaN for a NaN anywhere.
* max pooling keeps TVM's fold ``m = m > x ? m : x`` over each window, which is how ORT's 2-D
  pooling (MLAS) folds: a NaN survives unless a later value of its window replaces it. ORT's 1-D and
  3-D pooling skip NaN, and GlobalMaxPool keeps a NaN only in the last position of 4+ elements;
  an all -inf window answers -3.4e38 (TVM's and ORT's 1-D/3-D start), where ORT's 2-D answers -inf.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from graphopt.backends.lowering import helpers as H

R = relax.op

INF = float("inf")


# ---------------------------------------------------------------- TIR expressions


def _tir_dtype(e) -> str:
    return str(e.ty)  # a PrimExpr's PrimType prints as its dtype (Var.dtype is only for buffer vars)


def _tir_const(e) -> bool:
    return isinstance(e, (tirx.FloatImm, tirx.IntImm))


def _tir_const_not_nan(e) -> bool:
    return _tir_const(e) and not (isinstance(e, tirx.FloatImm) and np.isnan(e.value))


def tir_max(a, b):
    """``max(a, b)``, NaN when either is NaN (a constant operand must not be NaN to go first)."""
    if _tir_const_not_nan(a):
        return tirx.Max(a, b)
    if _tir_const_not_nan(b):
        return tirx.Max(b, a)
    if "float" not in _tir_dtype(a):
        return tirx.Max(a, b)
    return tirx.Select(a <= tirx.const(INF, _tir_dtype(a)), tirx.Max(a, b), a)


def tir_min(a, b):
    """``min(a, b)``, NaN when either is NaN."""
    if _tir_const_not_nan(a):
        return tirx.Min(a, b)
    if _tir_const_not_nan(b):
        return tirx.Min(b, a)
    if "float" not in _tir_dtype(a):
        return tirx.Min(a, b)
    return tirx.Select(a <= tirx.const(INF, _tir_dtype(a)), tirx.Min(a, b), a)


# ln of the largest float32: exp of anything above overflows to inf
EXP_OVERFLOW = 88.72283935546875


def exp_nonfinite(arg, e):
    """``e`` (a clamped, polynomial exp of ``arg``, e.g. TVM's ``fast_exp``) with exp's answers for
    NaN (NaN) and for an overflowing ``arg`` (inf) restored: ``arg <= EXP_OVERFLOW`` is false for
    both, and ``arg + inf`` is then NaN or inf. One ordered compare, an add and a blend."""
    dtype = _tir_dtype(arg)
    return tirx.Select(arg <= tirx.const(EXP_OVERFLOW, dtype), e, arg + tirx.const(INF, dtype))


# ---------------------------------------------------------------- Relax expressions


def _is_float(expr) -> bool:
    return H.is_float(H.dtype_of(expr))


def _const_without_nan(expr) -> bool:
    value = H.const_value(expr)
    return value is not None and not (value.dtype.kind == "f" and np.isnan(value.astype("float32")).any())


def _binary(op, a, b):
    if not _is_float(a) or _const_without_nan(a):
        return op(a, b)
    if _const_without_nan(b):
        return op(b, a)
    return R.where(R.less_equal(a, H.scalar(INF, H.dtype_of(a))), op(a, b), a)


def maximum(a, b):
    """Elementwise ``max(a, b)`` with broadcasting, NaN where either operand is NaN (ONNX Max)."""
    return _binary(R.maximum, a, b)


def minimum(a, b):
    """Elementwise ``min(a, b)`` with broadcasting, NaN where either operand is NaN (ONNX Min)."""
    return _binary(R.minimum, a, b)


def clip_low(x, lo):
    """``x < lo ? lo : x``: ORT's Clip (NaN ``x`` kept, a NaN bound ignored)."""
    return R.maximum(lo, x)


def clip_high(x, hi):
    """``x > hi ? hi : x``."""
    return R.minimum(hi, x)


def clip(x, lo, hi):
    """Clip between two bounds (Relax expressions or Python numbers), NaN kept."""
    lo = H.scalar(lo, H.dtype_of(x)) if isinstance(lo, (int, float)) else lo
    hi = H.scalar(hi, H.dtype_of(x)) if isinstance(hi, (int, float)) else hi
    return clip_high(clip_low(x, lo), hi)


def relu(x):
    """``max(0, x)``: NaN and +inf kept, as ORT's Relu."""
    return R.maximum(H.scalar(0, H.dtype_of(x)), x)

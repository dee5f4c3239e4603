"""exp, erf, tanh, sigmoid, softmax and small powers in float32 as arithmetic the CPU schedules can vectorize.

TVM lowers ``exp`` to LLVM's ``llvm.exp`` intrinsic, which x86 and aarch64 code generation turn into
one ``expf`` library call per element, even inside a vectorized loop: PP-OCRv4 rec's softmax over
40 x 6625 classes took 1.4-1.9 ms on 2 AVX-512 cores, 5 ns an element, against ONNX Runtime's
vectorized exp. These legalizations use TVM's ``fast_exp`` instead (range reduction to
``2^n * e^r`` and a degree-6 polynomial for ``e^r``, the Cephes ``expf`` scheme: relative error
about 1e-7, within float32 rounding of the library's), which compiles to vector instructions.

``erf`` (exact GELU's) is the same story: one library call an element, 5 ns each; TVM's ``fast_erf``
(a rational approximation on [-4, 4], within 4.2e-7 of erf) vectorizes. So do ``tanh`` (TVM's
``fast_tanh``) and ``x ** 3`` as ``x * x * x``: flan-t5's gated tanh-GELU on [128, 1024] took 2.37 ms
with a ``tanhf`` and a ``powf`` call an element, 0.28 ms this way (max difference 1.9e-6).

Only float32 is rewritten; other dtypes keep TVM's legalization. Inputs are clamped to
[-88.38, 88.38] first (``exp`` of a larger float32 overflows); the result is then NaN for a NaN
input and inf for one past float32's overflow (``nan_minmax.exp_nonfinite``, as the library and ONNX
Runtime answer), 2.4e38 between 88.38 and 88.72. ``GRAPHOPT_FAST_MATH=0`` turns this off. The compile pipeline adds ``legalize_map()`` to its LegalizeOps for CPU targets.
"""

from __future__ import annotations

import os

from tvm import te, tirx, topi

from graphopt.backends.lowering.nan_minmax import exp_nonfinite

from .softmax import softmax_te

_DEFAULT_FLEGALIZE = "FLegalize"
# lanes of softmax_te's partial reductions: 16 independent chains cover the 4-cycle latency of two
# vector units on any target, and are one AVX-512 or four NEON vectors
SOFTMAX_LANES = 16


def _float32(call) -> bool:
    return getattr(call.args[0].ty, "dtype", None) == "float32"


def _default(bb, call):
    return call.op.get_attr(_DEFAULT_FLEGALIZE)(bb, call)


def _exp_te(x: te.Tensor) -> te.Tensor:
    """``fast_exp`` with NaN and overflow answered as ``exp`` answers them."""
    e = topi.fast_exp(x)
    return te.compute(x.shape, lambda *i: exp_nonfinite(x(*i), e(*i)), name="T_exp")


def _sigmoid_te(x: te.Tensor) -> te.Tensor:
    e = _exp_te(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="T_sigmoid")


def _erf_te(x: te.Tensor) -> te.Tensor:
    """TVM's ``fast_erf`` (a rational approximation, vectorizable: within 4.2e-7 of erf on float32),
    NaN passed through as erf passes it."""
    e = topi.fast_erf(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), e(*i)), name="T_erf")


def _tanh_te(x: te.Tensor) -> te.Tensor:
    """TVM's ``fast_tanh`` (clamped to [-9, 9], a rational approximation: vectorizable, within 2e-6 of
    tanh), NaN passed through as tanh passes it."""
    t = topi.fast_tanh(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), t(*i)), name="T_tanh")


def _small_power(call) -> int | None:
    """2 or 3 when ``call`` is ``power(x, c)`` with a float32 ``x`` and a constant scalar ``c`` of that
    integer value (tanh-GELU's ``x ** 3``), else None."""
    import numpy as np
    import tvm

    c = call.args[1]
    if not _float32(call) or not isinstance(c, tvm.ir.expr.Constant) or c.value.numpy().size != 1:
        return None
    value = float(np.asarray(c.value.numpy()).reshape(-1)[0])
    return int(value) if value in (2.0, 3.0) else None


def _legalize_power(bb, call):
    """``x ** 2`` and ``x ** 3`` as products (as ONNX Runtime computes them) instead of one ``powf``
    call an element; any other exponent keeps TVM's legalization."""
    n = _small_power(call)
    if n is None:
        return _default(bb, call)

    def product(x):
        if n == 2:
            return te.compute(x.shape, lambda *i: x(*i) * x(*i), name="T_power")
        return te.compute(x.shape, lambda *i: x(*i) * x(*i) * x(*i), name="T_power")

    return bb.call_te(product, call.args[0], primfunc_name_hint="power")


def _legalize_tanh(bb, call):
    if not _float32(call):
        return _default(bb, call)
    return bb.call_te(_tanh_te, call.args[0], primfunc_name_hint="tanh")


def _legalize_exp(bb, call):
    if not _float32(call):
        return _default(bb, call)
    return bb.call_te(_exp_te, call.args[0], primfunc_name_hint="exp")


def _legalize_erf(bb, call):
    if not _float32(call):
        return _default(bb, call)
    return bb.call_te(_erf_te, call.args[0], primfunc_name_hint="erf")


def _legalize_sigmoid(bb, call):
    if not _float32(call):
        return _default(bb, call)
    return bb.call_te(_sigmoid_te, call.args[0], primfunc_name_hint="sigmoid")


def _legalize_softmax(bb, call):
    if not _float32(call):
        return _default(bb, call)
    x = call.args[0]
    shape = x.ty.shape
    axis = int(call.attrs.axis)
    rank = len(shape) if shape is not None else 0
    last = shape is not None and axis in (-1, rank - 1)
    static = last and all(isinstance(d, tirx.IntImm) for d in shape)
    if static and int(shape[-1]) >= SOFTMAX_LANES:
        return bb.call_te(softmax_te, x, SOFTMAX_LANES, primfunc_name_hint="softmax")
    return bb.call_te(topi.nn.fast_softmax, x, axis, primfunc_name_hint="softmax")


def enabled() -> bool:
    return os.environ.get("GRAPHOPT_FAST_MATH", "1") != "0"


def legalize_map() -> dict:
    """``{op name: legalization}`` for LegalizeOps(customize_legalize_map=...); empty when disabled."""
    if not enabled():
        return {}
    return {"relax.exp": _legalize_exp, "relax.erf": _legalize_erf, "relax.sigmoid": _legalize_sigmoid,
            "relax.nn.softmax": _legalize_softmax, "relax.tanh": _legalize_tanh, "relax.power": _legalize_power}

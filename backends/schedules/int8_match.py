"""Finding ``MatMulInteger`` chains in Relax for ``int8_matmul.rewrite_int8_matmul``.

``lowering/quant.py`` writes ``MatMulInteger(a_u8, b, a_zp, b_zp)`` with a constant ``b`` as
``matmul(astype(a) - astype(a_zp), B)`` with the constant ``B = b - b_zp``: in int32, or in float32
(then cast to int32) where every partial sum stays below 2**24; ORT's ``quantize_dynamic`` follows
it with ``Cast(float) -> Mul(scale)``. ``match`` reads such a chain back: the uint8 activation, its
zero point, the integer weight, and the scale when the Cast and Mul follow (each used once).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from .int8_conv import _Bindings
from .int8_layout import shape_of

_OP = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("subtract", "astype", "multiply")}
_FLOAT32_EXACT = 1 << 24


def _bound(b: _Bindings, expr, op: str):
    """The call of ``op`` that var ``expr`` is bound to, else None."""
    value = b.value.get(expr) if isinstance(expr, relax.Var) else None
    return value if isinstance(value, relax.Call) and value.op.same_as(_OP[op]) else None


def _activation(b: _Bindings, expr, dtype: str):
    """(x, zx) when ``expr`` is ``astype(x_u8, dtype) - astype(zx_u8, dtype)`` (or ``astype(x_u8)``), zx a
    single value (None: 0), else None."""
    sub = _bound(b, expr, "subtract")
    x_cast = _bound(b, sub.args[0] if sub is not None else expr, "astype")
    if x_cast is None or str(x_cast.attrs.dtype) != dtype or x_cast.args[0].ty.dtype != "uint8":
        return None
    if sub is None:
        return x_cast.args[0], None
    z_cast = _bound(b, sub.args[1], "astype")
    z_shape = shape_of(z_cast.args[0]) if z_cast is not None else None
    if z_shape is None or z_cast.args[0].ty.dtype != "uint8" or math.prod(z_shape) != 1:
        return None
    return x_cast.args[0], z_cast.args[0]


def _single_use(b: _Bindings, var, op: str):
    """The one binding that uses ``var``, when it is a call of ``op``: (its var, its call), else None."""
    if b.uses[var] != 1:
        return None
    for v, value in b.value.items():
        if isinstance(value, relax.Call) and value.op.same_as(_OP[op]) and any(a.same_as(var) for a in value.args):
            return v, value
    return None


def match(b: _Bindings, var, mm: relax.Call) -> dict | None:
    """The MatMulInteger chain whose matmul ``mm`` is bound to ``var``: ``x`` ``[..., K]`` uint8, ``zx``,
    ``weight`` (``[K, N]``, int64), ``scale`` (None: int32 out) and ``end`` (the var it replaces)."""
    dtype = str(mm.attrs.out_dtype)
    if dtype not in ("int32", "float32"):
        return None
    act = _activation(b, mm.args[0], dtype)
    if act is None or shape_of(act[0]) is None:  # (before the weight is read: float matmuls stop here)
        return None
    weight = b.constant(mm.args[1])
    if weight is None or weight.ndim != 2:
        return None
    if shape_of(act[0])[-1] != weight.shape[0] or np.any(np.round(weight) != weight):
        return None
    weight = weight.astype(np.int64)
    if weight.size == 0 or int(np.ptp(weight, axis=0).max()) > 255:
        return None
    end = var
    if dtype == "float32":  # exact only below 2**24 (lowering/quant.py picks this form only then)
        cast = _single_use(b, var, "astype")
        if 255 * int(np.abs(weight).sum(axis=0).max(initial=0)) >= _FLOAT32_EXACT or cast is None \
                or str(cast[1].attrs.dtype) != "int32":
            return None
        end = cast[0]
    m = {"x": act[0], "zx": act[1], "weight": weight, "scale": None, "end": end}
    to_float = _single_use(b, end, "astype")
    if to_float is None or str(to_float[1].attrs.dtype) != "float32":
        return m
    scaled = _single_use(b, to_float[0], "multiply")
    if scaled is None:
        return m
    args = scaled[1].args
    scale = args[1] if args[0].same_as(to_float[0]) else args[0]
    s_shape, n = shape_of(scale), weight.shape[1]
    if scale.ty.dtype != "float32" or s_shape is None or len(s_shape) > len(shape_of(act[0])) \
            or any(d != 1 for d in s_shape[:-1]) or (s_shape and s_shape[-1] not in (1, n)):
        return m
    m = {**m, "scale": scale, "scales": math.prod(s_shape), "end": scaled[0]}
    return {**m, **_weight_scale(b, scale, n)}


def _weight_scale(b: _Bindings, scale, n: int) -> dict:
    """``{"scale": the activation's scale, "scales": 1, "wscale": the weight's}`` when ``scale`` is
    (used once) the product of a single runtime value and a constant of 1 or ``n`` values (one per
    column), as ``quantize_dynamic`` writes it; else nothing to change."""
    product = _bound(b, scale, "multiply")
    if product is None or b.uses[scale] != 1:
        return {}
    for run, const in (product.args, product.args[::-1]):
        value, run_shape = b.constant(const), shape_of(run)
        if value is None or b.constant(run) is not None or run_shape is None or math.prod(run_shape) != 1 \
                or run.ty.dtype != "float32" or value.dtype != np.float32:
            continue
        if value.size == 1 or (value.shape[-1] == n and value.size == n):
            return {"scale": run, "scales": 1, "wscale": value.reshape(-1)}
    return {}

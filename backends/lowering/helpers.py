"""Helpers shared by every lowering family: dtypes, constants, shapes, axes, broadcasting, padding.

Everything here is a small pure function; family modules import what they need (no copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

# ONNX element type -> Relax dtype string (also the numpy name, except bfloat16 which is ml_dtypes').
_ONNX_TO_RELAX: dict[ir.DataType, str] = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.DOUBLE: "float64",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.INT8: "int8",
    ir.DataType.INT16: "int16",
    ir.DataType.INT32: "int32",
    ir.DataType.INT64: "int64",
    ir.DataType.UINT8: "uint8",
    ir.DataType.UINT16: "uint16",
    ir.DataType.UINT32: "uint32",
    ir.DataType.UINT64: "uint64",
    ir.DataType.BOOL: "bool",
    ir.DataType.FLOAT8E4M3FN: "float8_e4m3fn",
    ir.DataType.FLOAT8E5M2: "float8_e5m2",
    ir.DataType.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
    ir.DataType.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
}
_RELAX_TO_ONNX = {v: k for k, v in _ONNX_TO_RELAX.items()}
# float4e2m1 and float8e8m0 are held as uint8 codes (the bit pattern, one value per byte).
CODED_FLOATS = frozenset({ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0})
# 4- and 2-bit integers are held unpacked, one value per byte, in the 8-bit type of the same signedness.
NARROW_INTS: dict[ir.DataType, tuple[str, int, bool]] = {
    ir.DataType.INT4: ("int8", 4, True),
    ir.DataType.UINT4: ("uint8", 4, False),
    ir.DataType.INT2: ("int8", 2, True),
    ir.DataType.UINT2: ("uint8", 2, False),
}

FLOAT8_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"}) | FLOAT8_DTYPES
INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def relax_dtype(dtype: ir.DataType | int | None) -> str | None:
    """The Relax dtype string of an ONNX element type, or None when Relax has no such dtype."""
    if dtype is None:
        return None
    dtype = ir.DataType(dtype)
    if dtype in NARROW_INTS:
        return NARROW_INTS[dtype][0]
    if dtype in CODED_FLOATS:
        return "uint8"
    return _ONNX_TO_RELAX.get(dtype)


def onnx_dtype(dtype: str) -> ir.DataType:
    """The ONNX element type of a Relax/numpy dtype string."""
    return _RELAX_TO_ONNX[str(dtype)]


def is_float(dtype: str) -> bool:
    return str(dtype) in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return str(dtype) in INT_DTYPES


def is_unsigned(dtype: str) -> bool:
    return str(dtype).startswith("uint")


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16" or dtype in FLOAT8_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


# ml_dtypes names of the formats a compiled model holds as uint8 bit patterns
BIT_PATTERN_DTYPES = ("float4_e2m1fn", "float8_e8m0fnu")


def as_held(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` in the dtype a compiled input of ``dtype`` holds it in: float4 and e8m0 as their bit
    patterns, 4/2-bit integers in 8 bits, bfloat16 from float32, ..."""
    if a.dtype.name in BIT_PATTERN_DTYPES:
        a = a.view(np.uint8)
    return a if a.dtype.name == dtype else a.astype(numpy_dtype(dtype))


# ---------------------------------------------------------------- constants


def const(value, dtype: str | None = None) -> Constant:
    """A Relax constant from a numpy array or Python scalar (dtype: a Relax dtype string)."""
    arr = np.asarray(value)
    if dtype is not None and str(arr.dtype) != dtype:
        arr = arr.astype(numpy_dtype(dtype))
    if arr.dtype == np.float64 and dtype is None and not isinstance(value, np.ndarray):
        arr = arr.astype("float32")
    if arr.dtype == np.bool_:
        return relax.const(arr, "bool")
    return relax.const(arr, str(arr.dtype) if dtype is None else dtype)


Constant = tvm.ir.expr.Constant  # the class of relax.const(...) in TVM 0.27


def const_value(expr) -> np.ndarray | None:
    """The numpy value of a Relax constant expression, else None."""
    return expr.value.numpy() if isinstance(expr, Constant) else None


def scalar(value, dtype: str) -> Constant:
    """A 0-d constant of the given dtype (broadcasts against any tensor)."""
    return const(np.array(value).astype(numpy_dtype(dtype)), dtype)


def full(shape, value, dtype: str):
    """A tensor of ``shape`` (ints or PrimExprs) filled with ``value`` (broadcast of a scalar constant).

    (Not a constant for empty shapes either: TVM cannot serialize zero-size constants.)
    """
    return relax.op.broadcast_to(scalar(value, dtype), list(shape))


# ---------------------------------------------------------------- shapes of Relax expressions


def _sinfo(expr: relax.Expr):
    try:
        return expr.ty
    except AttributeError:  # pragma: no cover - older TVM name
        return expr.struct_info


def dtype_of(expr: relax.Expr) -> str:
    return str(_sinfo(expr).dtype)


def rank_of(expr: relax.Expr) -> int | None:
    nd = _sinfo(expr).ndim
    return None if nd < 0 else int(nd)


def dims_of(expr: relax.Expr) -> list | None:
    """The shape as a list of PrimExprs (IntImm or symbolic), or None when the rank is unknown."""
    shape = _sinfo(expr).shape
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    return list(shape.values)


def shape_of(expr: relax.Expr) -> tuple[int | None, ...] | None:
    """The static shape (None for a symbolic dim), or None when the rank is unknown."""
    dims = dims_of(expr)
    if dims is None:
        rank = rank_of(expr)
        return None if rank is None else (None,) * rank
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in dims)


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The shape when every dim is a known integer, else None."""
    shape = shape_of(expr)
    if shape is None or any(d is None for d in shape):
        return None
    return shape


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


# ---------------------------------------------------------------- axes


def norm_axis(axis: int, rank: int) -> int:
    """A non-negative axis; raises ValueError for an axis out of range."""
    axis = int(axis)
    if axis < -rank or axis >= max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def norm_axes(axes: Sequence[int], rank: int) -> list[int]:
    return [norm_axis(a, rank) for a in axes]


# ---------------------------------------------------------------- broadcasting


def broadcast_shapes(*shapes: Sequence[int | None]) -> tuple[int | None, ...]:
    """Numpy-style broadcast of static shapes (None: unknown dim)."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[int | None] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        known = [d for d in dims if d is not None and d != 1]
        if any(d is None for d in dims):
            out.append(known[0] if known else None)
        elif known:
            if len(set(known)) > 1:
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out.append(known[0])
        else:
            out.append(1)
    return tuple(out)


def unidirectional_pad(shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """``shape`` left-padded with ones to ``rank`` (ONNX unidirectional broadcasting)."""
    return (1,) * (rank - len(shape)) + tuple(shape)


# ---------------------------------------------------------------- padding for windows


def window_pads(
    auto_pad: str,
    in_sizes: Sequence[int | None],
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> list[int]:
    """ONNX ``pads`` (begins then ends) for a sliding window, resolving ``auto_pad``.

    ``SAME_UPPER`` puts the odd extra pad at the end, ``SAME_LOWER`` at the beginning; ``VALID`` is
    no padding; ``NOTSET`` uses ``pads`` (zeros when absent). SAME_* needs static input sizes.
    """
    n = len(kernel)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    auto_pad = (auto_pad or "NOTSET").upper()
    if auto_pad == "NOTSET":
        return list(pads) if pads else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        if size is None:
            raise ValueError(f"auto_pad={auto_pad} needs static spatial sizes")
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


# ---------------------------------------------------------------- names


def safe_name(name: str, fallback: str = "v") -> str:
    """A readable identifier for a Relax var."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in (name or ""))
    if not out:
        out = fallback
    if out[0].isdigit():
        out = "v" + out
    return out

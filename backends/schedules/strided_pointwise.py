"""A strided 1x1 conv becomes a strided slice of its input and a stride-1 1x1 conv.

A strided 1x1 conv reads one pixel in ``s*s``: taking those first is a copy of ``1/s²`` of the input,
and the conv left is a pointwise one, whose schedules read the input as packed panels (ResNet-50's
downsampling 1x1 convs ran at 80 GFLOP/s reading the strided input in place).

It runs on Relax after the layout choice (``blocked.py``): height and width are axes 2 and 3 of both
NCHW and NCHW[b]c, so the slice stays in the conv's layout. Emitted before it, in the front end, the
slice was an op the layout conversion cannot move into NCHW16c: ResNet-50 converted each downsampling
input to NCHW and back, 1.2 ms of 35. AMX convs gather a strided 1x1's pixels themselves, so the
rewrite runs after ``amx_conv``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from graphopt.backends.constants import rewrite_relax_functions

from .blocked import _static

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_LAYOUTS = ("NCHW", "OIHW")  # prefixes: NCHW[b]c data, OIHW[i]i[o]o kernels keep H, W at axes 2, 3


def _shape(expr) -> list[int] | None:
    return _static(getattr(expr.ty, "shape", None))


def why_not(call: relax.Call) -> str | None:
    """None when ``call`` (a relax.nn.conv2d) is a strided 1x1 conv this rewrite serves, else why not."""
    at = call.attrs
    strides = [int(s) for s in at.strides]
    if strides == [1, 1]:
        return "stride 1"
    if any(int(p) for p in at.padding):
        return "padded"
    if not (str(at.data_layout).startswith(_LAYOUTS[0]) and str(at.kernel_layout).startswith(_LAYOUTS[1])
            and str(at.out_layout or at.data_layout) == str(at.data_layout)):
        return f"layout {at.data_layout}/{at.kernel_layout} does not keep height and width at axes 2, 3"
    x, w = call.args
    xs, ws = _shape(x), _shape(w)
    if xs is None or ws is None:
        return "shape is not static"
    if ws[2:4] != [1, 1]:
        return "kernel is not 1x1"
    if getattr(x.ty, "dtype", None) != "float32":
        return "not float32"
    return None


@relax.expr_functor.mutator
class _SlicePointwise(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)) or why_not(call) is not None:
            return call
        x, w = call.args
        at = call.attrs
        out_dtype = None if str(at.out_dtype) in ("", "void", "None") else str(at.out_dtype)
        hw = _shape(x)[2:4]
        sliced = self.builder_.emit(relax.op.strided_slice(
            x, axes=[2, 3], begin=[0, 0], end=hw, strides=[int(s) for s in at.strides]))
        return relax.op.nn.conv2d(
            sliced, w, strides=[1, 1], padding=[0, 0, 0, 0], dilation=[1, 1], groups=int(at.groups),
            data_layout=str(at.data_layout), kernel_layout=str(at.kernel_layout),
            out_layout=str(at.out_layout or at.data_layout), out_dtype=out_dtype)


def rewrite_strided_pointwise(mod):
    """Every strided 1x1 conv of ``mod`` that ``why_not`` accepts as a strided slice and a 1x1 conv."""
    return rewrite_relax_functions(mod, _SlicePointwise(mod))

"""A conv whose output channels are not a multiple of the channel block gets zero output channels up
to one, and a slice of the real ones after it (CPU, before the blocked layout's choice).

The blocked layout (``blocked.py``) serves convs whose channels are multiples of its block; one conv
that is not keeps it off or costs conversions. SqueezeNet's classifier (512->1000 on 13x13) kept the
whole model NCHW (1.9x ORT's time), and ran at 82-105 GFLOP/s there; padded to 1024 channels it is a
blocked conv (or an AMX one, whose channels are multiples of 32) and the slice after it is a pass over
its small output. The weight is padded once, in numpy; at most ``MAX_PADDING`` extra work.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from graphopt.backends.constants import bound_constant, rewrite_relax_functions

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
MAX_PADDING = 0.1  # zero channels, as a share of the real ones, above which the conv is left as it is


def why_not(call: relax.Call, w, multiple: int) -> str | None:
    """None when ``call`` (a relax.nn.conv2d with weight ``w``) takes padded output channels, else why not."""
    at = call.attrs
    if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout or at.data_layout)) != ("NCHW", "OIHW", "NCHW"):
        return "layout is not NCHW/OIHW"
    if int(at.groups) != 1:
        return "grouped"
    if not isinstance(w, tvm.ir.expr.Constant) or str(w.value.dtype) != "float32":
        return "the weight is not a float32 constant"
    if str(at.out_dtype) not in ("", "None", "void", "float32"):
        return "not float32"
    o, c = (int(d) for d in w.value.shape[:2])
    if o % multiple == 0:
        return f"{o} output channels are a multiple of {multiple} already"
    if c % multiple:
        return f"{c} input channels are not a multiple of {multiple}: the conv is not blocked either way"
    if math.ceil(o / multiple) * multiple - o > MAX_PADDING * o:
        return f"{o} output channels pad to a multiple of {multiple} with too many zeros"
    return None


@relax.expr_functor.mutator
class _PadChannels(relax.PyExprMutator):
    def __init__(self, mod, multiple: int):
        super().__init__(mod)
        self.multiple = multiple

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)):
            return call
        w = bound_constant(self, call.args[1]) or call.args[1]
        if why_not(call, w, self.multiple) is not None:
            return call
        weight = w.value.numpy()
        o = weight.shape[0]
        padded = np.zeros((math.ceil(o / self.multiple) * self.multiple, *weight.shape[1:]), weight.dtype)
        padded[:o] = weight
        at = call.attrs
        conv = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], relax.const(padded), strides=at.strides, padding=at.padding, dilation=at.dilation,
            groups=1, data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW"))
        return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[o])


def pad_output_channels(mod, multiple: int):
    """Every conv of ``mod`` that ``why_not`` accepts with output channels padded to ``multiple``."""
    return rewrite_relax_functions(mod, _PadChannels(mod, multiple))

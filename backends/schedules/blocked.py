"""The blocked channel layout NCHW[b]c for chains of convolutions (CPU).

Activations ``[N, C, H, W]`` become ``[N, C/b, H, W, b]`` and conv weights ``[O/b, C/b, KH, KW, b, b]``
(``OIHW{b}i{b}o``), with ``b`` the target's fp32 vector lanes. A conv then reads ``b`` input channels of
one pixel from one cache line and writes ``b`` output channels of one pixel as one vector: its micro
kernel broadcasts an input value into a row of pixel accumulators and multiplies it by one weight
vector, with no transposed write-back and no per-call packing of the input (the NCHW rules in
``conv2d.py`` pack or transpose per call to get the same effect).

* ``to_blocked_layout`` (a Relax pass, before legalization): Relax's ``ConvertLayout`` with a
  callback that blocks every conv this layout serves (``why_not``); elementwise ops, pools, concat
  and reductions follow their input's layout, and the conversions back to NCHW are inserted where
  an op needs it (reshape, flatten, the model's outputs). Each conversion is a pass over a tensor,
  so a model stays NCHW when it has fewer than ``MIN_CONVS`` such convs, or convs the layout does
  not serve (grouped, channels not a multiple of the block) on large inputs (above
  ``LEFT_MAX_SHARE`` of the served convs' inputs): squeeze-excitation convs on pooled maps, or a
  classifier conv at the end, convert cheaply, and so does a conv to fewer channels than a block
  (``_narrow``: a 1-channel output head). A stem on the image's channels reads them as one
  block and writes the blocked layout itself (``_stem_layouts``); a conv whose output channels are
  not a multiple of the block gets zero channels up to one first (``channel_pad.py``).
* The weights' ``layout_transform`` folds at compile time (``backends/constants.py``),
  never per run; Winograd reads and writes the blocked layout directly (``winograd.py``).
* ``LEGALIZE``: TVM's legalization leaves a blocked conv2d un-lowered; ``conv2d_nchwc`` and
  ``depthwise_nchwc`` are graphopt's computes, with the input channels as two reduction axes (block,
  lane) so the schedule rules see plain affine indices; ``conv2d_blocked.py`` schedules them.
* One-element constants of binary ops become per-channel constants first (``per_channel_constants``),
  which Relax's layout inference can move with the tensor.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from graphopt.backends.constants import rewrite_relax_functions

from .channel_pad import pad_output_channels

log = logging.getLogger(__name__)

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
BLOCK_NAME = "conv2d_nchwc"
DEPTHWISE_NAME = "depthwise_nchwc"
MIN_CONVS = 2  # blocked convs a model needs before the layout pays for its conversions
SMALL_ELEMENTS = 1 << 16  # an unserved conv's input this small may convert to NCHW and back
# Unserved convs whose inputs add up to at most this share of the served convs' inputs convert to
# NCHW and back (SqueezeNet's 512->1000 classifier, 6%: the model ran NCHW, 1.9x ORT's time);
# PP-OCRv4 det's 13 unserved convs are 66%, and stay a reason to keep the model NCHW.
LEFT_MAX_SHARE = 0.1
_DATA = re.compile(r"^NCHW(\d+)c$")
_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")


def enabled() -> bool:
    """Off with ``GRAPHOPT_BLOCKED=0`` (every conv then stays NCHW)."""
    return os.environ.get("GRAPHOPT_BLOCKED", "1") != "0"


def _static(shape) -> list[int] | None:
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def why_not(call: relax.Call, block: int) -> str | None:
    """None when the blocked layout serves ``call`` (a relax.nn.conv2d), else why not."""
    at = call.attrs
    if (at.data_layout, at.kernel_layout, at.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW"):
        return "layout is not NCHW/OIHW"
    x, w = call.args
    if any(getattr(a.ty, "dtype", None) != "float32" for a in (x, w)):
        return "not float32"
    if str(at.out_dtype) not in ("", "None", "void", "float32"):
        return "not float32"
    xs, ws = _static(x.ty.shape), _static(w.ty.shape)
    if xs is None or ws is None or len(xs) != 4:
        return "shape is not static 4-D"
    if xs[1] % block or ws[0] % block:
        return f"channels {xs[1]}->{ws[0]} are not multiples of {block}"
    groups = int(at.groups)
    if groups != 1 and not (groups == xs[1] == ws[0] and ws[1] == 1):
        return "grouped (not depthwise)"
    return None


def _desired(call: relax.Call, block: int) -> dict:
    kernel = f"OIHW1i{block}o" if int(call.attrs.groups) > 1 else f"OIHW{block}i{block}o"
    return {"relax.nn.conv2d": [f"NCHW{block}c", kernel]}


def _convs(mod) -> list[relax.Call]:
    found: list = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(_CONV2D) else None)
    return found


def _stem(call: relax.Call, block: int) -> bool:
    """A conv on fewer channels than a block (an image's 3): it reads NCHW and its output is blocked."""
    shape = _static(call.args[0].ty.shape)
    return shape is not None and len(shape) == 4 and shape[1] < block


def _stem_layouts(call: relax.Call, block: int) -> list[str] | None:
    """Layouts of a stem that writes the blocked layout itself: its NCHW input read in place as one
    channel block, weights ``OIHW{C}i{block}o``, output ``NCHW{block}c``; None when the stem cannot.

    Left in NCHW, ResNet-50's stem and max pool ran on NCHW and converted the pooled map (0.9 ms of
    35: a 3x3/2 max pool in NCHW, one conversion per consumer); blocked they stream 16 lanes a pixel."""
    if not _stem(call, block) or int(call.attrs.groups) != 1:
        return None
    channels, outs = int(call.args[0].ty.shape[1]), _static(call.args[1].ty.shape)
    why = why_not(call, 1)  # every check but the channel blocks
    if why is not None or outs is None or outs[0] % block:
        return None
    return ["NCHW", f"OIHW{channels}i{block}o", f"NCHW{block}c"]


def _elements(convs: list[relax.Call]) -> int:
    """The input elements of ``convs`` (static shapes; others count as one)."""
    return sum(math.prod(_static(c.args[0].ty.shape) or [1]) for c in convs)


def _narrow(call: relax.Call, block: int) -> bool:
    """A conv to fewer channels than a block from whole blocks of them (a model's 1-channel output head):
    it reads the blocked map once converted to NCHW, and writes a map a block's width thinner. Counted
    as unserved, ViT-S's 64->1 head on 128x128 kept its three upsampling convs NCHW (15% slower)."""
    shapes = _static(call.args[0].ty.shape), _static(call.args[1].ty.shape)
    return (shapes[0] is not None and shapes[1] is not None and len(shapes[0]) == 4 and int(call.attrs.groups) == 1
            and shapes[1][0] < block and shapes[0][1] % block == 0)


def _small(call: relax.Call) -> bool:
    """A conv whose input converts back and forth in no time (squeeze-excitation on a pooled 1x1 map)."""
    shape = _static(call.args[0].ty.shape)
    return shape is not None and math.prod(shape) <= SMALL_ELEMENTS


_BINARY = tuple(tvm.ir.Op.get(f"relax.{n}") for n in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "floor_divide"))


@relax.expr_functor.mutator
class _PerChannel(relax.PyExprMutator):
    """A one-element constant operand of a binary op on a 4-D tensor becomes a per-channel constant
    ``[1, C, 1, 1]`` of the same value, exact by broadcasting.

    Relax's layout inference relayouts a per-channel constant (a bias) with the tensor, but neither a
    ``[1]`` constant nor a scalar: it put the op back in NCHW, and PP-OCRv4's HardSwish (``x + [3]``,
    ``/ [6]``) made two conversions per conv.
    """

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and len(call.args) == 2 and any(call.op.same_as(op) for op in _BINARY)):
            return call
        args = list(call.args)
        for i, a in enumerate(args):
            other = _static(getattr(args[1 - i].ty, "shape", None))
            if (isinstance(a, tvm.ir.expr.GenericConst) and a.value.numpy().size == 1 and other is not None
                    and len(other) == 4 and len(a.value.shape) <= 4):
                value = a.value.numpy()
                args[i] = relax.const(np.full((1, other[1], 1, 1), value.reshape(()), value.dtype))
        changed = any(not x.same_as(y) for x, y in zip(args, call.args))
        return relax.Call(call.op, args, call.attrs, call.ty_args) if changed else call


def per_channel_constants(mod):
    """``_PerChannel`` over every Relax function of ``mod``."""
    return rewrite_relax_functions(mod, _PerChannel(mod))


def to_blocked_layout(mod, block: int, min_convs: int = MIN_CONVS):
    """``mod`` with every conv that ``why_not`` accepts in NCHW{block}c; unchanged below ``min_convs``."""
    if block < 2 or not enabled():
        return mod
    original = mod
    mod = pad_output_channels(mod, 2 * block)  # 2 blocks: AMX's channel tiles
    convs = _convs(mod)
    served = [c for c in convs if why_not(c, block) is None]
    if len(served) < min_convs:
        return original
    left = [c for c in convs if why_not(c, block) is not None and not (_stem(c, block) or _small(c) or _narrow(c, block))]
    if _elements(left) > LEFT_MAX_SHARE * _elements(served):  # mixed models flip layouts around every conv
        log.debug("NCHW kept: %d convs the blocked layout does not serve (%s)", len(left), why_not(left[0], block))
        return original

    def choose(call):
        if isinstance(call, relax.Call) and call.op.same_as(_CONV2D):
            if why_not(call, block) is None:
                return _desired(call, block)
            # a conv left out says NCHW outright: "no preference" after a blocked mean made TVM fail
            return {"relax.nn.conv2d": _stem_layouts(call, block) or ["NCHW", "OIHW"]}
        return {}

    try:
        return relax.transform.ConvertLayout({}, choose)(per_channel_constants(mod))
    except Exception as e:  # noqa: BLE001 - TVM failed inferring some op's layout: the model stays NCHW
        log.warning("blocked layout not applied: %s", str(e).strip().splitlines()[-1][:200])
        return original


def _blocks(call: relax.Call) -> tuple[int, int, int] | None:
    """(data block, kernel input block, kernel output block) of a conv2d in NCHW{b}c / OIHW{i}i{o}o
    whose output keeps the data's layout, else None."""
    at = call.attrs
    d, k = _DATA.match(str(at.data_layout)), _KERNEL.match(str(at.kernel_layout))
    if d is None or k is None or str(at.out_layout or at.data_layout) != str(at.data_layout):
        return None
    return int(d.group(1)), int(k.group(1)), int(k.group(2))


def blocked_layouts(call: relax.Call) -> int | None:
    """The block of a conv2d in NCHW{b}c / OIHW{b}i{b}o (the same b throughout), else None."""
    blocks = _blocks(call)
    if blocks is None or int(call.attrs.groups) != 1:
        return None
    b, ki, ko = blocks
    return b if ki == ko == b else None


def blocked_stem(call: relax.Call) -> int | None:
    """The output block of a stem conv2d (``_stem_layouts``: NCHW / OIHW{c}i{b}o → NCHW{b}c), else None."""
    at = call.attrs
    k = _KERNEL.match(str(at.kernel_layout))
    if str(at.data_layout) != "NCHW" or k is None or int(at.groups) != 1:
        return None
    channels, ko = int(call.args[0].ty.shape[1]), int(k.group(2))
    return ko if int(k.group(1)) == channels and str(at.out_layout) == f"NCHW{ko}c" else None


def blocked_depthwise(call: relax.Call) -> int | None:
    """The block of a depthwise conv2d in NCHW{b}c / OIHW1i{b}o, else None."""
    blocks = _blocks(call)
    if blocks is None or int(call.attrs.groups) <= 1:
        return None
    b, ki, ko = blocks
    return b if ki == 1 and ko == b else None


def _window(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation):
    """The padded input, output height and width, and ``at(y, x, ry, rx) -> (row, column)`` of the
    input a tap reads, for a blocked ``data [N, C/b, H, W, b]`` (or a stem's ``[N, C, H, W]``) and a
    kernel ``[.., .., KH, KW, .., ..]``."""
    h, w = (int(d) for d in data.shape[2:4])
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if pt or pl or pb or pr:
        lanes = [0] * (len(data.shape) - 4)
        data = topi.nn.pad(data, [0, 0, pt, pl, *lanes], [0, 0, pb, pr, *lanes], name="pad")
    return data, oh, ow, lambda y, x, ry, rx: (y * sh + ry * dh, x * sw + rx * dw)


def conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, out_dtype: str = "float32"):
    """``data [N, C/b, H, W, b]`` * ``kernel [O/b, C/b, KH, KW, b, b]`` → ``[N, O/b, OH, OW, b]``; a stem's
    ``data [N, C, H, W]`` is one block of ``C`` lanes (``kernel [O/b, 1, KH, KW, C, b]``), read in place."""
    stem = len(data.shape) == 4
    n, cb, bi = int(data.shape[0]), 1 if stem else int(data.shape[1]), int(data.shape[1 if stem else 4])
    ob, _, kh, kw, _, bo = (int(d) for d in kernel.shape)
    data, oh, ow, at = _window(data, kernel, strides, padding, dilation)
    ic = te.reduce_axis((0, cb), "ic")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    ii = te.reduce_axis((0, bi), "ii")
    return te.compute(
        (n, ob, oh, ow, bo),
        lambda b, o, y, x, oi: te.sum(
            (data[(b, ii, *at(y, x, ry, rx))] if stem else data[(b, ic, *at(y, x, ry, rx), ii)]).astype(out_dtype)
            * kernel[o, ic, ry, rx, ii, oi].astype(out_dtype),
            axis=[ic, ry, rx, ii],
        ),
        name=BLOCK_NAME,
    )


def depthwise_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, out_dtype: str = "float32"):
    """``data [N, C/b, H, W, b]`` * ``kernel [C/b, 1, KH, KW, 1, b]`` → ``[N, C/b, OH, OW, b]``."""
    n, cb, _, _, b = (int(d) for d in data.shape)
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    data, oh, ow, at = _window(data, kernel, strides, padding, dilation)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    return te.compute(
        (n, cb, oh, ow, b),
        lambda i, c, y, x, ci: te.sum(
            data[(i, c, *at(y, x, ry, rx), ci)].astype(out_dtype) * kernel[c, 0, ry, rx, 0, ci].astype(out_dtype),
            axis=[ry, rx],
        ),
        name=DEPTHWISE_NAME,
    )


def _legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if blocked_layouts(call) is not None or blocked_stem(call) is not None:
        compute, name = conv2d_nchwc, BLOCK_NAME
    elif blocked_depthwise(call) is not None:
        compute, name = depthwise_nchwc, DEPTHWISE_NAME
    else:  # every other conv2d: TVM's own legalization
        return _CONV2D.get_attr("FLegalize")(bb, call)
    at = call.attrs
    out_dtype = str(at.out_dtype) if str(at.out_dtype) not in ("", "None", "void") else call.args[0].ty.dtype
    return bb.call_te(compute, call.args[0], call.args[1], at.strides, at.padding, at.dilation, out_dtype,
                      primfunc_name_hint=name)


LEGALIZE = {"relax.nn.conv2d": _legalize_conv2d}  # for LegalizeOps(customize_legalize_map=...)

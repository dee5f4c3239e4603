"""Integer convs and matmuls (the ``QConv``/``QGemm`` lowering of ``lowering/qdq.py``) onto kernels:
a Relax rewrite.

The lowering writes a quantized conv as

    [pad(x_u8, zx)] -> conv2d(int32) -> add(corr) -> astype(float32) -> multiply(mult) -> round
    -> add(zy) -> clip(qmin, qmax) -> astype(uint8 | int8)

(a QGemm the same with ``matmul``). ``rewrite_int8_conv`` replaces each such chain that a kernel
serves (``why_not``) by one ``call_tir``, products and requantization in one pass, the padding done
by its gather:

* group-1 convs: the target's kernel (``kernel_for``): ``amx_int8.qconv_func`` (AMX-INT8), else
  ``int8_dot.qconv_func`` on VNNI (AVX-512 or AVX-VNNI) or Arm ``sdot``; on AMX, fewer than 16 input
  channels (a first conv) through ``int8_im2col`` (the window as channels);
* depthwise convs: ``int8_dwconv.dwconv_func`` (16 channels a vector);
* QGemm: the kernel as a 1x1 conv over a 1 x M grid.

``int8_layout.plan_nhwc`` then keeps the tensors between kernels channels-last where that saves
the kernels' transposes. Run before the blocked-layout choice. Targets with neither keep the generic
integer conv2d/matmul (``GRAPHOPT_INT8_AMX=0`` turns AMX off, ``GRAPHOPT_INT8_DOT=0`` the dot-product
kernels; ``GRAPHOPT_INT8_NHWC=0`` keeps NCHW).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from . import amx_int8, int8_dot, int8_dwconv, int8_layout
from .amx_kernel import geometry
from .features import int8_dot_kind
from .int8_im2col import MIN_WINDOW, im2col_func, im2col_weight, output_size

log = logging.getLogger(__name__)
_OP = {name: tvm.ir.Op.get(f"relax.{name}") for name in
       ("nn.conv2d", "matmul", "nn.pad", "add", "astype", "multiply", "round", "clip")}
MIN_CHANNELS = 16  # below this the gather and the channel padding to 64 cost more than AMX saves
# multiply-adds below which a kernel runs on one thread: waking the pool costs microseconds, and on a
# loaded host a descheduled worker stalls the call for milliseconds (PP-OCRv4 rec's squeeze-excite
# convs and 40-row matmuls do 14k-2M)
SERIAL_MACS = {"amx": 1 << 23, "dot": 1 << 22, "depthwise": 1 << 19}


def _threads(threads: int, macs: int, kind: str) -> int:
    return threads if macs >= SERIAL_MACS[kind] else 1


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A group-1 integer conv kernel: ``qconv(c, h, w, o, k, stride, pad, **kw)`` its PrimFunc,
    ``padded_channels(c, o)`` the channels it computes, ``constants(w, corr, mult)`` its packed weight
    and per-channel constants; its functions are named ``{name}_qconv2d`` / ``{name}_qgemm``."""

    name: str
    qconv: Callable
    padded_channels: Callable
    constants: Callable
    work: str  # its SERIAL_MACS entry


def _amx_constants(w, corr, mult):
    _, op_ = amx_int8.padded_channels(w.shape[1], w.shape[0])
    c, m = np.zeros(op_, np.int32), np.zeros(op_, np.float32)
    c[:len(corr)], m[:len(mult)] = corr, mult
    return amx_int8.pack_weight(w), c, m


AMX = Kernel("amx", amx_int8.qconv_func, amx_int8.padded_channels, _amx_constants, "amx")


def _dot_kernel(dot: int8_dot.Dot) -> Kernel:
    return Kernel(dot.kind, lambda *a, **kw: int8_dot.qconv_func(dot, *a, **kw), dot.padded_channels, dot.constants,
                  "dot")


def kernel_for(spec) -> Kernel | None:
    """The kernel for ``spec``'s integer convs: AMX-INT8 where the target has it, else its int8 dot
    product (VNNI, AVX-VNNI, Arm sdot; ``features.int8_dot_kind``), else None (generic code)."""
    features = getattr(spec, "features", None) or {}
    if features.get("amx") and os.environ.get("GRAPHOPT_INT8_AMX", "1") != "0":
        return AMX
    if os.environ.get("GRAPHOPT_INT8_DOT", "1") == "0" or getattr(spec, "is_gpu", False):
        return None
    kind = int8_dot_kind(spec)
    return _dot_kernel(int8_dot.DOTS[kind]) if kind else None


def available(spec) -> bool:
    return kernel_for(spec) is not None


def why_not(conv: relax.Call, weight: np.ndarray | None) -> str | None:
    at = conv.attrs
    x = conv.args[0].ty
    if weight is None or weight.dtype != np.int8:
        return "weight is not an int8 constant"
    if x.dtype != "uint8" or at.data_layout != "NCHW" or at.kernel_layout != "OIHW":
        return "not a uint8 NCHW conv"
    if [int(d) for d in at.dilation] != [1, 1]:
        return "dilated"
    n, c = int(x.shape[0]), int(x.shape[1])
    o, _, kh, kw = weight.shape
    s = [int(v) for v in at.strides]
    if int(at.groups) != 1:  # depthwise: 16 channels a vector (int8_dwconv.py), strides (2, 1) too
        depthwise = int(at.groups) == c == o and weight.shape[1] == 1 and n == 1 and kh == kw
        return None if depthwise and int8_dwconv.served(c, kh, s) else f"{int(at.groups)} groups"
    if n != 1:
        return f"batch {n}"
    if c * kh * kw < MIN_WINDOW:
        return f"{c} input channels, {kh}x{kw} kernel"
    # other kernels, strides (a first conv's 3 channels, PP-OCR's 1x3 neck) go through im2col
    return None


def _im2col(m: dict, kernel: Kernel) -> bool:
    """Whether the conv of match ``m`` takes the window as channels (int8_im2col.py): few input
    channels on AMX (padded to 64; the dot-product kernels pad to 4 and read a stem directly), or a
    kernel/stride/padding the shifted-tap products do not serve."""
    _, c, kh, kw = m["weight"].shape
    (sy, sx), (ph, pw) = m["strides"], m["pads"]
    if (c < MIN_CHANNELS and kernel is AMX) or kh != kw or sy != sx or ph != pw:
        return True
    return (kh == 1 and ph > 0) or (kh > 1 and (kh % 2 == 0 or sy > 2))


class _Bindings:
    def __init__(self, func: relax.Function):
        self.value, self.uses = {}, Counter()
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                for v in relax.analysis.free_vars(b.value):
                    self.uses[v] += 1
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] += 2

    def call(self, expr, op: str, single_use: bool = True):
        """The call ``expr`` binds when it is ``op`` (and used once), else None."""
        if not isinstance(expr, relax.Var) or expr not in self.value or (single_use and self.uses[expr] != 1):
            return None
        value = self.value[expr]
        return value if isinstance(value, relax.Call) and value.op.same_as(_OP[op]) else None

    def constant(self, expr) -> np.ndarray | None:
        while isinstance(expr, relax.Var) and expr in self.value:
            expr = self.value[expr]
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _prim(v) -> float:
    return float(v.value.value if hasattr(v, "value") and hasattr(v.value, "value") else v.value)


def _match(b: _Bindings, last: relax.Call):
    """The chain ending at ``astype(uint8|int8)`` ``last``: a dict of its parts, or None."""
    if not last.op.same_as(_OP["astype"]) or str(last.attrs.dtype) not in ("uint8", "int8"):
        return None
    steps, expr = [], last.args[0]
    for op in ("clip", "add", "round", "multiply", "astype", "add", "nn.conv2d"):
        call = b.call(expr, op)
        if call is None and op == "nn.conv2d":
            call = b.call(expr, "matmul")
        if call is None:
            return None
        steps.append(call)
        expr = call.args[0]
    clip, add_zy, _, mul, _, add_c, conv = steps
    zy, mult, corr = b.constant(add_zy.args[1]), b.constant(mul.args[1]), b.constant(add_c.args[1])
    weight = b.constant(conv.args[1])
    if zy is None or zy.size != 1 or mult is None or corr is None or corr.dtype != np.int32:
        return None
    parts = {"zy": int(zy.reshape(())), "qmin": int(_prim(clip.args[1])), "qmax": int(_prim(clip.args[2])),
             "dtype": str(last.attrs.dtype)}
    if conv.op.same_as(_OP["matmul"]):  # a QGemm: a 1x1 conv over a 1 x M grid of K channels, NHWC
        x_shape = int8_layout.shape_of(conv.args[0])
        if weight is None or weight.dtype != np.int8 or weight.ndim != 2 or x_shape is None or len(x_shape) < 2 \
                or conv.args[0].ty.dtype != "uint8" or x_shape[-1] != weight.shape[0]:
            return None
        n = weight.shape[1]
        return {**parts, "x": conv.args[0], "weight": np.ascontiguousarray(weight.T)[:, :, None, None], "pad": 0,
                "zx": 0, "stride": 1, "depthwise": False, "matmul": True,
                "corr": np.broadcast_to(corr.reshape(-1), (n,)), "mult": np.broadcast_to(mult.reshape(-1), (n,))}
    why = why_not(conv, weight)
    if why is not None:
        log.debug("int8 conv %s not on AMX: %s", weight.shape if weight is not None else None, why)
        return None
    x, pads, zx = conv.args[0], (0, 0), 0
    padded = b.call(x, "nn.pad")
    if padded is not None:  # [0, 0, 0, 0, top, bottom, left, right]: symmetric per axis
        pw = [int(v) for v in padded.attrs.pad_width]
        if pw[:4] != [0, 0, 0, 0] or pw[4] != pw[5] or pw[6] != pw[7] or str(padded.attrs.pad_mode) != "constant":
            return None
        x, pads, zx = padded.args[0], (pw[4], pw[6]), int(_pad_value(padded))
    if int(conv.attrs.groups) != 1 and pads[0] != pads[1]:
        return None
    pad = pads[0]
    o = weight.shape[0]
    return {**parts, "x": x, "weight": weight, "pad": pad, "zx": zx,
            "corr": np.broadcast_to(corr.reshape(-1), (o,)), "mult": np.broadcast_to(mult.reshape(-1), (o,)),
            "stride": int(conv.attrs.strides[0]), "strides": tuple(int(v) for v in conv.attrs.strides), "pads": pads,
            "depthwise": int(conv.attrs.groups) != 1, "matmul": False}


def _pad_value(pad: relax.Call) -> float:
    if len(pad.args) > 1:
        return _prim(pad.args[1])
    return float(pad.attrs.pad_value)


def _kernel_call(bb, kernel: Kernel, m: dict, threads: int, x, in_layout: str, out_layout: str):
    """(the kernel call of match ``m`` reading ``x``, bindings to put before it)."""
    if m["matmul"]:
        return _gemm_call(bb, kernel, m, threads, x)
    _, c, h, w = (int(d) for d in m["x"].ty.shape)
    weight, pre = m["weight"], []
    o, _, k, _ = weight.shape
    stride, pad = m["stride"], m["pad"]
    if m["depthwise"]:
        oh, ow = ((h + 2 * pad - k) // m["strides"][0] + 1, (w + 2 * pad - k) // m["strides"][1] + 1)
        func = int8_dwconv.dwconv_func(c, h, w, k, m["strides"], pad, zx=m["zx"], zy=m["zy"], qmin=m["qmin"],
                                       qmax=m["qmax"], out_dtype=m["dtype"], in_layout=in_layout, out_layout=out_layout,
                                       threads=_threads(threads, c * k * k * oh * ow, "depthwise"))
        args = [x, relax.const(int8_dwconv.pack_weight(weight)), relax.const(np.ascontiguousarray(m["corr"], np.int32)),
                relax.const(np.ascontiguousarray(m["mult"], np.float32))]
        shape = [1, o, oh, ow] if out_layout == "NCHW" else [1, oh, ow, o]
        return relax.call_tir(bb.add_func(func, "dw_qconv2d"), args, relax.TensorType(shape, m["dtype"])), pre
    if _im2col(m, kernel):  # window as channels: a 1x1 conv over the im2col tensor (NHWC)
        size = weight.shape[2:]
        oh, ow = output_size(h, w, size, m["strides"], m["pads"])
        window = size[0] * size[1] * c
        width = kernel.padded_channels(window, o)[0]
        cols = relax.DataflowVar("im2col", relax.TensorType([1, oh, ow, width], "uint8"))
        func = im2col_func(c, h, w, size, m["strides"], m["pads"], threads=threads, in_layout=in_layout, width=width)
        zp = relax.const(np.full(1, m["zx"], np.uint8))
        pre.append(relax.VarBinding(cols, relax.call_tir(bb.add_func(func, "im2col_u8"), [x, zp], cols.ty)))
        weight = np.zeros((o, width, 1, 1), np.int8)
        weight[:, :window] = im2col_weight(m["weight"])
        x, in_layout, c, h, w, k, stride, pad = cols, "NHWC", width, oh, ow, 1, 1, 0
    g = geometry(h, w, k, stride, pad)
    macs = c * o * k * k * g["oh"] * g["ow"]
    func = kernel.qconv(c, h, w, o, k, stride, pad, zx=m["zx"], zy=m["zy"], qmin=m["qmin"], qmax=m["qmax"],
                        out_dtype=m["dtype"], threads=_threads(threads, macs, kernel.work), in_layout=in_layout,
                        out_layout=out_layout)
    gvar = bb.add_func(func, f"{kernel.name}_qconv2d")
    args = [x, *map(relax.const, kernel.constants(weight, m["corr"], m["mult"]))]
    shape = [1, o, g["oh"], g["ow"]] if out_layout == "NCHW" else [1, g["oh"], g["ow"], o]
    return relax.call_tir(gvar, args, relax.TensorType(shape, m["dtype"])), pre


def _gemm_call(bb, kernel: Kernel, m: dict, threads: int, x):
    """A QGemm ``[..., M, K] x [K, N]`` as the kernel's 1x1 conv of K channels over a 1 x M grid (NHWC)."""
    shape = int8_layout.shape_of(m["x"])
    rows, k, n = int(np.prod(shape[:-1])), shape[-1], m["weight"].shape[0]
    flat = relax.DataflowVar("gemm_rows", relax.TensorType([1, 1, rows, k], "uint8"))
    res = relax.DataflowVar("gemm_out", relax.TensorType([1, 1, rows, n], m["dtype"]))
    func = kernel.qconv(k, 1, rows, n, 1, 1, 0, zx=0, zy=m["zy"], qmin=m["qmin"], qmax=m["qmax"], out_dtype=m["dtype"],
                        threads=_threads(threads, rows * k * n, kernel.work), in_layout="NHWC", out_layout="NHWC")
    args = [flat, *map(relax.const, kernel.constants(m["weight"], m["corr"], m["mult"]))]
    pre = [relax.VarBinding(flat, relax.op.reshape(x, [1, 1, rows, k])),
           relax.VarBinding(res, relax.call_tir(bb.add_func(func, f"{kernel.name}_qgemm"), args, res.ty))]
    return relax.op.reshape(res, [*shape[:-1], n]), pre


def rewrite_int8_conv(mod: tvm.IRModule, spec) -> tvm.IRModule:
    """Every integer conv chain of ``mod`` that ``spec``'s kernel (``kernel_for``) serves, as a kernel
    call; tensors between such calls in NHWC where ``int8_layout.plan_nhwc`` finds it pays
    (``GRAPHOPT_INT8_NHWC=0``: all NCHW)."""
    kernel = kernel_for(spec)
    if kernel is None:
        return mod
    threads = spec.features.get("cores", 1)

    def find(b: _Bindings) -> dict:
        kernels = {}
        for var, value in b.value.items():
            if isinstance(value, relax.Call):
                m = _match(b, value)
                if m is not None:
                    kernels[var] = m
        return kernels

    def blocks_of(bb, func, b: _Bindings, kernels: dict) -> list:
        nhwc = int8_layout.plan_nhwc(b.value, kernels) if os.environ.get("GRAPHOPT_INT8_NHWC", "1") != "0" else set()
        log.debug("%d of %d int8 tensors in NHWC", len(nhwc), len(b.value))

        def call(m, x, in_layout, out_layout):
            return _kernel_call(bb, kernel, m, threads, x, in_layout, out_layout)

        return [type(block)(int8_layout.rewrite_block(block, kernels, nhwc, call)) for block in func.body.blocks]

    mod, total = rewrite_matches(mod, find, blocks_of)
    log.debug("%d int8 convs on %s", total, kernel.name)
    return mod


def rewrite_matches(mod: tvm.IRModule, find: Callable, blocks_of: Callable) -> tuple[tvm.IRModule, int]:
    """``(mod, matches)`` with every Relax function where ``find(bindings)`` finds matches (a dict)
    rebuilt from ``blocks_of(builder, function, bindings, matches)`` (its new binding blocks), then dead
    code removed; ``mod`` itself when nothing matched. The integer conv and matmul rewrites share it."""
    bb = relax.BlockBuilder(tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs))
    total = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        b = _Bindings(func)
        found = find(b)
        if not found:
            continue
        total += len(found)
        body = relax.SeqExpr(blocks_of(bb, func, b, found), func.body.body)
        bb.update_func(gv, relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
    if not total:
        return mod, 0
    return relax.transform.DeadCodeElimination()(relax.transform.Normalize()(bb.get())), total

"""Convolutions on AMX tiles: a Relax rewrite of conv2d chains for x86 targets with AMX-BF16.

``rewrite_amx_conv`` (run before the Winograd rewrite, which then sees only the convs left) replaces
each eligible ``conv2d`` in the blocked layout (NCHW16c, ``blocked.py``), together with what follows
it, by one ``call_tir`` to ``amx_kernel.amx_conv_func``::

    conv2d -> [add a per-channel constant (the bias)] -> [add a tensor (the residual)] -> [relu]

The epilogue is taken into the kernel (a conv's output is written once, as with FuseOps), so a
binding of the chain is taken only when the chain's previous value has no other use.

Eligible (``why_not`` says which condition failed): NCHW16c/OIHW16i16o, batch 1, groups 1, no
dilation, float32, a constant weight, input and output channels multiples of 32, and either a 1x1
kernel without padding (any stride) or a square odd kernel with stride 1 or 2; and, the measured cost
model, at most 14x14 outputs for a kernel larger than 1x1 (``MAX_POSITIONS``). ``GRAPHOPT_AMX=0`` turns the rewrite off; targets
without AMX never take it (``available``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import tvm
from tvm import relax

from .amx_kernel import amx_conv_func, geometry, pack_weight
from .blocked import blocked_layouts
from .winograd import oihw

log = logging.getLogger(__name__)
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_MAXIMUM = tvm.ir.Op.get("relax.maximum")
_RELU = tvm.ir.Op.get("relax.nn.relu")
# Measured on a 2-core AMX Xeon VM, AMX / AVX-512 path (Winograd where it applies), conv + 1x1 chains:
# 256@14 3x3 0.55, 512@7 3x3 0.50, 1024->256@14 1x1 0.77, 2048->512@7 0.75; but at 28x28 and 56x56,
# where the split pass re-reads and re-writes a large input (and Winograd F4 competes), 1.04-1.24.
# With the split per band (amx_kernel.use_bands) a thread's split input stays in its L2: ResNet-50's
# 1x1s at 56x56 and 28x28 on AMX took it from 0.90 to 0.81 of ORT (same run); its 3x3s at 28x28 on
# AMX were even with Winograd (0.804 / 0.805), at 56x56 behind (0.94).
MAX_POSITIONS = 14 * 14
MAX_POINTWISE_POSITIONS = 14 * 14  # 1x1 convs


def available(spec) -> bool:
    """The target has AMX-BF16 (``features["amx"]``, set from the host's CPU flags) and
    ``GRAPHOPT_AMX`` is not ``0``."""
    features = getattr(spec, "features", None) or {}
    return bool(features.get("amx")) and os.environ.get("GRAPHOPT_AMX", "1") != "0"


def why_not(call: relax.Call, weight, cost_model: bool = True) -> str | None:
    """None when ``call`` (a conv2d whose weight is ``weight``, a constant or None) can run on AMX.

    ``cost_model``: also require an output grid of at most ``MAX_POSITIONS`` positions.
    """
    at = call.attrs
    if blocked_layouts(call) != 16:
        return "not in the NCHW16c/OIHW16i16o layout"
    if [int(d) for d in at.dilation] != [1, 1]:
        return "dilated"
    if weight is None:
        return "weight is not a constant"
    x = call.args[0].ty
    if x.shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in x.shape):
        return "input shape is not static"
    if x.dtype != "float32" or weight.ty.dtype != "float32":
        return "not float32"
    n, cb, _, _, _ = (int(d) for d in x.shape)
    ob, _, kh, kw, _, _ = (int(d) for d in weight.ty.shape)
    if n != 1:
        return f"batch {n}, not 1"
    if (cb * 16) % 32 or (ob * 16) % 32:
        return f"channels {cb * 16}->{ob * 16} are not multiples of 32"
    strides, pads = [int(s) for s in at.strides], [int(p) for p in at.padding]
    if kh != kw or strides[0] != strides[1] or len(set(pads)) != 1:
        return "kernel, strides or padding not square"
    if kh == 1 and pads[0] != 0:
        return "padded 1x1 kernel"
    if kh > 1 and (strides[0] > 2 or kh % 2 == 0):
        return f"{kh}x{kh} kernel with stride {strides[0]}"
    g = geometry(*(int(d) for d in list(x.shape)[2:4]), kh, strides[0], pads[0])
    oh, ow = g["oh"], g["ow"]
    bound = MAX_POINTWISE_POSITIONS if kh == 1 else MAX_POSITIONS
    if cost_model and bound is not None and oh * ow > bound:
        return f"{oh}x{ow} outputs: the split pass over a large input costs more than the tiles save"
    return None


class _Chains:
    """The bindings of one function: values, uses, and which chains the rewrite takes."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}
        self.taken: set = set()  # bindings a chain already holds
        self.uses: Counter = Counter()
        self.user: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                for v in relax.analysis.free_vars(b.value):
                    self.uses[v] += 1
                    self.user[v] = b.var
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] += 2  # a function output is never folded into a chain

    def constant(self, expr):
        while isinstance(expr, relax.Var) and expr in self.value:
            expr = self.value[expr]
        return expr if isinstance(expr, tvm.ir.expr.Constant) else None

    def next_op(self, var):
        """The binding that is ``var``'s only use, with its call, or (None, None)."""
        if self.uses[var] != 1 or var not in self.user:
            return None, None
        nxt = self.user[var]
        if nxt in self.taken:
            return None, None
        call = self.value.get(nxt)
        return (nxt, call) if isinstance(call, relax.Call) else (None, None)

    def chain(self, conv_var, out_shape):
        """(last var, bias constant or None, residual expr or None, relu); the chain's vars go to ``taken``."""
        last, bias, residual, relu, taken = conv_var, None, None, False, [conv_var]
        nxt, call = self.next_op(last)
        if call is not None and call.op.same_as(_ADD):
            other = call.args[1] if call.args[0].same_as(last) else call.args[0]
            const = self.constant(other)
            if const is not None and [int(d) for d in const.ty.shape] == [1, out_shape[1], 1, 1, 16]:
                bias, last = const, nxt
                taken.append(nxt)
                nxt, call = self.next_op(last)
        if call is not None and call.op.same_as(_ADD):
            other = call.args[1] if call.args[0].same_as(last) else call.args[0]
            shape = getattr(other.ty, "shape", None)
            if self.constant(other) is None and shape is not None and [int(d) for d in shape] == out_shape:
                residual, last = other, nxt
                taken.append(nxt)
                nxt, call = self.next_op(last)
        if call is not None and _is_relu(call, last, self):
            relu, last = True, nxt
            taken.append(nxt)
        self.taken.update(taken)
        return last, bias, residual, relu


def _is_relu(call, var, chains: _Chains) -> bool:
    if call.op.same_as(_RELU):
        return True
    if not call.op.same_as(_MAXIMUM):
        return False
    other = call.args[1] if call.args[0].same_as(var) else call.args[0]
    const = chains.constant(other)
    return const is not None and not np.any(const.value.numpy())


def _rewrite_function(bb: relax.BlockBuilder, gv, func: relax.Function, threads: int) -> int:
    chains = _Chains(func)
    replace: dict = {}  # var of a chain's last binding -> its new value; the chain's other bindings go
    for var, value in list(chains.value.items()):
        if var in chains.taken or not (isinstance(value, relax.Call) and value.op.same_as(_CONV2D)):
            continue
        weight = chains.constant(value.args[1])
        why = why_not(value, weight)
        if why is not None:
            log.debug("conv2d %s not on AMX: %s", value.args[1].ty.shape, why)
            continue
        out_shape = [int(d) for d in value.ty.shape]
        last, bias, residual, relu = chains.chain(var, out_shape)
        replace[last] = _kernel_call(bb, value, weight, bias, residual, relu, threads)
    if not replace:
        return 0
    blocks = []
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            if b.var in chains.taken and b.var not in replace:
                continue
            bindings.append(relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b)
        blocks.append(type(block)(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    bb.update_func(gv, relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
    return len(replace)


def _kernel_call(bb: relax.BlockBuilder, conv: relax.Call, weight, bias, residual, relu: bool, threads: int):
    x = conv.args[0]
    _, cb, h, w, _ = (int(d) for d in x.ty.shape)
    out_shape = [int(d) for d in conv.ty.shape]
    wt = oihw(weight.value.numpy(), 16)
    k = wt.shape[2]
    func = amx_conv_func(cb * 16, h, w, wt.shape[0], k, int(conv.attrs.strides[0]), int(conv.attrs.padding[0]),
                         residual=residual is not None, relu=relu, threads=threads)
    gvar = bb.add_func(func, "amx_conv2d")
    b = bias if bias is not None else relax.const(np.zeros(out_shape[1:2] + [1, 1, 16], "float32")[None])
    args = [x, relax.const(pack_weight(wt)), b] + ([residual] if residual is not None else [])
    return relax.call_tir(gvar, args, relax.TensorType(out_shape, "float32"))


def rewrite_amx_conv(mod: tvm.IRModule, threads: int) -> tvm.IRModule:
    """Every eligible conv2d chain of ``mod``'s Relax functions as an AMX kernel call."""
    bb = relax.BlockBuilder(tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs))
    total = 0
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            total += _rewrite_function(bb, gv, func, threads)
    log.debug("%d convs on AMX", total)
    return relax.transform.Normalize()(bb.get()) if total else mod

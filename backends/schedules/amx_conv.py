"""Convolutions on AMX tiles: a Relax rewrite of conv2d chains for x86 targets with AMX-BF16.

``rewrite_amx_conv`` (run before the Winograd rewrite, which then sees only the convs left) replaces
each eligible ``conv2d`` in the blocked layout (NCHW16c, ``blocked.py``), together with what follows
it, by one ``call_tir`` to ``amx_kernel.amx_conv_func``::

    conv2d -> elementwise ops over per-channel constants, one residual tensor and the chain's own
              values (bias, residual, relu; bias and hardswish: y·clip(y + 3, 0, 6) / 6; ...)

The epilogue is taken into the kernel (a conv's output is written once, as with FuseOps), so the
chain taken is the longest whose values other than the last have no use outside it.

Eligible (``why_not`` says which condition failed): NCHW16c/OIHW16i16o, batch 1, groups 1, no
dilation, float32, a constant weight, input and output channels multiples of 32, and either a 1x1
kernel without padding (any stride) or a square odd kernel with stride 1 or 2; and, the measured cost
model, at most 14x14 outputs for a kernel larger than 1x1 (``MAX_POSITIONS``). ``GRAPHOPT_AMX=0``
turns the rewrite off; targets without AMX never take it (``available``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import tvm
from tvm import relax

from .amx_kernel import Epilogue, amx_conv_func, geometry, pack_weight
from .blocked import blocked_layouts
from .winograd import oihw

log = logging.getLogger(__name__)
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
# Measured on a 2-core AMX Xeon VM, AMX / AVX-512 path (Winograd where it applies), conv + 1x1 chains:
# 256@14 3x3 0.55, 512@7 3x3 0.50, 1024->256@14 1x1 0.77, 2048->512@7 0.75; but at 28x28 and 56x56,
# where the split pass re-reads and re-writes a large input (and Winograd F4 competes), 1.04-1.24.
# With the split per band (amx_kernel.use_bands) a thread's split input stays in its L2: ResNet-50's
# 1x1s at 56x56 and 28x28 on AMX took it from 0.90 to 0.81 of ORT (same run); its 3x3s at 28x28 on
# AMX were even with Winograd (0.804 / 0.805), at 56x56 behind (0.94).
MAX_POSITIONS = 14 * 14
MAX_POINTWISE_POSITIONS = None  # 1x1 convs: no bound


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


_STEP_OPS = {tvm.ir.Op.get(f"relax.{name}"): name.rpartition(".")[2]
             for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "nn.relu")}
MAX_STEPS = 16
SCAN = 64  # bindings after a conv that its chain may reach over (the uses of a chain sit close by)


class _Chains:
    """The bindings of one function: values, uses, and which chains the rewrite takes."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}
        self.order: list = []
        self.index: dict = {}
        self.taken: set = set()  # bindings a chain already holds
        self.uses: Counter = Counter()
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                self.index[b.var] = len(self.order)
                self.order.append(b.var)
                for v in relax.analysis.free_vars(b.value):
                    self.uses[v] += 1
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] += 2  # a function output is never folded into a chain

    def constant(self, expr):
        while isinstance(expr, relax.Var) and expr in self.value:
            expr = self.value[expr]
        return expr if isinstance(expr, tvm.ir.expr.Constant) else None

    def chain(self, conv_var, out_shape):
        """The elementwise bindings after ``conv_var`` that the kernel's epilogue takes: (last var,
        Epilogue, per-channel constants ``[O/16, 16]``, residual expr or None); they go to ``taken``.

        A binding joins when it is an op of ``_STEP_OPS`` over values already in the chain,
        per-channel or scalar constants, and at most one other tensor of the output's shape (the
        residual). The chain taken is the longest whose values other than the last have no use
        outside it (each is computed once, in the kernel's registers).
        """
        members = {conv_var: 0}  # var -> its value index in the epilogue
        inside: Counter = Counter()  # uses of members by members
        steps, consts, residual = [], [], None
        best = (conv_var, 0, 0, None)  # the conv alone
        start = self.index[conv_var] + 1
        for var in self.order[start:start + SCAN]:
            value = self.value[var]
            used = [v for v in relax.analysis.free_vars(value) if v in members]
            if not used:
                continue
            step = self._step(value, members, out_shape, consts, residual)
            if step is None or var in self.taken or len(steps) == MAX_STEPS:
                break
            (op, a, b), residual = step
            steps.append((op, a, b))
            members[var] = len(steps)
            inside.update(used)
            if all(inside[m] == self.uses[m] for m in members if m is not var):
                best = (var, len(steps), len(consts), residual)
        last, n, nc, residual = best
        self.taken.update(m for m, i in members.items() if i <= n)
        return last, Epilogue(tuple(steps[:n])), consts[:nc], residual

    def _step(self, value, members, out_shape, consts, residual):
        """((op, a, b), residual) for a binding the epilogue can take, else None; its constants are
        appended to ``consts`` when it can."""
        if not isinstance(value, relax.Call) or value.op not in _STEP_OPS:
            return None
        if [int(d) for d in getattr(value.ty, "shape", None) or []] != out_shape or value.ty.dtype != "float32":
            return None
        operands, new = [], []
        for arg in value.args:
            if arg in members:
                operands.append(("v", members[arg]))
                continue
            const = self.constant(arg)
            if const is not None:
                per_channel = _per_channel(const.value.numpy(), out_shape)
                if per_channel is None:
                    return None
                new.append(per_channel)
                operands.append(("c", len(consts) + len(new) - 1))
                continue
            shape = getattr(arg.ty, "shape", None)
            if shape is None or [int(d) for d in shape] != out_shape or not (residual is None or residual.same_as(arg)):
                return None
            residual = arg
            operands.append(("r",))
        consts.extend(new)
        a, b = (operands + [None])[:2]
        return (_STEP_OPS[value.op], a, b), residual


def _per_channel(value: np.ndarray, out_shape) -> np.ndarray | None:
    """``value`` as ``[O/16, 16]`` float32 when it broadcasts over a ``[1, O/16, H, W, 16]`` output as a
    per-channel (or scalar) constant, else None."""
    target = [1, out_shape[1], 1, 1, 16]
    if value.ndim > 5 or value.dtype != np.float32:
        return None
    try:
        if list(np.broadcast_shapes(value.shape, target)) != target:
            return None
    except ValueError:
        return None
    return np.ascontiguousarray(np.broadcast_to(value, target).reshape(out_shape[1], 16))


def _rewrite_function(bb: relax.BlockBuilder, gv, func: relax.Function, threads: int) -> int:
    chains = _Chains(func)
    replace: dict = {}  # var of a chain's last binding -> its new value; the chain's other bindings go
    for var in chains.order:
        value = chains.value[var]
        if var in chains.taken or not (isinstance(value, relax.Call) and value.op.same_as(_CONV2D)):
            continue
        weight = chains.constant(value.args[1])
        why = why_not(value, weight)
        if why is not None:
            log.debug("conv2d %s not on AMX: %s", value.args[1].ty.shape, why)
            continue
        last, epilogue, consts, residual = chains.chain(var, [int(d) for d in value.ty.shape])
        replace[last] = _kernel_call(bb, value, weight, epilogue, consts, residual, threads)
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


def _kernel_call(bb: relax.BlockBuilder, conv: relax.Call, weight, epilogue, consts, residual, threads: int):
    x = conv.args[0]
    _, cb, h, w, _ = (int(d) for d in x.ty.shape)
    out_shape = [int(d) for d in conv.ty.shape]
    wt = oihw(weight.value.numpy(), 16)
    k = wt.shape[2]
    func = amx_conv_func(cb * 16, h, w, wt.shape[0], k, int(conv.attrs.strides[0]), int(conv.attrs.padding[0]),
                         epilogue=epilogue, threads=threads)
    gvar = bb.add_func(func, "amx_conv2d")
    ec = np.stack(consts) if consts else np.zeros((1, out_shape[1], 16), "float32")
    args = [x, relax.const(pack_weight(wt)), relax.const(ec)] + ([residual] if residual is not None else [])
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

"""Which integer tensors live channels-last (NHWC) between AMX-INT8 convs.

The AMX-INT8 kernel (``amx_int8.py``) reads rows of 64 input channels and writes rows of 16 output
channels: in NHWC both are contiguous copies, in NCHW a transpose of bytes (ResNet-50's 1x1 convs at
56x56, 2 threads: 0.54-0.81 ms NCHW to NCHW, 0.12 ms NHWC to NHWC). The integer glue between
convs of a QDQ model (dequantize, a residual add, relu, quantize) is elementwise with per-tensor
scalars, so it computes the same in either layout.

``plan_nhwc`` picks the tensors to keep in NHWC: the outputs of the kernel calls, grown through
elementwise calls whose tensor operands are all NHWC (same shape) or single values, kept only in
connected regions that feed some AMX conv (otherwise NHWC only moves a transpose elsewhere: a
PP-OCR pointwise conv whose hardswish feeds a depthwise conv). Uses outside the region (a pooling,
a depthwise conv, the function's output) read a transpose back to NCHW.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

ELEMENTWISE = ("add", "subtract", "multiply", "divide", "maximum", "minimum", "astype", "round", "clip",
               "nn.relu", "floor", "ceil", "sigmoid", "tanh", "exp", "negative", "abs", "sqrt", "power")
_EW = {tvm.ir.Op.get(f"relax.{name}") for name in ELEMENTWISE}
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def shape_of(expr) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or getattr(ty, "shape", None) is None:
        return None
    try:
        return [int(d) for d in ty.shape]
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def _nhwc_operands(value: relax.Call, out: list[int], nhwc: set) -> list | None:
    """The NHWC operands of elementwise ``value`` when every other operand is a single value, else None."""
    ins = []
    for a in value.args:
        if isinstance(a, relax.Var) and a in nhwc:
            if shape_of(a) != out:
                return None
            ins.append(a)
        elif isinstance(getattr(a, "ty", None), relax.TensorType):
            shape = shape_of(a)
            if shape is None or math.prod(shape) != 1:
                return None
    return ins


def plan_nhwc(bindings: dict, kernels: dict) -> set:
    """The dataflow vars to hold in NHWC: ``bindings`` maps each var to its value (in order),
    ``kernels`` maps the vars bound to AMX conv chains to their match (``"x"``: the conv's input)."""
    parent: dict = {}

    def find(v):
        while parent[v] is not v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for var, m in kernels.items():
        if isinstance(var, relax.DataflowVar) and not m.get("matmul"):  # (a QGemm's rows are no image)
            parent[var] = var
    for var, value in bindings.items():
        if var in kernels or not isinstance(var, relax.DataflowVar) or not isinstance(value, relax.Call):
            continue
        out = shape_of(var)
        if value.op not in _EW or out is None or len(out) != 4:
            continue
        ins = _nhwc_operands(value, out, parent.keys())
        if ins:
            parent[var] = var
            for a in ins:
                parent[find(a)] = var
    fed = {find(m["x"]) for m in kernels.values() if m["x"] in parent}
    return {v for v in parent if find(v) in fed}


def nhwc_var(var: relax.Var) -> relax.Var:
    """A new dataflow var of ``var``'s type with its shape in NHWC."""
    n, c, h, w = shape_of(var)
    return relax.DataflowVar(f"{var.name}_nhwc", relax.TensorType([n, h, w, c], var.ty.dtype))


def substitute(expr, mapping: dict):
    """``expr`` with the vars of ``mapping`` replaced (calls, tuples and their items)."""
    if isinstance(expr, relax.Var):
        return mapping.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, mapping) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, mapping), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, mapping) for a in expr.args], expr.attrs, expr.ty_args)
    return expr


def rewrite_block(block, kernels: dict, nhwc: set, kernel_call) -> list:
    """The bindings of ``block`` with kernel calls (``kernel_call(m, x, in_layout, out_layout)``: the
    call and bindings to put before it) and the vars of ``nhwc`` in NHWC; every other use of an NHWC
    var reads a transpose back."""
    out, now, back = [], {}, {}
    for binding in block.bindings:
        var, value = binding.var, binding.value
        if var in kernels:
            m = kernels[var]
            x, in_layout = (now[m["x"]], "NHWC") if m["x"] in now else (back.get(m["x"], m["x"]), "NCHW")
            value, pre = kernel_call(m, x, in_layout, "NHWC" if var in nhwc else "NCHW")
            out += pre
        elif var in nhwc:
            value = relax.Call(value.op, [now.get(a, a) if isinstance(a, relax.Var) else a for a in value.args],
                               value.attrs, value.ty_args)
        else:
            value = substitute(value, back)
        if var not in nhwc:
            out.append(relax.VarBinding(var, value))
            continue
        now[var] = nhwc_var(var)
        back[var] = relax.DataflowVar(f"{var.name}_nchw", var.ty)
        out += [relax.VarBinding(now[var], value),
                relax.VarBinding(back[var], relax.op.permute_dims(now[var], list(TO_NCHW)))]
    return out

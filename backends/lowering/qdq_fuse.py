"""QDQ groups to integer ops: the rewrite that makes a quantized model run on integer products.

A QDQ model (the form ONNX Runtime's ``quantize_static(QuantFormat.QDQ)`` and graphopt's quantizer
write) keeps every op in float between ``DequantizeLinear`` and ``QuantizeLinear``. This rewrite
finds the groups

    DequantizeLinear(x_q) ─┐
    DequantizeLinear(w_q) ─┼─ Conv / MatMul / Gemm ─ [Relu | Clip] ─ QuantizeLinear ─▶ y_q
    [DequantizeLinear(b)] ─┘

(``w_q`` a constant int8 tensor, symmetric: zero point 0, per-tensor or per-output-channel scales;
``b`` int32 with scale ``s_x·s_w``) and replaces each by one graphopt-domain node that reads ``x_q``
and writes ``y_q``:

* ``QConv(x_q, w_q, bias, multiplier)``: attributes of the Conv, plus ``x_zero_point``,
  ``y_zero_point``, ``qmin``, ``qmax``. ``y_q = clamp(round_half_even(float(Σ (x_q - zx)·w_q + bias)
  · multiplier[o]) + zy, qmin, qmax)``, the sum exact in int32 and the padding of ``x_q`` being ``zx``
  (the quantized zero), the multiplier ``s_x·s_w[o]/s_y`` in float32 as ONNX Runtime's QLinearConv
  computes it.
* ``QGemm(x_q, w_q [K, N], bias, multiplier)``: the same over the last axis of ``x_q``
  (MatMul with a constant 2-D weight, Gemm with alpha = beta = 1 and no transA).

A Relu or Clip before the QuantizeLinear is exact in the quantized domain (quantization is
monotone and maps 0 to zy): it narrows ``[qmin, qmax]``.

Why a graph-level rewrite, in the backend: the pattern is a property of the ONNX graph (which values
are constants, which DequantizeLinear feeds which Conv, which scales meet), and the result is still
one node a lowering rule turns into Relax (``qdq.py``), so schedules see an integer conv2d like any
other. It runs after graphopt's passes, only when compiling: the ONNX that ``graphopt optimize``
writes keeps the standard QDQ form any runtime reads.

Groups that do not match (asymmetric or uint8 weights, float8, blocked scales, a Conv output with
other uses, a DequantizeLinear input that is not quantized data) stay as they are and run in float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import (
    GRAPHOPT_DOMAIN,
    const_array,
    drop_unused_constants,
    graphs_of,
    new_const,
    only_consumer,
    replace_value,
)

_STD = ("", "ai.onnx")
_ACT_TYPES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}


def _node(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in _STD:
        return None
    return node


def _qparams(dq: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale float32, zero point int64) of a QuantizeLinear/DequantizeLinear with constant parameters."""
    scale = const_array(dq.inputs[1])
    if scale is None or scale.dtype != np.float32 or dq.attributes.get_int("block_size", 0):
        return None
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zp = const_array(zp_value) if zp_value is not None else np.zeros((), np.int64)
    if zp is None:
        return None
    return scale, zp.astype(np.int64)


def _activation(node: ir.Node, quantized: ir.Value) -> tuple[int, float, ir.DataType] | None:
    """(zero point, scale, type) of a per-tensor uint8/int8 activation (De)QuantizeLinear whose
    quantized side is ``quantized``."""
    params = _qparams(node)
    dtype = quantized.dtype
    if params is None or dtype not in _ACT_TYPES or params[0].size != 1 or params[1].size != 1:
        return None
    return int(params[1].reshape(())), float(params[0].reshape(())), dtype


def _weight(dq: ir.Node, axis_len: int, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weight, float32 scale per output channel) of a symmetric int8 weight DequantizeLinear."""
    w = const_array(dq.inputs[0])
    params = _qparams(dq)
    if w is None or params is None or w.dtype != np.int8 or np.any(params[1] != 0):
        return None
    scale = params[0].reshape(-1)
    if scale.size > 1:
        if dq.attributes.get_int("axis", 1) % w.ndim != axis or scale.size != axis_len:
            return None
    return w, np.broadcast_to(scale, (axis_len,)).astype(np.float32)


def _bias(value: ir.Value | None, x_scale: float, w_scale: np.ndarray) -> np.ndarray | None:
    """The int32 bias of a DequantizeLinear(int32 b, s_x·s_w, 0), zeros when there is none."""
    if value is None:
        return np.zeros(w_scale.shape, np.int32)
    dq = _node(value, "DequantizeLinear")
    if dq is None:
        return None
    b, params = const_array(dq.inputs[0]), _qparams(dq)
    if b is None or params is None or b.dtype != np.int32 or np.any(params[1] != 0) or b.shape != w_scale.shape:
        return None
    expected = np.float32(x_scale) * w_scale
    if not np.allclose(np.broadcast_to(params[0].reshape(-1), expected.shape), expected, rtol=1e-5, atol=0):
        return None
    return b


def _output(op: ir.Node) -> tuple[ir.Node, list[ir.Node], float, float] | None:
    """(QuantizeLinear, nodes between, lowest, highest float value kept) after ``op``."""
    between, value, lo, hi = [], op.outputs[0], -np.inf, np.inf
    while True:
        consumer = only_consumer(value)
        if consumer is None or consumer.domain not in _STD:
            return None
        if consumer.op_type == "QuantizeLinear":
            return consumer, between, lo, hi
        if consumer.op_type == "Relu":
            lo = max(lo, 0.0)
        elif consumer.op_type == "Clip":
            bounds = [const_array(v) if v is not None else None for v in list(consumer.inputs[1:3]) + [None] * 2][:2]
            if len(consumer.inputs) > 1 and any(v is not None and b is None for v, b in zip(consumer.inputs[1:3], bounds)):
                return None
            lo = max(lo, float(bounds[0]) if bounds[0] is not None else consumer.attributes.get_float("min", -np.inf))
            hi = min(hi, float(bounds[1]) if bounds[1] is not None else consumer.attributes.get_float("max", np.inf))
        else:
            return None
        between.append(consumer)
        value = consumer.outputs[0]


def _quantized(v: float, scale: float, zp: int, lo: int, hi: int) -> int:
    if not np.isfinite(v):
        return lo if v < 0 else hi
    return int(np.clip(np.round(np.float32(v) / np.float32(scale)) + zp, lo, hi))


def _match(node: ir.Node):
    """The integer form of ``node`` (a Conv, MatMul or Gemm) in its QDQ group, or None."""
    if node.op_type == "Conv":
        w_value, b_value, axis = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None), 0
    elif node.op_type == "MatMul":
        w_value, b_value, axis = node.inputs[1], None, 1
    elif node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return None
        w_value, b_value, axis = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None), \
            0 if attrs.get_int("transB", 0) else 1
    else:
        return None
    x_dq, w_dq = _node(node.inputs[0], "DequantizeLinear"), _node(w_value, "DequantizeLinear")
    if x_dq is None or w_dq is None or w_dq.inputs[0].shape is None:
        return None
    w_shape = tuple(w_dq.inputs[0].shape)
    if node.op_type == "Conv" and len(w_shape) != 4 or node.op_type != "Conv" and len(w_shape) != 2:
        return None
    x_rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 0
    if node.op_type == "Conv" and x_rank != 4 or node.op_type != "Conv" and x_rank < 2:
        return None
    act, weight = _activation(x_dq, x_dq.inputs[0]), _weight(w_dq, int(w_shape[axis]), axis)
    out = _output(node)
    if act is None or weight is None or out is None:
        return None
    q, between, lo, hi = out
    y = _activation(q, q.outputs[0])
    if y is None:
        return None
    x_zp, x_scale, _ = act
    w, w_scale = weight
    bias = _bias(b_value, x_scale, w_scale)
    if bias is None:
        return None
    y_zp, y_scale, y_type = y
    tmin, tmax = _ACT_TYPES[y_type]
    qmin, qmax = _quantized(lo, y_scale, y_zp, tmin, tmax), _quantized(hi, y_scale, y_zp, tmin, tmax)
    multiplier = (np.float32(x_scale) * w_scale / np.float32(y_scale)).astype(np.float32)
    if node.op_type == "Gemm" and axis == 0:
        w = np.ascontiguousarray(w.T)  # QGemm's weight is [K, N]
    return {"x": x_dq.inputs[0], "w": w, "bias": bias, "multiplier": multiplier, "q": q, "between": between,
            "attrs": {"x_zero_point": x_zp, "y_zero_point": y_zp, "qmin": qmin, "qmax": qmax}}


def _rewrite(graph, node: ir.Node, m: dict) -> None:
    name = node.name or node.outputs[0].name or "q"
    inputs = [m["x"]] + [new_const(graph, m[k], f"{name}_{k}", node) for k in ("w", "bias", "multiplier")]
    attrs = dict(m["attrs"])
    if node.op_type == "Conv":
        attrs.update({k: a.value for k, a in node.attributes.items()})
    fused = ir.node("QConv" if node.op_type == "Conv" else "QGemm", inputs, attrs, domain=GRAPHOPT_DOMAIN,
                    name=f"{name}_int8")
    graph.insert_before(node, fused)
    out, q_out = fused.outputs[0], m["q"].outputs[0]
    out.dtype, out.shape = q_out.dtype, q_out.shape
    replace_value(q_out, out)
    for dead in [m["q"], *reversed(m["between"]), node]:
        graph.remove(dead, safe=True)


def fuse_qdq(model: ir.Model) -> int:
    """Rewrite every matching QDQ group of ``model`` (in place); returns how many. DequantizeLinear
    nodes left without users are removed."""
    count = 0
    for graph in graphs_of(model):
        if not isinstance(graph, ir.Graph):
            continue
        for node in list(graph):
            if node.domain in _STD and node.op_type in ("Conv", "MatMul", "Gemm"):
                m = _match(node)
                if m is not None:
                    _rewrite(graph, node, m)
                    count += 1
        if count:
            for node in reversed(list(graph)):
                if node.op_type == "DequantizeLinear" and node.domain in _STD and not any(
                        o.uses() or o.is_graph_output() for o in node.outputs):
                    inputs = [v for v in node.inputs if v is not None]
                    graph.remove(node, safe=True)
                    drop_unused_constants(graph, inputs)
    if count:
        model.opset_imports[GRAPHOPT_DOMAIN] = 1
    return count

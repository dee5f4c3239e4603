"""Dynamic int8 quantization with standard ONNX ops (no calibration).

* ``MatMul(x, W)`` and ``Gemm(x, W[, C])`` with a constant rank-2 weight become
  ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp) -> Cast -> Mul(x_scale * w_scale)``
  (``[+ beta·C]``): the activation is quantized to uint8 at run time with its own range, the weight
  is int8 symmetric per output column.
* LSTM, GRU and RNN weights (``W``, ``R``) are stored int8 per row (gate unit) and read through a
  ``DequantizeLinear``: standard ONNX has no integer recurrent op, so the recurrence computes in float.
* Gemm with ``transA`` and nodes named or typed in ``exclude`` stay float.
Needs opset 11 (DynamicQuantizeLinear); the model's opset is raised when that is exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import UnsupportedError
from graphopt.passes import quant_utils as qu
from graphopt.passes.quantize_qdq import _Builder
from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, replace_value

RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
FLOAT = ir.DataType.FLOAT


def _candidate(node: ir.Node, exclude: frozenset[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.name in exclude or node.op_type in exclude:
        return False
    if node.op_type in RECURRENT:
        return any(const_array(node.inputs[i]) is not None for i in (1, 2) if i < len(node.inputs))
    if node.op_type not in ("MatMul", "Gemm") or node.inputs[0] is None or node.inputs[0].dtype != FLOAT:
        return False
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32 or const_array(node.inputs[0]) is not None:
        return False
    return node.op_type == "MatMul" or not node.attributes.get_int("transA", 0)


def dynamic_layers(model: ir.Model, exclude: Iterable[str] = ()) -> list[ir.Node]:
    exclude = frozenset(exclude)
    return [n for n in model.graph if _candidate(n, exclude)]


class QuantizeDynamicPass(ir.passes.InPlacePass):
    """MatMul/Gemm as DynamicQuantizeLinear + MatMulInteger (int8 weights); LSTM/GRU weights stored int8."""

    def __init__(self, *, exclude: Iterable[str] = (), per_channel: bool = True):
        super().__init__()
        self.exclude = frozenset(exclude)
        self.per_channel = per_channel
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = dynamic_layers(model, self.exclude)
        self.quantized = []
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        opset, why = qu.prepare_opset(model, per_channel=True)
        matmuls = [n for n in layers if n.op_type not in RECURRENT]
        if opset < 11 and matmuls:
            raise UnsupportedError(f"int8-dynamic: node {matmuls[0].name or matmuls[0].op_type} needs opset 11 "
                                   f"(DynamicQuantizeLinear); the model is at opset {opset} and cannot be upgraded "
                                   f"exactly: {'; '.join(why[:2])}")
        b = _Builder(model.graph)
        for node in layers:
            if node.op_type in RECURRENT:
                self._recurrent(model.graph, b, node, opset)
            else:
                self._matmul(model.graph, b, node)
            self.quantized.append(node.name)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def _matmul(self, graph: ir.Graph, b: _Builder, node: ir.Node) -> None:
        x, w_value = node.inputs[0], node.inputs[1]
        w = const_array(w_value)
        alpha, beta = 1.0, 1.0
        if node.op_type == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            if node.attributes.get_int("transB", 0):
                w = w.T
        wq, ws = qu.quantize_weight(w, 1 if self.per_channel else None)
        name = node.name or node.outputs[0].name
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=b.name(f"{name}_DynamicQuantizeLinear"))
        xq, xs, xzp = dql.outputs
        for v, suffix, dtype in ((xq, "quantized", ir.DataType.UINT8), (xs, "scale", FLOAT),
                                 (xzp, "zero_point", ir.DataType.UINT8)):
            v.name, v.type = b.name(f"{x.name}_{suffix}"), ir.TensorType(dtype)
        xq.shape = x.shape
        mmi = ir.node("MatMulInteger", [xq, b.const(wq, f"{w_value.name}_quantized"), xzp],
                      name=b.name(f"{name}_MatMulInteger"))
        cast = ir.node("Cast", [mmi.outputs[0]], {"to": FLOAT}, name=b.name(f"{name}_Cast"))
        scale = ir.node("Mul", [xs, b.const((ws * alpha).astype(np.float32), f"{w_value.name}_scale")],
                        name=b.name(f"{name}_scale"))
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=b.name(f"{name}_rescale"))
        new = [dql, mmi, cast, scale, out]
        for n in new:
            n.outputs[0].name = n.outputs[0].name or b.name(f"{n.name}_out")
        mmi.outputs[0].type = ir.TensorType(ir.DataType.INT32)
        cast.outputs[0].type = scale.outputs[0].type = out.outputs[0].type = ir.TensorType(FLOAT)
        result = out.outputs[0]
        c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if c is not None:
            if beta != 1.0:
                cb = const_array(c)
                if cb is None:
                    c = ir.node("Mul", [c, b.const(np.array(beta, np.float32), f"{name}_beta")])
                    new.append(c)
                    c = c.outputs[0]
                else:
                    c = b.const((cb * beta).astype(np.float32), f"{name}_bias")
            add = ir.node("Add", [result, c], name=b.name(f"{name}_bias_add"))
            add.outputs[0].type = ir.TensorType(FLOAT)
            new.append(add)
            result = add.outputs[0]
        graph.insert_before(node, new)
        replace_value(node.outputs[0], result)
        graph.remove(node, safe=True)
        drop_unused_constants(graph, [w_value, *(node_input for node_input in node.inputs[2:3] if node_input)])

    def _recurrent(self, graph: ir.Graph, b: _Builder, node: ir.Node, opset: int) -> None:
        for i in (1, 2):
            w_value = node.inputs[i]
            w = const_array(w_value)
            if w is None or w.dtype != np.float32:
                continue
            axis = 1 if self.per_channel and opset >= qu.PER_CHANNEL_OPSET else None
            wq, ws = qu.quantize_weight(w, axis)
            base = w_value.name or f"{node.name}_w{i}"
            dq = b.dequantize(b.const(wq, f"{base}_quantized"), b.const(ws, f"{base}_scale"),
                              b.const(np.zeros_like(ws, dtype=np.int8), f"{base}_zero_point"), axis, base,
                              ir.Shape(w.shape))
            graph.insert_before(node, dq)
            node.replace_input_with(i, dq.outputs[0])
            drop_unused_constants(graph, [w_value])

"""Static int8 quantization: QuantizeLinear -> DequantizeLinear pairs around the layers, from
calibrated activation ranges (ONNX Runtime's ``quantize_static`` QDQ layout, per-channel).

* Layers: Conv, ConvTranspose, MatMul and Gemm (weights int8 symmetric per output channel, a
  ``DequantizeLinear`` with ``axis`` and zero point 0; a constant bias as int32 with scale
  ``s_x * s_w``), and Add/Sum of two activations of the same shape (residual adds).
* Activations: every float input of a layer and its output get one Q -> DQ pair (per tensor,
  shared by all consumers). A Relu or Clip that alone consumes a Conv/Gemm/MatMul output is part of
  the layer: the pair goes after the activation.
* Ops exact in int8 (``SHARE_SCALE``: Relu, MaxPool, Reshape, Transpose, Resize nearest, Slice,
  Concat...) next to a quantized tensor get pairs on their data input and outputs with one shared
  scale (the union of the members' ranges), so ``DQ -> op -> Q`` is exact in integers.
* Graph outputs stay float; nodes named or typed in ``exclude`` stay float.
* Opset: raised to 13 for per-channel weights (:func:`quant_utils.prepare_opset`); where that is not
  exact the weights are per tensor (opset 10-12). Nothing is emitted that the opset does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError, UnsupportedError
from graphopt.passes import quant_utils as qu
from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, static_shape

LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
RESIDUAL = frozenset({"Add", "Sum"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
SHARE_SCALE = frozenset({"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                         "Slice", "Resize", "Concat", "Split", "DepthToSpace", "SpaceToDepth", "Identity",
                         "GlobalMaxPool"})
FLOAT = ir.DataType.FLOAT


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and v.dtype == FLOAT and const_array(v) is None


def _weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
    """Output-channel axis of a layer's constant weight, or None when only per-tensor fits."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1


def _data_inputs(node: ir.Node) -> list[int]:
    if node.op_type in ("Conv", "ConvTranspose"):
        return [0]
    if node.op_type in ("MatMul", "Gemm"):
        return [i for i in (0, 1) if _is_float(node.inputs[i])]
    return list(range(len(node.inputs)))


def _shares(node: ir.Node) -> bool:
    if node.op_type not in SHARE_SCALE or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Resize":
        return node.attributes.get_string("mode", "nearest") == "nearest"
    return True


@dataclasses.dataclass
class Plan:
    """Which layers are quantized and which tensors get Q -> DQ, with the groups sharing a scale."""

    layers: list[ir.Node]
    tensors: dict[str, ir.Value]
    parent: dict[str, str]
    fused: set[int] = dataclasses.field(default_factory=set)  # ids of activations fused into a layer

    def group(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.group(a)] = self.group(b)


def _excluded(node: ir.Node, exclude: frozenset[str]) -> bool:
    return node.name in exclude or node.op_type in exclude


def _is_residual(node: ir.Node) -> bool:
    if node.op_type not in RESIDUAL or len(node.inputs) != 2 or not all(_is_float(v) for v in node.inputs):
        return False
    a, b = (static_shape(v) for v in node.inputs)
    return a is not None and a == b


def plan(model: ir.Model, exclude: Iterable[str] = ()) -> Plan:
    """The quantization plan of the main graph (deterministic: calibration and insertion agree)."""
    exclude = frozenset(exclude)
    p = Plan([], {}, {})

    def add(v: ir.Value | None) -> None:
        if v is not None and v.dtype == FLOAT and const_array(v) is None and v.name not in p.tensors:
            p.tensors[v.name] = v
            p.parent[v.name] = v.name

    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or _excluded(node, exclude):
            continue
        if node.op_type in LAYERS and _is_float(node.inputs[0]):
            if node.op_type != "MatMul" and (len(node.inputs) < 2 or const_array(node.inputs[1]) is None):
                continue  # a Conv/Gemm with a computed weight stays float
            p.layers.append(node)
            for i in _data_inputs(node):
                add(node.inputs[i])
            out = node.outputs[0]
            uses = out.uses()
            if (len(uses) == 1 and not out.is_graph_output() and uses[0].node.op_type in FUSED_ACTIVATIONS
                    and not _excluded(uses[0].node, exclude)):
                out = uses[0].node.outputs[0]
                p.fused.add(id(uses[0].node))
            if not out.is_graph_output():
                add(out)
        elif _is_residual(node):
            p.layers.append(node)
            for v in node.inputs:
                add(v)
            if not node.outputs[0].is_graph_output():
                add(node.outputs[0])
    _share_scales(model, p, exclude)
    return p


def _share_scales(model: ir.Model, p: Plan, exclude: frozenset[str]) -> None:
    """Ops exact in int8 next to a quantized tensor: their data input and outputs join one group."""
    changed = True
    while changed:
        changed = False
        for node in model.graph:
            if not _shares(node) or _excluded(node, exclude) or id(node) in p.fused:
                continue
            ins = node.inputs if node.op_type == "Concat" else node.inputs[:1]
            members = [v for v in (*ins, *node.outputs) if v is not None and v.dtype == FLOAT
                       and const_array(v) is None and not v.is_graph_output()]
            if len(members) < 2 or not any(v.name in p.tensors for v in members):
                continue
            if node.op_type == "Concat" and len(members) != len(ins) + 1:
                continue  # a constant or graph-output member cannot share
            before = len(p.tensors)
            for v in members:
                if v.name not in p.tensors:
                    p.tensors[v.name] = v
                    p.parent[v.name] = v.name
            groups = {p.group(v.name) for v in members}
            for v in members[1:]:
                p.union(members[0].name, v.name)
            changed |= len(p.tensors) != before or len(groups) > 1


def calibration_targets(model: ir.Model, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the tensors whose ranges :class:`QuantizeQDQPass` needs."""
    return list(plan(model, exclude).tensors)


class _Builder:
    """Adds initializers and Q/DQ nodes to the main graph with unique names."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.taken = set(graph.initializers) | {v.name for v in graph.inputs}
        self.taken |= {o.name for node in graph for o in node.outputs}

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def const(self, array: np.ndarray, base: str) -> ir.Value:
        name = self.name(base)
        array = np.require(array, requirements="C")  # keeps 0-d scalars 0-d
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.graph.register_initializer(v)
        return v

    def dequantize(self, q: ir.Value, scale: ir.Value, zp: ir.Value, axis: int | None, base: str,
                   shape) -> ir.Node:
        attrs = {"axis": axis} if axis is not None else {}
        node = ir.node("DequantizeLinear", [q, scale, zp], attrs, name=self.name(f"{base}_DequantizeLinear"))
        node.outputs[0].name = self.name(f"{base}_dequantized")
        node.outputs[0].type = ir.TensorType(FLOAT)
        node.outputs[0].shape = shape
        return node


class QuantizeQDQPass(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear around Conv/MatMul/Gemm (int8 per-channel weights, int32 bias)."""

    def __init__(self, ranges: dict[str, tuple[float, float]] | None = None, *, activation_type: str = "uint8",
                 per_channel: bool = True, exclude: Iterable[str] = ()):
        super().__init__()
        if activation_type not in ("uint8", "int8"):
            raise UnsupportedError(f"--activation-type {activation_type}: expected uint8 or int8")
        self.ranges = dict(ranges or {})
        self.activation_type = activation_type
        self.per_channel = per_channel
        self.exclude = frozenset(exclude)
        self.opset_note: list[str] = []
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        p = plan(model, self.exclude)
        if not p.layers:
            return ir.passes.PassResult(model, modified=False)
        covered = {p.group(n) for n in p.tensors if n in self.ranges}
        missing = [n for n in p.tensors if p.group(n) not in covered]
        if missing:  # a tensor may lack a range when another member of its scale group has one
            raise PassError(f"quantize_qdq: no calibrated range for tensor '{missing[0]}'", pass_name="quantize_qdq")
        opset, self.opset_note = qu.prepare_opset(model, per_channel=self.per_channel)
        per_channel = self.per_channel and opset >= qu.PER_CHANNEL_OPSET
        b = _Builder(model.graph)
        params = self._group_params(p, b)
        # Layers left float read the float tensor, not a DequantizeLinear: ONNX Runtime quantizes the
        # float weight of a Conv/Gemm whose input comes from a DequantizeLinear by itself.
        quantized = {id(n) for n in p.layers}
        floats = {id(n) for n in model.graph if n.op_type in LAYERS and id(n) not in quantized}
        for name, v in p.tensors.items():
            self._insert_pair(model.graph, b, v, params[p.group(name)], floats)
        done: dict = {}
        for node in p.layers:
            if node.op_type in LAYERS and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
                self._quantize_weight(model.graph, b, node, params, p, per_channel, done)
        self.quantized = [n.name for n in p.layers]
        return ir.passes.PassResult(model, modified=True)

    def _group_params(self, p: Plan, b: _Builder) -> dict[str, tuple[ir.Value, ir.Value, float]]:
        spans: dict[str, list[float]] = {}
        for name in p.tensors:
            if name not in self.ranges:
                continue
            lo, hi = self.ranges[name]
            span = spans.setdefault(p.group(name), [0.0, 0.0])
            span[0], span[1] = min(span[0], lo), max(span[1], hi)
        out = {}
        for root, (lo, hi) in spans.items():
            scale, zp = qu.activation_params(lo, hi, self.activation_type)
            out[root] = (b.const(scale, f"{root}_scale"), b.const(zp, f"{root}_zero_point"), float(scale))
        return out

    def _insert_pair(self, graph: ir.Graph, b: _Builder, v: ir.Value, param, floats: set[int]) -> None:
        scale, zp, _ = param
        uses = [u for u in v.uses() if id(u.node) not in floats]
        if not uses:
            return
        q = ir.node("QuantizeLinear", [v, scale, zp], name=b.name(f"{v.name}_QuantizeLinear"))
        q.outputs[0].name = b.name(f"{v.name}_quantized")
        q.outputs[0].type = ir.TensorType(zp.dtype)
        q.outputs[0].shape = v.shape
        dq = b.dequantize(q.outputs[0], scale, zp, None, v.name, v.shape)
        producer = v.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(graph.node(0), [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])

    def _quantize_weight(self, graph, b: _Builder, node: ir.Node, params, p: Plan, per_channel: bool,
                         done: dict) -> None:
        w_value = node.inputs[1]
        w = const_array(w_value)
        if w is None or w.dtype != np.float32:
            return
        axis = _weight_axis(node, w) if per_channel else None
        key = (id(w_value), axis)
        if key not in done:  # a weight shared by several layers is stored once
            wq, ws = qu.quantize_weight(w, axis)
            base = w_value.name or f"{node.name}_weight"
            scale_v = b.const(ws, f"{base}_scale")
            zp_v = b.const(np.zeros_like(ws, dtype=np.int8), f"{base}_zero_point")
            dq = b.dequantize(b.const(wq, f"{base}_quantized"), scale_v, zp_v, axis, base, ir.Shape(w.shape))
            graph.insert_before(node, dq)
            done[key] = (dq.outputs[0], ws)
        out, ws = done[key]
        node.replace_input_with(1, out)
        drop_unused_constants(graph, [w_value])
        self._quantize_bias(graph, b, node, params, p, ws, axis)

    def _quantize_bias(self, graph, b: _Builder, node: ir.Node, params, p: Plan, ws: np.ndarray, axis) -> None:
        if len(node.inputs) < 3 or node.inputs[2] is None or node.op_type == "MatMul":
            return
        bias = const_array(node.inputs[2])
        x = node.inputs[0].producer()  # the DequantizeLinear of the activation, when quantized
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or x is None or x.op_type != "DequantizeLinear":
            return
        if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0
                                       or node.attributes.get_float("beta", 1.0) != 1.0):
            return
        channels = bias.shape[0]
        if ws.size not in (1, channels):
            return
        sx = float(const_array(x.inputs[1]))
        scale = (sx * ws).astype(np.float32)  # per channel, or one scale with a per-tensor weight
        base = (b_value := node.inputs[2]).name or f"{node.name}_bias"
        zp = b.const(np.zeros_like(scale, dtype=np.int32), f"{base}_zero_point")
        dq = b.dequantize(b.const(qu.quantize_bias(bias, scale), f"{base}_quantized"), b.const(scale, f"{base}_scale"),
                          zp, 0 if scale.ndim else None, base, ir.Shape([channels]))
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        drop_unused_constants(graph, [b_value])

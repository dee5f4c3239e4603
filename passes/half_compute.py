"""The whole graph's compute in fp16, for targets that compute in it (``ConvertWeightsPass(compute="fp16")``).

Every node runs in fp16 ("half") unless it must not:

* its op is in ``COMPUTE_FP32`` (normalizations, large reductions, Exp, Pow, Softmax, Sqrt...) or the
  user's ``keep_float32`` names its op type or node name;
* it is outside the default domain, has a ``dtype`` attribute or a float tensor attribute (other than
  Cast, Constant and ConstantOfShape, which are retargeted), or a float32 slot whose type constraint
  does not allow float16 (from the op's schema at the model's opset);
* a constant it reads would overflow or lose too much in fp16 (``rounding_loss``).

In a half node every float32 slot typed by a constraint that allows float16 becomes float16; slots the
schema fixes to ``tensor(float)`` (Resize's scales) stay float32. A value is stored or computed in the
dtype its producer gives it; where a consumer needs the other one a ``Cast`` is inserted (one per value
and dtype). Graph inputs and outputs keep float32 (Casts after the inputs, before the outputs); a
constant read only by half slots is stored in fp16.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.core.errors import UnsupportedError
from graphopt.passes.rewrite_utils import const_array

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
COMPUTE_FP32 = frozenset(
    """LayerNormalization InstanceNormalization GroupNormalization BatchNormalization RMSNormalization
    LpNormalization ReduceSumSquare ReduceSum ReduceMean ReduceProd ReduceLogSumExp ReduceL2 GlobalAveragePool
    CumSum Exp Log Pow Softmax LogSoftmax Sqrt Reciprocal Range""".split()
)
_RETARGETED = frozenset({"Cast", "Constant", "ConstantOfShape"})


def _half_slots(node: ir.Node, opset: int) -> tuple[list[bool], list[bool]] | None:
    """Per input and output: whether the slot turns float16 in a half node; None if the node cannot be half."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def slots(values, formals):
        out = []
        for i, v in enumerate(values):
            if not formals:
                return None
            formal = formals[min(i, len(formals) - 1)].type_str
            if v is None or v.dtype != F32 or formal == "tensor(float)":
                out.append(False)
            elif "tensor(float16)" in allowed.get(formal, ()):
                out.append(True)
            else:
                return None  # a float32 slot that cannot be float16
        return out

    ins, outs = slots(node.inputs, schema.inputs), slots(node.outputs, schema.outputs)
    return None if ins is None or outs is None else (ins, outs)


def _can_be_half(node: ir.Node, keep: frozenset[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in COMPUTE_FP32 or node.op_type in keep or node.name in keep:
        return False
    if node.op_type in _RETARGETED:
        return node.op_type != "Constant" or "value" in node.attributes
    return all(name != "dtype" and not (a.type == ir.AttributeType.TENSOR and a.as_tensor().dtype == F32)
               for name, a in node.attributes.items())


def convert_compute(model: ir.Model, keep: frozenset[str], weight_ok: Callable[[np.ndarray], bool]) -> list[str]:
    """Rewrite the main graph to compute in fp16 (see the module docstring); returns the constants stored fp16."""
    graph = model.graph
    if any(True for _ in graph.subgraphs()) or model.functions:
        raise UnsupportedError("compute fp16: models with subgraphs (If/Loop/Scan) or local functions are not supported")
    if any(o.dtype is None for n in graph for o in n.outputs):
        ShapeInferencePass()(model)
    untyped = [o.name for n in graph for o in n.outputs if o.dtype is None]
    if untyped:
        raise UnsupportedError(f"compute fp16 needs every value's dtype; shape inference leaves {untyped[0]} without one")
    opset = model.opset_imports.get("", 1)
    half_nodes: dict[int, list[bool]] = {}  # node -> which outputs turn float16
    slot_needs: dict[tuple[int, int], ir.DataType] = {}  # (node, input index) -> dtype it reads
    for node in graph:
        slots = _half_slots(node, opset) if _can_be_half(node, keep) else None
        value = node.attributes.get("value") if node.op_type in _RETARGETED else None
        constants = [const_array(v) for v, half in zip(node.inputs, slots[0] if slots else ()) if half]
        if value is not None and value.type == ir.AttributeType.TENSOR and value.as_tensor().dtype == F32:
            constants.append(value.as_tensor().numpy())
        if slots is not None and all(weight_ok(a) for a in constants if a is not None):
            half_nodes[id(node)] = slots[1]
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype == F32:
                slot_needs[(id(node), i)] = F16 if slots is not None and id(node) in half_nodes and slots[0][i] else F32
    stored = [v for v in graph.initializers.values()
              if v.dtype == F32 and not v.is_graph_input() and not v.is_graph_output() and v.uses()
              and all(slot_needs.get((id(u), i)) == F16 for u, i in v.uses())]
    carries = {id(v): F16 for v in stored}
    carries.update((id(v), F16) for node in graph if id(node) in half_nodes
                   for v, half in zip(node.outputs, half_nodes[id(node)]) if half)
    _insert_casts(graph, slot_needs, carries)
    for v in stored:
        v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
        v.type = ir.TensorType(F16)
    for node in graph:
        if id(node) in half_nodes:
            for v, half in zip(node.outputs, half_nodes[id(node)]):
                if half:
                    v.type = ir.TensorType(F16)
            _retarget(node)
    return [v.name for v in stored]


def _cast(graph: ir.Graph, v: ir.Value, dtype: ir.DataType) -> ir.Value:
    cast = ir.node("Cast", [v], {"to": dtype}, name=f"{v.name}__to_{dtype.name.lower()}")
    out = cast.outputs[0]
    out.type, out.shape = ir.TensorType(dtype), v.shape
    producer = v.producer()
    if producer is None:
        graph.insert_before(graph.node(0), cast)
    else:
        graph.insert_after(producer, cast)
    return out


def _insert_casts(graph: ir.Graph, slot_needs: dict, carries: dict[int, ir.DataType]) -> None:
    """A Cast where a consumer reads a value in the dtype it does not carry; graph outputs stay float32."""
    casts: dict[tuple[int, ir.DataType], ir.Value] = {}
    values = [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
    for v in values:
        has = carries.get(id(v), v.dtype)
        for user, index in list(v.uses()):
            need = slot_needs.get((id(user), index), has)
            if need != has:
                if (id(v), need) not in casts:
                    casts[(id(v), need)] = _cast(graph, v, need)
                user.replace_input_with(index, casts[(id(v), need)])
        if has == F16 and v.is_graph_output():
            out = _cast(graph, v, F32)
            index = list(graph.outputs).index(v)
            name, v.name = v.name, f"{v.name}__fp16"
            out.name = name
            graph.outputs[index] = out


def _retarget(node: ir.Node) -> None:
    """Cast, Constant and ConstantOfShape produce float16 where they produced float32."""
    if node.op_type == "Cast" and node.attributes.get_int("to") == F32:
        node.attributes["to"] = ir.AttrInt64("to", F16)
    if node.op_type == "ConstantOfShape" and "value" not in node.attributes:  # default: float32 zero
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
    a = node.attributes.get("value")
    if a is not None and a.type == ir.AttributeType.TENSOR and a.as_tensor().dtype == F32:
        t = ir.tensor(a.as_tensor().numpy().astype(np.float16), name=a.as_tensor().name)
        node.attributes["value"] = ir.AttrTensor("value", t)
        if node.op_type == "Constant":
            node.outputs[0].const_value = t

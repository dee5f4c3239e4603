"""Raise a model's default-domain opset, only when every node keeps its exact meaning.

Fusions need newer ops (HardSwish 14, LayerNormalization 17, Mish 18, Gelu 20). Upgrading is
exact for most ops (their later revisions only add types or optional attributes with the old
behaviour as default). A few revisions move an attribute to an input (Squeeze/Unsqueeze/ReduceSum
axes at 13, Split at 13, the other Reduce ops at 18): those are converted. Anything else that
changed between the two opsets (an op not in the tables below, Softmax on a non-last axis,
Dropout's ratio, an op removed since) makes :func:`try_upgrade` refuse and leave the model alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.passes.rewrite_utils import static_shape

MIN_SOURCE_OPSET = 11

# Ops whose revisions after opset 11 only add types or optional attributes/inputs whose default is
# the old behaviour.
TYPE_ONLY = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BitShift Cast Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvInteger ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Det Div Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
    GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LRN LSTM LeakyRelu Less
    LessOrEqual Log Loop LpNormalization LpPool MatMul MatMulInteger Max MaxPool MaxRoiPool MaxUnpool
    Mean Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad Pow QLinearConv
    QLinearMatMul QuantizeLinear RNN Range Reciprocal Relu Reshape Round Scan ScatterElements
    ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softplus Softsign SpaceToDepth Sqrt Sub Sum
    Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unique Where Xor Gelu LayerNormalization Mish
    ReduceMax ReduceMin ReduceMean ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceSumSquare ReduceSum Squeeze Unsqueeze Split Softmax LogSoftmax Hardmax BatchNormalization
    Resize Dropout""".split()
)

_AXES_TO_INPUT = {  # op -> the revision that turned the `axes` (or `split`) attribute into an input
    "Squeeze": (13, "axes"), "Unsqueeze": (13, "axes"), "ReduceSum": (13, "axes"), "Split": (13, "split"),
    **{op: (18, "axes") for op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1",
                                   "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}


def _since(op: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except Exception:
        return None


def _blocker(node: ir.Node, old: int, new: int) -> str | None:
    """Why ``node`` cannot be moved from ``old`` to ``new`` exactly, or None when it can."""
    op = node.op_type
    if _since(op, new) is None or _since(op, old) is None:
        return f"{op} does not exist at both opsets"
    if onnx.defs.get_schema(op, new, "").deprecated:
        return f"{op} is deprecated at opset {new}"
    if _since(op, old) == _since(op, new):
        return None
    if op not in TYPE_ONLY:
        return f"{op} changed between opset {old} and {new}"
    if op in ("Softmax", "LogSoftmax", "Hardmax") and old < 13 <= new:
        shape = static_shape(node.inputs[0])
        axis = node.attributes.get_int("axis", 1)
        if shape is None or axis % max(len(shape), 1) != len(shape) - 1:
            return f"{op} on a non-last axis changes meaning at opset 13"
    if op == "Dropout" and old < 12 <= new and "ratio" in node.attributes:
        return "Dropout ratio became an input at opset 12"
    if op == "BatchNormalization" and len(node.outputs) > 1:
        return "BatchNormalization in training mode"
    if op == "Resize" and node.attributes.get_string("coordinate_transformation_mode", "") == "tf_half_pixel_for_nn":
        return "Resize mode tf_half_pixel_for_nn was removed at opset 13"
    return None


def _convert(node: ir.Node, old: int, new: int, graph) -> None:
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and old < 13 <= new and "axis" not in node.attributes:
        node.attributes["axis"] = ir.AttrInt64("axis", 1)  # the old default; the new one is -1
    spec = _AXES_TO_INPUT.get(node.op_type)
    if spec is None or not old < spec[0] <= new:
        return
    attr = node.attributes.pop(spec[1], None)
    if attr is None:
        return
    values = np.array(attr.as_ints(), dtype=np.int64)
    const = ir.node("Constant", [], {"value": ir.tensor(values)})
    const.outputs[0].const_value = ir.tensor(values)
    const.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    const.outputs[0].shape = ir.Shape([len(values)])
    graph.insert_before(node, const)
    if len(node.inputs) < 2:
        node.resize_inputs(2)
    node.replace_input_with(1, const.outputs[0])


def _graphs(model: ir.Model):
    yield model.graph
    yield from model.graph.subgraphs()


def upgrade_blockers(model: ir.Model, target: int) -> list[str]:
    """Reasons the model cannot be upgraded exactly to ``target`` (empty when it can)."""
    old = model.opset_imports.get("", None)
    if old is None:
        return ["no default-domain opset import"]
    if old >= target:
        return []
    if old < MIN_SOURCE_OPSET:
        return [f"opset {old} is older than {MIN_SOURCE_OPSET}"]
    if target > onnx.defs.onnx_opset_version():
        return [f"opset {target} is unknown to this onnx"]
    if model.functions:
        return ["the model has local functions with their own opset imports"]
    reasons = []
    for graph in _graphs(model):
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            why = _blocker(node, old, target)
            if why:
                reasons.append(f"node {node.name or node.op_type}: {why}")
    return reasons


def try_upgrade(model: ir.Model, target: int) -> bool:
    """Raise the default opset to ``target`` when exact; True when the model is (now) at ``target``."""
    old = model.opset_imports.get("", None)
    if old is not None and old >= target:
        return True
    if upgrade_blockers(model, target):
        return False
    for graph in _graphs(model):
        for node in list(graph):
            if node.domain in ("", "ai.onnx"):
                _convert(node, old, target, graph)
                node.version = None
    model.opset_imports[""] = target
    return True

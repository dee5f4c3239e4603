"""Fuse Conv[+Add]+activation and Gemm+activation into ONNX Runtime's FusedConv and FusedGemm.

Standard ONNX has no op for a convolution or a GEMM followed by its activation, so a graph of
Conv, Relu, MaxPool, Gemm (AlexNet, VGG) is already as small as standard ONNX can write it. ONNX
Runtime has two such ops in its ``com.microsoft`` domain, and its own graph optimizer makes them
when it loads a model; this pass writes them into the file, for models deployed on ONNX Runtime.
It fires only with ``target_runtime="ort"``: with ``"onnx"`` the output keeps to standard ops, and
graphopt's lowering fuses convolutions and activations on its own (``"graphopt"``).

Patterns (every intermediate value feeds only the next node and is not a graph output):

* ``Act(Conv(X, W[, B]))`` -> ``FusedConv(X, W, B, activation=Act, activation_params=...)``;
* ``Act(Add(Conv(X, W[, B]), Z))`` (``Z`` of the conv output's own shape, either operand order;
  a two-input ``Sum`` too)
  -> ``FusedConv(X, W, B, Z, activation=Act)``: ONNX Runtime adds ``Z`` before the activation
  (ResNet's residual Add+Relu);
* ``Act(Concat(Conv_1, ..., Conv_k))``, every conv feeding only the Concat: each conv becomes a
  FusedConv and the activation goes (the cleanup passes moved SqueezeNet's Relus past its Concats,
  which saves a node in standard ONNX; on ONNX Runtime the convs can take them);
* ``Act(Gemm(A, B[, C]))`` -> ``FusedGemm(A, B, C, activation=Act, activation_alpha=...)``, Gemm's
  own attributes kept.

``Act`` is Relu, LeakyRelu, Sigmoid, Tanh, Clip (constant bounds) or HardSigmoid for FusedConv, and
Relu, LeakyRelu, Sigmoid or Tanh for FusedGemm (its kernel takes no second parameter). Node contracts
are ONNX Runtime's (``com.microsoft``, version 1); graphopt's lowering implements both too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.graphopt_ops import check_target_runtime
from graphopt.passes.rewrite_utils import const_array, graphs_of, only_consumer, remove_dead, replace_value, static_shape

ORT_DOMAIN = "com.microsoft"
CONV_ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid")
GEMM_ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh")


def activation_params(act: ir.Node) -> list[float] | None:
    """The activation's parameters as FusedConv's ``activation_params``; None when they are not constant."""
    attrs = act.attributes
    if act.op_type == "LeakyRelu":
        return [attrs.get_float("alpha", 0.01)]
    if act.op_type == "HardSigmoid":
        return [attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)]
    if act.op_type != "Clip":
        return []
    if len(act.inputs) <= 1:  # Clip-6: attributes
        return [attrs.get_float("min", float(np.finfo(np.float32).min)),
                attrs.get_float("max", float(np.finfo(np.float32).max))]
    bounds = []
    for i, default in ((1, np.finfo(np.float32).min), (2, np.finfo(np.float32).max)):
        v = act.inputs[i] if len(act.inputs) > i else None
        arr = const_array(v) if v is not None else np.array(default)
        if arr is None or arr.size != 1:
            return None
        bounds.append(float(arr.reshape(())))
    return bounds


def _is_standard(node: ir.Node | None, ops: tuple[str, ...]) -> bool:
    return node is not None and node.op_type in ops and node.domain in ("", "ai.onnx")


def _float32(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT


def _residual(conv_out: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """``Add(conv_out, Z)`` (or a two-input ``Sum``) with ``Z`` a tensor of the conv output's shape: ``(add, Z)``."""
    add = only_consumer(conv_out)
    if not _is_standard(add, ("Add", "Sum")) or len(add.inputs) != 2:
        return None
    z = add.inputs[1] if add.inputs[0] is conv_out else add.inputs[0]
    shape = static_shape(conv_out)
    if z is None or z is conv_out or shape is None or static_shape(z) != shape or static_shape(add.outputs[0]) != shape:
        return None
    if not _float32(z) or const_array(z) is not None:  # a constant Z is a bias: fuse_bias's job
        return None
    return add, z


def match(node: ir.Node) -> tuple[list[ir.Value | None], ir.Node, list[ir.Node]] | None:
    """For a Conv or Gemm ``node``: (the fused node's inputs, the activation, the nodes it replaces)."""
    conv = node.op_type == "Conv"
    if len(node.outputs) != 1 or not _float32(node.outputs[0]):
        return None
    out, inputs, chain = node.outputs[0], list(node.inputs), [node]
    act = only_consumer(out)
    if conv and act is not None and act.op_type in ("Add", "Sum"):
        residual = _residual(out)
        if residual is None:
            return None
        add, z = residual
        inputs = (inputs + [None] * 3)[:3] + [z]
        chain.append(add)
        act = only_consumer(add.outputs[0])
    allowed = CONV_ACTIVATIONS if conv else GEMM_ACTIVATIONS
    if not _is_standard(act, allowed) or act.inputs[0] is not chain[-1].outputs[0]:
        return None
    if activation_params(act) is None:
        return None
    return inputs, act, [*chain, act]


def _fused_node(node: ir.Node, inputs, act: ir.Node) -> ir.Node:
    """``node`` (Conv or Gemm) with ``act`` folded in, as ONNX Runtime's FusedConv/FusedGemm."""
    conv = node.op_type == "Conv"
    params = activation_params(act)
    attrs = {a.name: a for a in node.attributes.values()}
    attrs["activation"] = ir.AttrString("activation", act.op_type)
    if conv and params:
        attrs["activation_params"] = ir.AttrFloat32s("activation_params", params)
    if not conv and params:
        attrs["activation_alpha"] = ir.AttrFloat32("activation_alpha", params[0])
    return ir.Node(ORT_DOMAIN, "FusedConv" if conv else "FusedGemm", inputs, attributes=list(attrs.values()),
                   version=1)


def concat_of_convs(act: ir.Node) -> tuple[ir.Node, list[ir.Node]] | None:
    """``act`` reads a Concat of convs that feed only it: ``(concat, convs)``."""
    if not _is_standard(act, CONV_ACTIVATIONS) or activation_params(act) is None:
        return None
    concat = act.inputs[0].producer() if act.inputs[0] is not None else None
    if not _is_standard(concat, ("Concat",)) or only_consumer(concat.outputs[0]) is not act:
        return None
    convs = [v.producer() if v is not None else None for v in concat.inputs]
    if not all(_is_standard(c, ("Conv",)) and len(c.outputs) == 1 and _float32(c.outputs[0])
               and only_consumer(c.outputs[0]) is concat for c in convs):
        return None
    if len({id(c) for c in convs}) != len(convs):  # Concat(c, c): one conv, used twice
        return None
    return concat, convs


def _replace(graph, chain: list[ir.Node], new: ir.Node, old: ir.Value) -> None:
    """Put ``new`` where ``old`` (the chain's result) was computed, and drop the chain."""
    graph.insert_before(old.producer(), new)
    new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
    replace_value(old, new.outputs[0])
    remove_dead(graph, chain)


class FuseConvActivationPass(ir.passes.InPlacePass):
    """Fuse Conv[+Add]+activation and Gemm+activation into ONNX Runtime's FusedConv/FusedGemm (target_runtime='ort')."""

    def __init__(self, *, target_runtime: str = "onnx"):
        super().__init__()
        self.target_runtime = check_target_runtime(target_runtime, "pass 'fuse_conv_activation'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.target_runtime != "ort":
            return ir.passes.PassResult(model, modified=False)
        fused = 0
        for graph in list(graphs_of(model)):
            if isinstance(graph, ir.Function):
                continue  # a function's opset imports are its own; leave them as they are
            for node in list(graph):
                if node.graph is None:
                    continue  # removed by an earlier match
                if _is_standard(node, ("Conv", "Gemm")) and (found := match(node)) is not None:
                    inputs, act, chain = found
                    _replace(graph, chain, _fused_node(node, inputs, act), act.outputs[0])
                    fused += 1
                elif (hit := concat_of_convs(node)) is not None:
                    concat, convs = hit
                    for conv in convs:
                        _replace(graph, [conv], _fused_node(conv, list(conv.inputs), node), conv.outputs[0])
                    replace_value(node.outputs[0], concat.outputs[0])
                    remove_dead(graph, [node])
                    fused += len(convs)
        if fused:
            model.opset_imports[ORT_DOMAIN] = 1
        return ir.passes.PassResult(model, modified=fused > 0)

"""Fuse a constant per-channel bias (and scale) into the op before it.

* ``Add(Conv(x, W[, B]), c)`` (or ConvTranspose) -> ``Conv(x, W, B + c)`` when ``c`` is constant and
  broadcasting it over the output adds one value per output channel (shapes ``[C,1,1]``,
  ``[1,C,1,1]``, a scalar...), never changing the output's shape or dtype.
* ``Mul(Conv(x, W[, B]), s)`` -> ``Conv(x, W·s, B·s)`` for a per-channel constant ``s`` (Conv only).
* ``Mul(BatchNormalization(x, γ, β, μ, σ²), s)`` -> ``BatchNormalization(x, γ·s, β·s, μ, σ²)`` and
  ``Add(BatchNormalization(...), c)`` -> ``β + c`` (inference BN with one output and constant params).
  A chain Conv/BN -> Mul -> Add folds completely, one step after the other.
* ``Add(MatMul(x, W), c)`` -> ``Gemm(x, W, c)`` when ``x`` is rank 2, ``W`` a constant rank-2 weight
  and ``c`` a constant broadcastable to the [M, N] result (``[N]``, ``[1, N]``, ``[M, N]``). Higher
  ranks keep their MatMul (a Gemm would need Reshapes around it).

The Conv/MatMul output must feed only that Add. Each rule says in ``_why_not`` why it did not fire.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import (
    const_array,
    graphs_of,
    home,
    new_const,
    only_consumer,
    remove_dead,
    replace_value,
    static_shape,
)


def _set_const_input(graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    """Point input ``index`` at a new constant; the old one's producer goes when nothing else reads it."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new_const(graph, array, name, node))
    producer = old.producer() if old is not None else None
    if producer is not None:
        remove_dead(graph, [producer])


def _bias_operand(add: ir.Node, value: ir.Value) -> np.ndarray | None:
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    if add.inputs[0] is add.inputs[1]:
        return None
    return const_array(other)


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a [channels] vector when broadcasting it over [N, C, ...] adds one value per channel."""
    if c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)) if c.size in (1, channels) else None


def _fuse_conv(graph, conv: ir.Node, add: ir.Node) -> str | None:
    """Returns None when fused, else why not."""
    y = conv.outputs[0]
    weight = const_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    c = _bias_operand(add, y)
    rank = len(y.shape) if y.shape is not None else (weight.ndim if weight is not None else None)
    if weight is None or c is None or rank is None:
        return "weight or bias is not constant, or the output rank is unknown"
    group = conv.attributes.get_int("group", 1)
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * group
    vec = _per_channel(c, rank, channels)
    if vec is None:
        return f"bias of shape {c.shape} is not one value per output channel"
    if y.dtype is None or ir.DataType.from_numpy(c.dtype) != y.dtype:
        return "bias dtype differs from the Conv output"
    old = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and old is None:
        return "the existing Conv bias is not constant"
    total = (vec if old is None else old + vec).astype(c.dtype)
    _set_const_input(graph, conv, 2, total, f"{conv.name or 'conv'}_bias")
    replace_value(add.outputs[0], y)
    graph.remove(add, safe=True)
    return None


def _fuse_conv_scale(graph, conv: ir.Node, mul: ir.Node) -> str | None:
    y = conv.outputs[0]
    weight = const_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    c = _bias_operand(mul, y)
    rank = len(y.shape) if y.shape is not None else None
    if weight is None or c is None or rank is None:
        return "weight or scale is not constant, or the output rank is unknown"
    vec = _per_channel(c, rank, weight.shape[0])
    if vec is None or y.dtype is None or ir.DataType.from_numpy(c.dtype) != y.dtype:
        return f"scale of shape {c.shape} is not one value per output channel of the same dtype"
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    old = const_array(conv.inputs[2]) if has_bias else None
    if has_bias and old is None:
        return "the existing Conv bias is not constant"
    scaled = (weight * vec.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
    _set_const_input(graph, conv, 1, scaled, f"{conv.name or 'conv'}_weight")
    if has_bias:
        _set_const_input(graph, conv, 2, (old * vec).astype(old.dtype), f"{conv.name or 'conv'}_bias")
    replace_value(mul.outputs[0], y)
    graph.remove(mul, safe=True)
    return None


def _fuse_bn_affine(graph, bn: ir.Node, op: ir.Node) -> str | None:
    y = bn.outputs[0]
    if len(bn.outputs) != 1 or len(bn.inputs) != 5:
        return "BatchNormalization with training outputs"
    gamma, beta = const_array(bn.inputs[1]), const_array(bn.inputs[2])
    c = _bias_operand(op, y)
    rank = len(y.shape) if y.shape is not None else None
    if gamma is None or beta is None or c is None or rank is None:
        return "parameters or operand are not constant, or the rank is unknown"
    vec = _per_channel(c, rank, gamma.shape[0])
    if vec is None or y.dtype is None or ir.DataType.from_numpy(c.dtype) != y.dtype:
        return f"operand of shape {c.shape} is not one value per channel of the same dtype"
    if op.op_type == "Mul":
        _set_const_input(graph, bn, 1, (gamma * vec).astype(gamma.dtype), f"{bn.name or 'bn'}_scale")
        beta = beta * vec
    else:
        beta = beta + vec
    _set_const_input(graph, bn, 2, beta.astype(gamma.dtype), f"{bn.name or 'bn'}_bias")
    replace_value(op.outputs[0], y)
    graph.remove(op, safe=True)
    return None


def _fuse_matmul(graph, matmul: ir.Node, add: ir.Node) -> str | None:
    x, w = matmul.inputs[0], matmul.inputs[1]
    y = matmul.outputs[0]
    weight, c = const_array(w), _bias_operand(add, y)
    xs = static_shape(x)
    if xs is None or len(xs) != 2:
        return "MatMul input is not a static rank-2 tensor"
    if weight is None or weight.ndim != 2 or c is None:
        return "weight is not a constant rank-2 tensor or the bias is not constant"
    out = (xs[0], weight.shape[1])
    if c.ndim > 2 or np.broadcast_shapes(c.shape, out) != out:
        return f"bias of shape {c.shape} does not broadcast onto {out}"
    if y.dtype is None or ir.DataType.from_numpy(c.dtype) != y.dtype:
        return "bias dtype differs from the MatMul output"
    bias = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    gemm = ir.node("Gemm", [x, w, bias], name=matmul.name)
    graph.insert_before(matmul, gemm)
    gemm.outputs[0].shape = add.outputs[0].shape or ir.Shape(out)
    gemm.outputs[0].type = add.outputs[0].type or y.type
    replace_value(add.outputs[0], gemm.outputs[0])
    graph.remove(add, safe=True)
    graph.remove(matmul, safe=True)
    return None


RULES = {
    ("Conv", "Add"): _fuse_conv,
    ("ConvTranspose", "Add"): _fuse_conv,
    ("Conv", "Mul"): _fuse_conv_scale,
    ("BatchNormalization", "Mul"): _fuse_bn_affine,
    ("BatchNormalization", "Add"): _fuse_bn_affine,
    ("MatMul", "Add"): _fuse_matmul,
}
PRODUCERS = frozenset(p for p, _ in RULES)


class FuseBiasPass(ir.passes.InPlacePass):
    """Fuse per-channel Add/Mul constants into Conv and BatchNormalization, rank-2 MatMul+Add into Gemm."""

    def __init__(self, *, gemm: bool = True):
        super().__init__()
        self.gemm = gemm
        self.skipped: list[str] = []

    def _fold_all(self, graph, node: ir.Node) -> int:
        fused = 0
        while node.graph is home(graph):
            nxt = only_consumer(node.outputs[0])
            rule = RULES.get((node.op_type, nxt.op_type)) if nxt is not None else None
            if rule is None or nxt.domain not in ("", "ai.onnx") or (node.op_type == "MatMul" and not self.gemm):
                return fused
            if nxt.outputs[0].is_graph_output() and node.outputs[0].is_graph_input():
                return fused
            why = rule(graph, node, nxt)
            if why is not None:
                self.skipped.append(f"{node.op_type} {node.name}: {why}")
                return fused
            fused += 1
        return fused

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = 0
        self.skipped = []
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.op_type in PRODUCERS and node.domain in ("", "ai.onnx") and node.graph is home(graph):
                    fused += self._fold_all(graph, node)
        return ir.passes.PassResult(model, modified=fused > 0)

"""Fold inference BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul before it.

``BN(y) = (y - mean) * s + B`` with ``s = scale / sqrt(var + eps)`` is affine per channel (axis 1),
so when ``y = W x + b`` is linear per output channel, BN folds into new weights and bias:
``W' = W * s`` (along the weight's output-channel axis) and ``b' = (b - mean) * s + B``.

Producers (table ``_PRODUCERS``), each with the weight axis that carries output channels:

* ``Conv``: W is ``[C_out, C_in/group, k...]``, axis 0; a missing bias becomes an input.
* ``ConvTranspose``: W is ``[C_in, C_out/group, k...]``: output channel ``g*C_out/group + j`` lives
  on axis 1 within group ``g`` (the weight is viewed as ``[group, C_in/group, C_out/group, k...]``).
* ``Gemm``: channel axis 0 of B when ``transB``, else 1; ``beta * C`` is folded into a new C (beta=1).
* ``MatMul`` with a constant 2-D weight and a 2-D output (so BN's axis 1 is the MatMul's last axis),
  optionally followed by ``Add`` of a constant bias; without one, an ``Add`` is created.

The rule fires only when BN's parameters are constant, BN is in inference form (``training_mode``
absent or 0, only the first output used), the producer's weights (and bias) are constant, and every
intermediate value has BN as its only consumer and is no graph output. Shared weights are left
untouched: the folded weights are new initializers.

A BatchNormalization after anything else (or whose producer is shared) is left as it is: turning it
into Mul+Add gains nothing over BatchNormalization itself for the backends. ``last_skipped`` says why
each BatchNormalization was not folded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import (
    const_array,
    drop_unused_constants,
    graphs_of,
    new_const,
    only_consumer,
    replace_value,
)


@dataclasses.dataclass
class _Match:
    bn: ir.Node
    producer: ir.Node
    bias_add: ir.Node | None  # MatMul → Add(bias) → BN
    weight: np.ndarray
    bias: np.ndarray | None  # as applied (Gemm's beta already multiplied in)


def _bn_params(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) with BN(y) = y * s + t along axis 1, or why not."""
    if bn.attributes.get_int("training_mode", 0):
        return "training_mode=1"
    if bn.attributes.get_int("spatial", 1) != 1:
        return "spatial=0 (opset < 9 per-activation form)"
    if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return "running mean/var outputs are used"
    params = [const_array(v) for v in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "scale/B/mean/var are not all constant"
    scale, b, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    s = scale / np.sqrt(var + eps)
    return s, b - mean * s


def _conv_scale(w: np.ndarray, s: np.ndarray, node: ir.Node) -> np.ndarray | None:
    if w.shape[0] != s.size:
        return None
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def _conv_transpose_scale(w: np.ndarray, s: np.ndarray, node: ir.Node) -> np.ndarray | None:
    group = node.attributes.get_int("group", 1)
    c_in, c_out_g = w.shape[0], w.shape[1]
    if c_in % group or c_out_g * group != s.size:
        return None
    kernel = w.shape[2:]
    view = w.reshape((group, c_in // group, c_out_g) + kernel)
    return (view * s.reshape((group, 1, c_out_g) + (1,) * len(kernel))).reshape(w.shape)


def _gemm_scale(w: np.ndarray, s: np.ndarray, node: ir.Node) -> np.ndarray | None:
    if w.ndim != 2:
        return None
    if node.attributes.get_int("transB", 0):
        return w * s[:, None] if w.shape[0] == s.size else None
    return w * s[None, :] if w.shape[1] == s.size else None


def _matmul_scale(w: np.ndarray, s: np.ndarray, node: ir.Node) -> np.ndarray | None:
    if w.ndim != 2 or w.shape[1] != s.size:
        return None
    out, x = node.outputs[0].shape, node.inputs[0].shape
    rank = len(out) if out is not None else (len(x) if x is not None else None)
    if rank != 2:  # BN's channel axis 1 must be the MatMul's last axis
        return None
    return w * s[None, :]


# op -> (weight scaling, bias input index or None when the bias is a following Add)
_PRODUCERS = {
    "Conv": (_conv_scale, 2),
    "ConvTranspose": (_conv_transpose_scale, 2),
    "Gemm": (_gemm_scale, 2),
    "MatMul": (_matmul_scale, None),
}


def _match(bn: ir.Node) -> _Match | str:
    x = bn.inputs[0]
    producer, bias_add = x.producer(), None
    if producer is not None and producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        mm = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        bias = const_array(producer.inputs[1])
        if mm is not None and mm.op_type == "MatMul" and bias is not None and bias.ndim <= 2:
            bias_add, producer = producer, mm
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in _PRODUCERS:
        return f"input is not produced by one of {sorted(_PRODUCERS)}"
    if producer.graph is not bn.graph:
        return "producer is in an enclosing graph"
    chain = [producer.outputs[0]] + ([bias_add.outputs[0]] if bias_add else [])
    if any(only_consumer(v) is None for v in chain):
        return f"{producer.op_type} output has other consumers or is a graph output"
    weight = const_array(producer.inputs[1])
    if weight is None:
        return f"{producer.op_type} weight is not constant"
    bias_index = _PRODUCERS[producer.op_type][1]
    bias = None
    if bias_add is not None:
        bias = const_array(bias_add.inputs[1])
    elif bias_index is not None and len(producer.inputs) > bias_index and producer.inputs[bias_index] is not None:
        bias = const_array(producer.inputs[bias_index])
        if bias is None:
            return f"{producer.op_type} bias is not constant"
        if producer.op_type == "Gemm":
            bias = bias * producer.attributes.get_float("beta", 1.0)
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{producer.op_type} weight is not floating point"
    return _Match(bn, producer, bias_add, weight, bias)


def _fold(graph: ir.Graph | ir.Function, m: _Match, s: np.ndarray, t: np.ndarray) -> bool:
    scale_fn, bias_index = _PRODUCERS[m.producer.op_type]
    w = scale_fn(m.weight.astype(np.float64), s, m.producer)
    if w is None:
        return False
    bias = t if m.bias is None else m.bias.astype(np.float64) * s + t
    dtype = m.weight.dtype
    base = m.producer.name or m.bn.name or "bn"
    new_w = new_const(graph, w.astype(dtype), f"{base}_bn_weight", m.producer)
    new_b = new_const(graph, bias.astype(dtype), f"{base}_bn_bias", m.producer)
    old_inputs = [v for v in m.producer.inputs[1:] if v is not None]
    m.producer.replace_input_with(1, new_w)
    if m.bias_add is not None:
        m.bias_add.replace_input_with(1, new_b)
        out = m.bias_add.outputs[0]
        old_inputs.append(m.bias_add.inputs[1])
    elif bias_index is not None:
        if len(m.producer.inputs) <= bias_index:
            m.producer.resize_inputs(bias_index + 1)
        m.producer.replace_input_with(bias_index, new_b)
        if m.producer.op_type == "Gemm" and "beta" in m.producer.attributes:
            m.producer.attributes.pop("beta")
        out = m.producer.outputs[0]
    else:  # MatMul without bias: add one
        add = ir.node("Add", [m.producer.outputs[0], new_b], name=f"{base}_bn_add")
        graph.insert_after(m.producer, add)
        out = add.outputs[0]
        out.type, out.shape = m.producer.outputs[0].type, m.producer.outputs[0].shape
    old_inputs.extend(v for v in m.bn.inputs[1:] if v is not None)
    bn_out = m.bn.outputs[0]
    replace_value(bn_out, out)
    graph.remove(m.bn, safe=True)
    drop_unused_constants(graph, old_inputs)
    return True


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.last_skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.last_skipped = {}
        modified = False
        for graph in list(graphs_of(model)):
            for bn in list(graph):
                if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or bn.graph is not graph:
                    continue
                params = _bn_params(bn)
                m = params if isinstance(params, str) else _match(bn)
                if isinstance(m, str):
                    self.last_skipped[bn.name or bn.outputs[0].name] = m
                    continue
                if _fold(graph, m, *params):
                    modified = True
                else:
                    self.last_skipped[bn.name or bn.outputs[0].name] = "weight shape or output rank does not fit BN's channels"
        return ir.passes.PassResult(model, modified)

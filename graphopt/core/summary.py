"""A model's vital statistics for ``graphopt inspect``: opsets, I/O, op histogram, parameters, FLOPs.

FLOPs convention (an estimate for one run, the batch size being what the input shapes say):

* Conv: ``2 * N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)`` (2 per multiply-add),
  plus one per output element for the bias; ConvTranspose the same with the roles of the input and
  output spatial sizes swapped.
* MatMul: ``2 * prod(output) * K``; Gemm: ``2 * M * N * K`` plus ``M * N`` with a C input.
* LSTM / GRU / RNN: ``2 * T * B * dirs * gates * H * (I + H)`` (the gate matrix products).
* Pooling: one per output element per kernel tap (global pooling: one per input element).
* Reductions (Reduce*, ArgMax/ArgMin): one per input element.
* Data movement (Reshape, Transpose, Concat, Gather, Slice, Pad, Cast, Shape, Constant, ...): zero.
* Every other op (elementwise, activations, normalizations, Softmax, Resize, fused graphopt ops):
  one per output element.

``parameters``/``parameter_bytes`` count the initializers and the tensors of Constant nodes (some
exporters store every weight in Constant nodes).

Subgraphs (If branches, Loop/Scan bodies) are counted once each. ``flops`` is ``None`` when some
counted node's shapes are unknown (a dynamic dim: fix it with ``--input-shape``); ``flops_by_op``
then holds only the nodes that could be counted. Shapes come from :func:`graphopt.core.shapes.infer_types`;
the model is never modified.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import onnx_ir as ir


_DATA_MOVEMENT = frozenset(
    "Reshape Transpose Concat Split Gather GatherElements GatherND Slice Pad Cast CastLike Shape Size "
    "Constant ConstantOfShape Identity Squeeze Unsqueeze Flatten Expand Tile DepthToSpace SpaceToDepth "
    "Range NonZero ScatterND ScatterElements Dropout If Loop Scan Optional OptionalGetElement "
    "SequenceAt SequenceConstruct SplitToSequence ConcatFromSequence QuantizeLinear DequantizeLinear".split()
)
_REDUCTIONS = frozenset(
    "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
    "ReduceSumSquare ArgMax ArgMin GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
)
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _prod(dims) -> int:
    return math.prod(int(d) for d in dims)


def _static(shape) -> list[int] | None:
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _conv(node, ins, outs) -> int | None:
    x, w = ins[0], ins[1]
    y = outs[0]
    if x is None or w is None or y is None:
        return None
    kernel = _prod(w[2:])
    bias = _prod(y) if len(ins) > 2 and node.inputs[2] is not None else 0
    if node.op_type == "ConvTranspose":  # every input element scatters into C_out/group * kernel outputs
        return 2 * _prod(x) * w[1] * kernel + bias
    return 2 * _prod(y) * w[1] * kernel + bias


def _matmul(node, ins, outs) -> int | None:
    a, y = ins[0], outs[0]
    if a is None or y is None:
        return None
    return 2 * _prod(y) * (a[-1] if len(a) else 1)


def _gemm(node, ins, outs) -> int | None:
    a, y = ins[0], outs[0]
    if a is None or y is None or len(a) != 2:
        return None
    trans_a = node.attributes.get("transA")
    k = a[0] if trans_a is not None and trans_a.value else a[1]
    bias = _prod(y) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
    return 2 * _prod(y) * k + bias


def _rnn(node, ins, outs) -> int | None:
    x, w = ins[0], ins[1]
    if x is None or w is None:
        return None
    dirs, gates_h, inp = w  # W: [num_directions, gates * hidden, input_size]
    hidden = gates_h // _RNN_GATES[node.op_type]
    layout = node.attributes.get("layout")
    t, b = (x[1], x[0]) if layout is not None and layout.value == 1 else (x[0], x[1])
    return 2 * t * b * dirs * gates_h * (inp + hidden)


def _pool(node, ins, outs) -> int | None:
    y = outs[0]
    k = node.attributes.get("kernel_shape")
    if y is None or k is None:
        return None
    return _prod(y) * _prod(k.value)


_RULES = {
    "Conv": _conv, "ConvTranspose": _conv, "MatMul": _matmul, "Gemm": _gemm,
    "LSTM": _rnn, "GRU": _rnn, "RNN": _rnn,
    "MaxPool": _pool, "AveragePool": _pool, "LpPool": _pool,
}


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def node_flops(node: ir.Node, in_shapes: list, out_shapes: list) -> int | None:
    """FLOPs of one node by the module's convention; ``None`` when the shapes it needs are unknown."""
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    ins = [_static(s) for s in in_shapes]
    outs = [_static(s) for s in out_shapes]
    if op in _DATA_MOVEMENT:
        return 0
    if op in _RULES:
        return _RULES[op](node, ins, outs)
    if op in _REDUCTIONS:
        return None if not ins or ins[0] is None else _prod(ins[0])
    if not outs or any(o is None for o in outs):
        return None
    return sum(_prod(o) for o in outs)


def _type_info(v: ir.Value, typ, shape) -> dict[str, Any]:
    if isinstance(typ, ir.TensorType):
        try:
            dtype = typ.dtype.numpy().name
        except Exception:
            dtype = typ.dtype.name.lower()
    else:
        dtype = None if typ is None else str(typ)
    dims = None if shape is None else [d if isinstance(d, int) else d.value for d in shape]
    return {"name": v.name, "dtype": dtype, "shape": dims}


def _parameters(model: ir.Model, nodes: list[ir.Node]) -> tuple[int, int]:
    """(elements, bytes) of the initializers and of the tensors held by Constant nodes."""
    tensors = [
        v.const_value
        for graph in (model.graph, *model.graph.subgraphs())
        for v in graph.initializers.values()
        if v.const_value is not None
    ]
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = n.attributes.get("value")
            if a is not None and a.type == ir.AttributeType.TENSOR:
                tensors.append(a.value)
    return sum(t.size for t in tensors), sum(t.nbytes for t in tensors)


def summarize(model: ir.Model) -> dict[str, Any]:
    """Opsets, inputs/outputs, node count, op histogram, parameters and estimated FLOPs (see module doc)."""
    from graphopt.core.shapes import infer_types

    inferred = infer_types(model)

    def types_of(v):
        return inferred.get(v, (v.type, v.shape))

    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    histogram = Counter(_op_key(n) for n in nodes)
    flops_by_op: Counter = Counter()
    unknown = 0
    for n in nodes:
        f = node_flops(
            n,
            [None if v is None else types_of(v)[1] for v in n.inputs],
            [types_of(v)[1] for v in n.outputs],
        )
        if f is None:
            unknown += 1
        elif f:
            flops_by_op[_op_key(n)] += f
    g = model.graph
    n_params, n_bytes = _parameters(model, nodes)
    return {
        "opsets": dict(sorted(model.opset_imports.items())),
        "inputs": [_type_info(v, *types_of(v)) for v in g.inputs if not v.is_initializer()],
        "outputs": [_type_info(v, *types_of(v)) for v in g.outputs],
        "nodes": len(nodes),
        "op_histogram": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": n_params,
        "parameter_bytes": n_bytes,
        "flops": None if unknown else sum(flops_by_op.values()),
        "flops_by_op": dict(sorted(flops_by_op.items(), key=lambda kv: (-kv[1], kv[0]))),
        "flops_unknown_nodes": unknown,
    }

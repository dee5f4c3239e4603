"""Fold weight reparameterizations into one precomputed weight.

Training-time reparameterizations survive export as small subgraphs computing a weight from
constants, e.g. weight normalization ``w = g * v / ||v||`` (``ReduceL2(v)`` or
``Sqrt(ReduceSum(v * v))`` over the non-output axes, then ``Div`` and ``Mul``), or chains of
``Mul/Div/Add/Sub/Cast/Transpose`` on stored weights. When such a subgraph feeds an input of a
``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul``, this pass evaluates it once (with
``onnx.reference``) and feeds the op one new initializer instead.

Rule (``_collect``): walking back from the op's input, every node must be one of ``CHAIN_OPS``, in
the same graph, at most ``max_nodes`` of them, and every leaf must be a constant (initializer that is
not a graph input, or Constant node). The fold is **bounded**: it happens only when the folded weight
is no bigger (in bytes) than the largest leaf, so the model never grows by more than it already
stored. Chain nodes and leaves that nothing else uses are removed. Because the subgraph is evaluated
as written, the axes of the norm need no checking: the result is exact whatever they are.

Constant folding would handle these chains one node at a time, but for a large ``v`` it must refuse
the ``Div`` (its output is as large as ``v``, which stays alive for ``ReduceL2``); folding the whole
chain at once frees ``v``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, graphs_of, new_const, remove_dead

WEIGHT_CONSUMERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

CHAIN_OPS = frozenset(
    {
        "Mul", "Div", "Add", "Sub", "Neg", "Abs", "Reciprocal", "Sqrt", "Pow",
        "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity",
        "ReduceL2", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMean",
    }
)


def _is_leaf_constant(value: ir.Value) -> bool:
    return not value.is_graph_input() and const_array(value) is not None


def _collect(value: ir.Value, graph, max_nodes: int) -> tuple[list[ir.Node], list[ir.Value]] | str:
    """The chain of nodes computing ``value`` from constants and its leaves, or why not."""
    nodes: dict[int, ir.Node] = {}
    leaves: dict[int, ir.Value] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in leaves:
            continue
        if _is_leaf_constant(v):
            leaves[id(v)] = v
            continue
        node = v.producer()
        if node is None:
            return f"'{v.name}' is a graph input"
        if id(node) in nodes:
            continue
        if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx"):
            return f"'{v.name}' comes from {node.op_type}"
        if node.graph is not graph:
            return f"'{v.name}' comes from an enclosing graph"
        nodes[id(node)] = node
        if len(nodes) > max_nodes:
            return f"more than {max_nodes} nodes"
        stack.extend(i for i in node.inputs if i is not None)
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(nodes.values(), key=lambda n: order[id(n)]), list(leaves.values())


def _transposed(chain: list[ir.Node], leaves: list[ir.Value]) -> np.ndarray | None:
    """A chain of Transpose/Identity nodes on one weight, in numpy: one copy (the result), where the
    reference evaluator would hold four (a tied embedding's transpose is hundreds of MB)."""
    if len(leaves) != 1 or any(n.op_type not in ("Transpose", "Identity") or len(n.inputs) != 1 for n in chain):
        return None
    arr = np.asarray(const_array(leaves[0]))
    for node in chain:
        perm = node.attributes.get("perm")
        if node.op_type == "Transpose":
            arr = arr.transpose(None if perm is None else list(perm.as_ints()))
    return np.ascontiguousarray(arr)


def _evaluate(chain: list[ir.Node], leaves: list[ir.Value], output: ir.Value, opset: int) -> np.ndarray:
    layout_only = _transposed(chain, leaves)
    if layout_only is not None:
        return layout_only
    names = {id(v): f"leaf{i}" for i, v in enumerate(leaves)}
    inits = [numpy_helper.from_array(np.asarray(const_array(v)), names[id(v)]) for v in leaves]

    def name(v: ir.Value | None) -> str:
        if v is None:
            return ""
        return names.setdefault(id(v), f"t{len(names)}")

    protos = []
    for node in chain:
        proto = ir.serde.serialize_node(node)
        del proto.input[:], proto.output[:]
        proto.input.extend(name(v) for v in node.inputs)
        proto.output.extend(name(v) for v in node.outputs)
        protos.append(proto)
    graph = helper.make_graph(protos, "chain", [], [helper.make_empty_tensor_value_info(name(output))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (result,) = ReferenceEvaluator(model).run(None, {})
    return np.asarray(result)


class FoldWeightReparamPass(ir.passes.InPlacePass):
    """Fold weight-norm g*v/||v|| and Mul/Div/Add chains on constant weights."""

    def __init__(self, *, max_nodes: int = 32) -> None:
        super().__init__()
        self.max_nodes = max_nodes
        self.last_skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.last_skipped = {}
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
        modified = False
        for graph in list(graphs_of(model)):
            for op in list(graph):
                if op.op_type not in WEIGHT_CONSUMERS or op.domain not in ("", "ai.onnx") or op.graph is not graph:
                    continue
                for index, value in enumerate(op.inputs):
                    if value is None or value.producer() is None or _is_leaf_constant(value):
                        continue
                    if self._fold_input(graph, op, index, value, opset):
                        modified = True
        return ir.passes.PassResult(model, modified)

    def _fold_input(self, graph, op: ir.Node, index: int, value: ir.Value, opset: int) -> bool:
        found = _collect(value, graph, self.max_nodes)
        if isinstance(found, str):
            return False  # an activation input, or a weight computed from something non-constant
        chain, leaves = found
        label = f"{op.name or op.op_type} input {index}"
        try:
            folded = _evaluate(chain, leaves, value, opset)
        except Exception as e:  # an op the reference evaluator cannot run
            self.last_skipped[label] = f"cannot evaluate: {e}"
            return False
        if value.dtype is not None and folded.dtype != value.dtype.numpy():
            self.last_skipped[label] = f"evaluated dtype {folded.dtype} differs from {value.dtype}"
            return False
        largest = max(np.asarray(const_array(v)).nbytes for v in leaves)
        if folded.nbytes > largest:
            self.last_skipped[label] = f"folded weight ({folded.nbytes} bytes) larger than its inputs ({largest})"
            return False
        new = new_const(graph, folded, f"{value.name or 'weight'}_folded", op)
        op.replace_input_with(index, new)
        remove_dead(graph, chain)
        drop_unused_constants(graph, leaves)
        return True

"""Common subexpression elimination: identical constants and identical pure computations merge.

Two nodes are the same computation when they have the same op (domain, type, overload), the same
inputs (the same values, in order), the same attributes (tensors compared by dtype, shape and bytes,
subgraphs by their serialized form, so control flow merges only when the bodies are identical) and
the same number of outputs. Random ops never merge. Walking each graph in topological order, the later
node's outputs are replaced by the earlier's, so whole duplicated chains collapse in one run.
Runs on the main graph, every subgraph and every function (onnx_ir's own CSE does the main graph only).

Constants: ``Constant`` nodes of the main graph become initializers (``lift_constants``, on by
default), and constants with identical dtype, shape and bytes become one, so that the nodes reading
them are then recognised as identical too. Graph inputs (even with an initializer) are never merged.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir

from graphopt.passes.rewrite_utils import graphs_of, tensor_digest

NON_DETERMINISTIC = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli", "Dropout"}
)


def _tensor_key(tensor) -> tuple:
    arr = tensor.numpy()
    return (str(arr.dtype), arr.shape, tensor_digest(tensor))


def _attr_key(attr: ir.Attr) -> object:
    t = attr.type
    if attr.is_ref():
        return ("ref", attr.ref_attr_name)
    if t == ir.AttributeType.TENSOR:
        return _tensor_key(attr.value)
    if t == ir.AttributeType.TENSORS:
        return tuple(_tensor_key(v) for v in attr.value)
    if t == ir.AttributeType.GRAPH:
        return hashlib.sha256(ir.to_proto(attr.value).SerializeToString()).hexdigest()
    if t == ir.AttributeType.GRAPHS:
        return tuple(hashlib.sha256(ir.to_proto(g).SerializeToString()).hexdigest() for g in attr.value)
    if t in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return tuple(attr.value)
    if t in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS, ir.AttributeType.SPARSE_TENSOR,
             ir.AttributeType.SPARSE_TENSORS):
        return repr(attr.value)
    return attr.value


def node_key(node: ir.Node) -> tuple | None:
    """What identifies the node's computation, or None when it must never merge (random ops)."""
    if node.domain in ("", "ai.onnx") and node.op_type in NON_DETERMINISTIC:
        return None
    try:
        attrs = tuple(sorted((name, _attr_key(a)) for name, a in node.attributes.items()))
    except Exception:  # an attribute we cannot read back: leave the node alone
        return None
    return (node.domain or "", node.op_type, node.overload, len(node.outputs),
            tuple(id(v) for v in node.inputs), attrs)


def _merge(graph, node: ir.Node, earlier: ir.Node) -> bool:
    pairs = list(zip(node.outputs, earlier.outputs))
    if any(old.is_graph_output() and (new.is_graph_output() or new.is_graph_input()) for old, new in pairs):
        return False  # both names are part of the interface; keep both nodes
    for old, new in pairs:
        if old.is_graph_output():
            name = old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name = None
            new.name = name
        else:
            ir.convenience.replace_all_uses_with(old, new)
    graph.remove(node, safe=True)
    return True


def _lift_and_merge_constants(graph: ir.Graph) -> int:
    """Constant nodes -> initializers; identical constants (initializers included) -> one."""
    changed = 0
    seen: dict[tuple, ir.Value] = {}
    outputs = set(graph.outputs)
    for value in list(graph.initializers.values()):
        if value.is_graph_input() or value.const_value is None or value in outputs:
            continue
        key = _tensor_key(value.const_value)
        if key not in seen:
            seen[key] = value
        elif value.name is not None:
            ir.convenience.replace_all_uses_with(value, seen[key])
            del graph.initializers[value.name]
            changed += 1
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or node.outputs[0] in outputs:
            continue
        try:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
        except Exception:
            tensor = None
        if tensor is None:
            continue
        out = node.outputs[0]
        key = _tensor_key(tensor)
        if key in seen:
            ir.convenience.replace_all_uses_with(out, seen[key])
        else:
            name = out.name
            value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            ir.convenience.replace_all_uses_with(out, value)
            graph.remove(node, safe=True)
            graph.register_initializer(value)
            seen[key] = value
            changed += 1
            continue
        graph.remove(node, safe=True)
        changed += 1
    return changed


class CommonSubexpressionEliminationPass(ir.passes.InPlacePass):
    """Merge identical constants and identical subgraphs of pure ops, in every graph and function."""

    def __init__(self, *, lift_constants: bool = True):
        super().__init__()
        self.lift_constants = lift_constants

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        merged = _lift_and_merge_constants(model.graph) if self.lift_constants else 0
        for graph in list(graphs_of(model)):
            seen: dict[tuple, ir.Node] = {}
            for node in list(graph):
                key = node_key(node)
                if key is None:
                    continue
                earlier = seen.get(key)
                if earlier is None:
                    seen[key] = node
                elif _merge(graph, node, earlier):
                    merged += 1
        return ir.passes.PassResult(model, modified=merged > 0)

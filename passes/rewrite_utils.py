"""Small helpers shared by the cleanup, simplification and fusion passes.

Nothing here rewrites a graph on its own: these read constants, walk every graph of a model and
swap one value for another while keeping graph-output names stable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

GRAPHOPT_DOMAIN = "graphopt"


def graphs_of(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies, nested) and every model function."""
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield attr.as_graph()
                    yield from attr.as_graph().subgraphs()
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.as_graphs():
                        yield g
                        yield from g.subgraphs()


def home(graph: ir.Graph | ir.Function) -> ir.Graph:
    """The graph that a node of ``graph`` reports as its ``node.graph`` (a function's inner graph)."""
    return graph.graph if isinstance(graph, ir.Function) else graph


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None (graph inputs are never constant, even with a default)."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "ConstantOfShape":
            return _constant_of_shape(producer)
        if producer.op_type != "Constant":
            return None
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except Exception:  # a Constant with an attribute reference or an unsupported form
            return None
        if tensor is None:
            return None
    try:
        return tensor.numpy()
    except Exception:
        return None


MAX_FILL_ELEMENTS = 1 << 26


def tensor_bytes(tensor: ir.TensorProtocol) -> bytes | memoryview:
    """The tensor's bytes as ``tensor.tobytes()`` gives them, viewed rather than copied when the tensor
    is a contiguous little-endian array of whole bytes (a memory-mapped weight of hundreds of MB is
    hashed in place)."""
    if tensor.dtype != ir.DataType.STRING and tensor.dtype.bitwidth % 8 == 0:
        arr = tensor.numpy()
        if arr.flags.c_contiguous and arr.dtype.byteorder in "=|<" and arr.dtype.kind != "O":
            return memoryview(arr.reshape(-1).view(np.uint8))
    return tensor.tobytes()


_DIGEST_KEY = "graphopt.sha256"


def tensor_digest(tensor: ir.TensorProtocol) -> bytes:
    """sha256 of the tensor's bytes, kept in the tensor's metadata: the cleanup passes run several times
    over the same weights, and hashing a model's gigabytes once is enough (a pass that changes a weight
    makes a new tensor, which has no digest yet)."""
    meta = getattr(tensor, "meta", None)
    if meta is not None and _DIGEST_KEY in meta:
        return meta[_DIGEST_KEY]
    digest = hashlib.sha256(tensor_bytes(tensor)).digest()
    if meta is not None:
        meta[_DIGEST_KEY] = digest
    return digest


def _constant_of_shape(node: ir.Node) -> np.ndarray | None:
    """The contents of ``ConstantOfShape(shape)`` when ``shape`` is constant (old exports store weights so)."""
    shape = const_array(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if shape is None or shape.ndim != 1 or (shape < 0).any() or int(np.prod(shape)) > MAX_FILL_ELEMENTS:
        return None
    attr = node.attributes.get("value")
    fill = attr.value.numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
    if fill.size != 1:
        return None
    return np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)


def is_scalar_const(value: ir.Value | None, expected: float) -> bool:
    """True when the value is a constant whose every element equals ``expected``."""
    arr = const_array(value)
    return arr is not None and arr.size > 0 and bool(np.all(arr == expected))


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known int, else None.

    Exporters sometimes write ``-1`` (or other negative values) for an unknown dimension; those count
    as unknown, so a rule that needs a static shape does not fire.
    """
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape.dims)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return dims


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node that uses ``value`` (once), when it is not also a graph output."""
    if value.is_graph_output():
        return None
    uses = value.uses()
    if len(uses) != 1:
        return None
    return uses[0].node


def producer_op(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The value's producer when it is ``op_type`` (in ``domain``) with a single output, else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type != op_type or node.domain not in (domain, "ai.onnx" if domain == "" else domain):
        return None
    return node


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every user of ``old`` (graph outputs included) use ``new``; a graph output keeps its name."""
    was_output = old.is_graph_output()
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = None
        new.name = name
    if new.type is None and old.type is not None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape


def can_bypass(old: ir.Value, new: ir.Value) -> bool:
    """Whether ``old`` may be replaced by ``new``: not when both are a graph's interface (output
    from an input or initializer, or ``new`` is already an output: one value cannot carry two names)."""
    if not old.is_graph_output():
        return True
    if new.is_graph_input() or new.is_initializer() or new.is_graph_output():
        return False
    # an outer-scope value cannot be renamed to a subgraph's output
    old_node, new_node = old.producer(), new.producer()
    return old_node is not None and new_node is not None and old_node.graph is new_node.graph


def remove_dead(graph: ir.Graph | ir.Function, nodes: list[ir.Node]) -> int:
    """Remove those of ``nodes`` whose outputs nobody uses any more (repeatedly, in any order),
    and the Constant nodes that fed only them."""
    removed = 0
    outputs = set(graph.outputs)
    pending = [n for n in nodes if n is not None]
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            if node.graph is not home(graph):
                pending.remove(node)
                continue
            if any(o.uses() or o in outputs for o in node.outputs):
                continue
            feeders = [v.producer() for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            pending.remove(node)
            pending.extend(f for f in feeders if f is not None and f.op_type == "Constant" and f not in pending)
            removed += 1
            progress = True
    return removed


def binary_with_const(node: ir.Node | None, op_types: tuple[str, ...]) -> tuple[ir.Value, np.ndarray] | None:
    """For ``x op c`` (either order for Add/Mul; ``c`` second for Sub/Div/Pow): ``(x, c)``."""
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    cb = const_array(b)
    if cb is not None and const_array(a) is None:
        return a, cb
    if node.op_type in ("Add", "Mul"):
        ca = const_array(a)
        if ca is not None and cb is None:
            return b, ca
    return None


def close_to(arr: np.ndarray | None, value: float, rtol: float = 1e-5) -> bool:
    """A constant whose every element is ``value`` (up to float32 rounding)."""
    return arr is not None and arr.size >= 1 and bool(np.allclose(arr.astype(np.float64), value, rtol=rtol, atol=0))


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other operand of a binary node, given one of them."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is value:
        return b
    if b is value:
        return a
    return None


def opset_version(model: ir.Model, domain: str = "") -> int | None:
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx") if domain == "" else None)


def new_const(graph: ir.Graph | ir.Function, array: np.ndarray, name: str, before: ir.Node) -> ir.Value:
    """A constant value: an initializer in a graph, a Constant node (before ``before``) in a function."""
    array = np.ascontiguousarray(array)
    dtype = ir.DataType.from_numpy(array.dtype)
    if isinstance(graph, ir.Graph):
        unique = _unique_name(graph, name)
        value = ir.Value(name=unique, const_value=ir.tensor(array, name=unique),
                         shape=ir.Shape(array.shape), type=ir.TensorType(dtype))
        graph.register_initializer(value)
        return value
    tensor = ir.tensor(array, name=name)
    node = ir.node("Constant", [], {"value": tensor})
    graph.insert_before(before, node)
    out = node.outputs[0]
    out.const_value = tensor
    out.shape = ir.Shape(array.shape)
    out.type = ir.TensorType(dtype)
    return out


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    taken |= {o.name for node in graph for o in node.outputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def drop_unused_constants(graph: ir.Graph | ir.Function, values: list[ir.Value]) -> None:
    """Remove those of ``values`` (initializers or Constant outputs) that nothing uses any more."""
    for v in values:
        if v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        if isinstance(graph, ir.Graph) and v.is_initializer() and graph.initializers.get(v.name) is v:
            graph.initializers.pop(v.name)
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is home(graph):
            graph.remove(producer, safe=True)

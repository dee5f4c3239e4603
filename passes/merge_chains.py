"""Merge chains of layout ops: Transpose∘Transpose, Reshape/Flatten/Squeeze/Unsqueeze chains.

Rules, tried on each node whose data input comes from another layout op (``P``), in topological
order, so a chain of any length collapses in one run:

* ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1[p2])``, nothing at all when that is the
  identity permutation.
* reshape-like of reshape-like (Reshape, Flatten, Squeeze, Unsqueeze): when the result's static shape
  equals ``x``'s, the chain is ``x`` (this cancels Squeeze/Unsqueeze pairs on the same axes); else a
  ``Reshape`` whose constant target has no 0 (a 0 copies a dim of ``P``'s output, not of ``x``) reads
  ``x`` directly; else, when the result's shape is static, the node becomes ``Reshape(x, shape)``.
* ``Squeeze(Unsqueeze(x, a), a)`` is ``x`` even without static shapes (ranks suffice).

* a chain of Reshape/Transpose whose input and output shapes are equal and that only permutes one
  axis (ShuffleNet's channel shuffle, Reshape→Transpose→Reshape) -> one ``Gather`` on that axis;
* a global average/max pool (``GlobalAveragePool``, or ``AveragePool`` whose window is the whole
  unpadded input) followed by a Reshape/Flatten/Squeeze to ``[N, C]`` -> ``ReduceMean``/``ReduceMax``
  with ``keepdims=0``;
* ``Concat(f(a), f(b), ...)`` -> ``f(Concat(a, b, ...))`` for one elementwise unary op ``f`` with the
  same attributes on every input (each ``f`` output used only by the Concat), except where ``f``
  follows a conv or GEMM it would be computed with (``FUSES_ACTIVATION``).

The producer ``P`` is removed when nothing else uses it; the node count never grows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import (
    can_bypass,
    const_array,
    graphs_of,
    home,
    new_const,
    only_consumer,
    remove_dead,
    replace_value,
    static_shape,
)

RESHAPE_LIKE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    return None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _cancels(node: ir.Node, prev: ir.Node) -> bool:
    """Squeeze(Unsqueeze(x, a), a) or Unsqueeze(Squeeze(x, a), a): the pair is the identity."""
    if {node.op_type, prev.op_type} != {"Squeeze", "Unsqueeze"}:
        return False
    a, b = _axes(prev), _axes(node)
    wide = prev.outputs[0] if prev.op_type == "Unsqueeze" else prev.inputs[0]  # the higher-rank side
    rank = _rank(wide)
    if a is None or b is None or rank is None or not a:
        return False
    return sorted(x % rank for x in a) == sorted(x % rank for x in b)


def _merge_transpose(node: ir.Node, prev: ir.Node) -> ir.Value | bool:
    p1 = prev.attributes.get_ints("perm", None)
    p2 = node.attributes.get_ints("perm", None)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return False
    perm = [p1[i] for i in p2]
    source = prev.inputs[0]
    if perm == list(range(len(perm))):
        return source
    node.replace_input_with(0, source)
    node.attributes["perm"] = ir.AttrInt64s("perm", perm)
    return True


def _merge_reshape(graph, node: ir.Node, prev: ir.Node) -> ir.Value | bool:
    """Returns the value the node equals, True when it was rewritten in place, False when nothing fired."""
    source = prev.inputs[0]
    out_shape = static_shape(node.outputs[0])
    if out_shape is not None and out_shape == static_shape(source):
        return source
    if _cancels(node, prev):
        return source
    if node.op_type == "Reshape":
        target = const_array(node.inputs[1])
        if target is not None and 0 not in target.tolist():
            node.replace_input_with(0, source)
            return True
    if out_shape is not None:
        shape = new_const(graph, np.array(out_shape, dtype=np.int64), f"{node.name or 'reshape'}_shape", node)
        new = ir.node("Reshape", [source, shape], name=node.name)
        graph.insert_before(node, new)
        new.outputs[0].shape = ir.Shape(out_shape)
        new.outputs[0].type = node.outputs[0].type
        replace_value(node.outputs[0], new.outputs[0])
        graph.remove(node, safe=True)
        return True
    return False


MAX_PERMUTE_ELEMENTS = 1 << 21  # the check builds index arrays of this many elements
UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "HardSigmoid", "HardSwish",
                   "Softplus", "Abs", "Neg", "Exp", "Erf", "Sqrt", "Mish", "Gelu", "Celu", "ThresholdedRelu"})


def _layout_chain(node: ir.Node) -> list[ir.Node]:
    """The Reshape/Transpose nodes ending at ``node``, earliest first (intermediates used once)."""
    chain = [node]
    while True:
        prev = chain[0].inputs[0].producer() if chain[0].inputs and chain[0].inputs[0] is not None else None
        if prev is None or prev.op_type not in ("Reshape", "Transpose") or prev.graph is not node.graph:
            return chain
        if only_consumer(prev.outputs[0]) is not chain[0]:
            return chain
        chain.insert(0, prev)


def _single_axis_permutation(chain: list[ir.Node], shape: tuple[int, ...]) -> tuple[int, np.ndarray] | None:
    """(axis, indices) when the chain moves whole slices along one axis of ``shape``, else None."""
    size = int(np.prod(shape))
    if size == 0 or size > MAX_PERMUTE_ELEMENTS:
        return None
    idx = np.arange(size, dtype=np.int64).reshape(shape)
    for n in chain:
        if n.op_type == "Transpose":
            perm = n.attributes.get_ints("perm", None)
            if perm is None:
                return None
            idx = idx.transpose(perm)
        else:
            out = static_shape(n.outputs[0])
            if out is None:
                return None
            idx = idx.reshape(out)
    if idx.shape != shape:
        return None
    coords = np.unravel_index(idx, shape)
    grid = np.indices(shape)
    for axis in range(len(shape)):
        if all(np.array_equal(coords[a], grid[a]) for a in range(len(shape)) if a != axis):
            first = coords[axis][(0,) * axis + (slice(None),) + (0,) * (len(shape) - axis - 1)]
            if np.array_equal(coords[axis], np.take(grid[axis], first, axis=axis)) or np.array_equal(
                    coords[axis], np.broadcast_to(first.reshape((-1,) + (1,) * (len(shape) - axis - 1)), shape)):
                return axis, first.astype(np.int64)
    return None


def _permutation_to_gather(graph, node: ir.Node, opset: int) -> bool:
    if node.op_type not in ("Reshape", "Transpose"):
        return False
    chain = _layout_chain(node)
    out_shape = static_shape(node.outputs[0])
    for start in range(len(chain) - 1):
        sub = chain[start:]
        source = sub[0].inputs[0]
        shape = static_shape(source)
        if shape is None or shape != out_shape:
            continue
        found = _single_axis_permutation(sub, shape)
        if found is None:
            continue
        axis, indices = found
        if np.array_equal(indices, np.arange(len(indices))):
            return False  # the identity: the reshape rules cancel it
        const = new_const(graph, indices, f"{node.name or 'shuffle'}_indices", sub[0])
        gather = ir.node("Gather", [source, const], {"axis": axis}, name=node.name)
        graph.insert_before(node, gather)
        gather.outputs[0].shape, gather.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        replace_value(node.outputs[0], gather.outputs[0])
        remove_dead(graph, sub)
        return True
    return False


def _global_pool_flatten(graph, node: ir.Node, opset: int) -> bool:
    if node.op_type not in RESHAPE_LIKE:
        return False
    pool = node.inputs[0].producer() if node.inputs[0] is not None else None
    if pool is None or pool.graph is not home(graph) or only_consumer(pool.outputs[0]) is not node:
        return False
    x = pool.inputs[0]
    shape, out = static_shape(x), static_shape(node.outputs[0])
    if shape is None or out is None or len(shape) < 3 or out != shape[:2]:
        return False
    if pool.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        reduce = "ReduceMean" if pool.op_type == "GlobalAveragePool" else "ReduceMax"
    elif pool.op_type == "AveragePool":
        whole = list(pool.attributes.get_ints("kernel_shape", [])) == list(shape[2:])
        pads = pool.attributes.get_ints("pads", None)
        auto = pool.attributes.get_string("auto_pad", "NOTSET")
        if not whole or (pads is not None and any(pads)) or auto not in ("NOTSET", "VALID"):
            return False
        if any(d != 1 for d in pool.attributes.get_ints("dilations", [1])):
            return False
        reduce = "ReduceMean"
    else:
        return False
    axes = list(range(2, len(shape)))
    if opset >= 18:
        inputs = [x, new_const(graph, np.array(axes, dtype=np.int64), f"{node.name or 'pool'}_axes", pool)]
        attrs = {"keepdims": 0}
    else:
        inputs, attrs = [x], {"keepdims": 0, "axes": axes}
    red = ir.node(reduce, inputs, attrs, name=pool.name)
    graph.insert_before(node, red)
    red.outputs[0].shape, red.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    replace_value(node.outputs[0], red.outputs[0])
    remove_dead(graph, [pool, node])
    return True


# ops that runtimes and graphopt's lowering fuse with the activation that follows them
FUSES_ACTIVATION = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _fused_with_producer(node: ir.Node) -> bool:
    """The activation ``node`` reads a conv or GEMM result that only it uses: a runtime computes both in
    one pass, so moving the activation past a Concat would add a pass over the concatenated tensor
    (SqueezeNet in ONNX Runtime: 5% slower with one node less per fire module)."""
    x = node.inputs[0]
    producer = x.producer() if x is not None else None
    return (producer is not None and producer.op_type in FUSES_ACTIVATION and len(x.uses()) == 1
            and not x.is_graph_output())


def _unary_key(node: ir.Node | None, concat: ir.Node):
    if node is None or node.op_type not in UNARY or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
        return None
    if node.outputs[0].is_graph_output() or len(node.outputs[0].uses()) != 1 or node.graph is not concat.graph:
        return None
    if _fused_with_producer(node):
        return None
    return node.op_type, tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))


def _hoist_unary_over_concat(graph, node: ir.Node, opset: int) -> bool:
    if node.op_type != "Concat" or len(node.inputs) < 2:
        return False
    producers = [v.producer() if v is not None else None for v in node.inputs]
    keys = {_unary_key(p, node) for p in producers}
    if len(keys) != 1 or None in keys:
        return False
    first, out = producers[0], node.outputs[0]
    concat = ir.node("Concat", [p.inputs[0] for p in producers], {"axis": node.attributes.get_int("axis", 0)})
    unary = ir.node(first.op_type, concat.outputs, dict(first.attributes), name=first.name)
    graph.insert_before(node, [concat, unary])
    for v in (concat.outputs[0], unary.outputs[0]):
        v.shape, v.type = out.shape, out.type
    replace_value(out, unary.outputs[0])
    remove_dead(graph, [node, *producers])
    return True


NODE_RULES = (_permutation_to_gather, _global_pool_flatten, _hoist_unary_over_concat)


class MergeChainsPass(ir.passes.InPlacePass):
    """Merge Transpose/Reshape/Flatten chains and cancel Squeeze/Unsqueeze pairs."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = 0
        opset = model.opset_imports.get("", 1)
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.graph is not home(graph) or node.domain not in ("", "ai.onnx") or not node.inputs:
                    continue
                data = node.inputs[0]
                prev = data.producer() if data is not None else None
                if prev is None or prev.domain not in ("", "ai.onnx") or prev.graph is not home(graph):
                    continue
                if any(rule(graph, node, opset) for rule in NODE_RULES):
                    changed += 1
                    continue
                if node.op_type == "Transpose" and prev.op_type == "Transpose":
                    result = _merge_transpose(node, prev)
                elif node.op_type in RESHAPE_LIKE and prev.op_type in RESHAPE_LIKE:
                    result = _merge_reshape(graph, node, prev)
                else:
                    continue
                rewritten = result is True
                result = None if isinstance(result, bool) else result
                if result is not None:
                    if not can_bypass(node.outputs[0], result):
                        continue
                    replace_value(node.outputs[0], result)
                    graph.remove(node, safe=True)
                    rewritten = True
                if rewritten:
                    changed += 1
                    remove_dead(graph, [prev])
        return ir.passes.PassResult(model, modified=changed > 0)

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

The producer ``P`` is removed when nothing else uses it; the node count never grows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import (
    can_bypass,
    const_array,
    graphs_of,
    new_const,
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


class MergeChainsPass(ir.passes.InPlacePass):
    """Merge Transpose/Reshape/Flatten chains and cancel Squeeze/Unsqueeze pairs."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = 0
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.graph is not graph or node.domain not in ("", "ai.onnx") or not node.inputs:
                    continue
                data = node.inputs[0]
                prev = data.producer() if data is not None else None
                if prev is None or prev.domain not in ("", "ai.onnx") or prev.graph is not graph:
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

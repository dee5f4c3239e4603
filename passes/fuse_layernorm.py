"""Recognise layer normalization written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add].

Pattern, anchored at the first ReduceMean (``axes`` the trailing dims ``axis..rank-1``, keepdims=1):

    d = x - ReduceMean(x);  v = ReduceMean(d², same axes)      (d² as Pow(d, 2) or d·d)
    y = d / Sqrt(v + eps)   [· scale]   [+ bias]               (scale, bias, eps constants)

The result is ``LayerNormalization(x, scale, bias, axis, epsilon)``: scale and bias are reshaped to the
normalized shape ``x.shape[axis:]`` (a missing scale is ones; a missing bias is omitted); they must not
broadcast over the leading dims. Emitted as the standard op at opset >= 17 (the opset is raised when
that is exact, :mod:`graphopt.passes.opset_upgrade`), else as ``graphopt.LayerNormalization`` when
``target_runtime="graphopt"``, else left alone.

Node contract (``graphopt.LayerNormalization``, version 1, as ONNX LayerNormalization-17):
inputs ``X``, ``Scale`` (shape ``X.shape[axis:]``), optional ``B`` (same shape); attributes ``axis``
(int, default -1), ``epsilon`` (float, default 1e-5); one output
``Y = (X - mean) / sqrt(var + epsilon) * Scale + B`` over dims ``axis..rank-1`` (biased variance).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.graphopt_ops import check_target_runtime, choose_domain, usable_in
from graphopt.passes.rewrite_utils import (
    binary_with_const,
    close_to,
    const_array,
    graphs_of,
    new_const,
    only_consumer,
    remove_dead,
    replace_value,
    static_shape,
)


def _reduce_axes(node: ir.Node, rank: int) -> list[int] | None:
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else arr.reshape(-1).tolist()
    else:
        axes = node.attributes.get_ints("axes", None)
    if not axes:
        return None
    return sorted(int(a) % rank for a in axes)


def _square_of(node: ir.Node | None, d: ir.Value) -> bool:
    if node is None:
        return False
    p = binary_with_const(node, ("Pow",))
    if p:
        return p[0] is d and close_to(p[1], 2.0)
    return node.op_type == "Mul" and list(node.inputs) == [d, d]


def _affine(value: ir.Value, op: str, norm_shape: tuple, rank: int):
    """``value op c`` as the single consumer: (node, c reshaped to the normalized shape) or None."""
    node = only_consumer(value)
    hit = binary_with_const(node, (op,))
    if not hit or hit[0] is not value:
        return None
    c = hit[1]
    if c.ndim > rank:
        return None
    aligned = c.reshape((1,) * (rank - c.ndim) + c.shape)
    lead = rank - len(norm_shape)
    if any(d != 1 for d in aligned.shape[:lead]):
        return None
    try:
        return node, np.ascontiguousarray(np.broadcast_to(aligned.reshape(aligned.shape[lead:]), norm_shape))
    except ValueError:
        return None


def match_layernorm(mean1: ir.Node):
    """The pattern rooted at ``mean1``: (x, output, nodes, scale, bias, axis, eps) or None."""
    x = mean1.inputs[0]
    shape = static_shape(x)
    if shape is None:
        return None
    rank = len(shape)
    axes = _reduce_axes(mean1, rank)
    if axes is None or axes != list(range(axes[0], rank)):
        return None
    sub = only_consumer(mean1.outputs[0])
    if sub is None or sub.op_type != "Sub" or list(sub.inputs) != [x, mean1.outputs[0]]:
        return None
    d = sub.outputs[0]
    uses = list({id(u.node): u.node for u in d.uses()}.values())
    sq = next((n for n in uses if _square_of(n, d)), None)
    div = next((n for n in uses if n.op_type == "Div" and n.inputs[0] is d), None)
    if sq is None or div is None or len(uses) != 2 or d.is_graph_output():
        return None
    mean2 = only_consumer(sq.outputs[0])
    if mean2 is None or mean2.op_type != "ReduceMean" or _reduce_axes(mean2, rank) != axes:
        return None
    add = only_consumer(mean2.outputs[0])
    eps = binary_with_const(add, ("Add",))
    if not eps or eps[0] is not mean2.outputs[0] or eps[1].size != 1:
        return None
    sqrt = only_consumer(add.outputs[0])
    if sqrt is None or sqrt.op_type != "Sqrt" or only_consumer(sqrt.outputs[0]) is not div:
        return None
    if div.inputs[1] is not sqrt.outputs[0]:
        return None
    nodes = [mean1, sub, sq, mean2, add, sqrt, div]
    norm_shape = shape[axes[0]:]
    out, scale, bias = div.outputs[0], None, None
    mul = _affine(out, "Mul", norm_shape, rank)
    if mul:
        nodes.append(mul[0])
        out, scale = mul[0].outputs[0], mul[1]
    plus = _affine(out, "Add", norm_shape, rank)
    if plus:
        nodes.append(plus[0])
        out, bias = plus[0].outputs[0], plus[1]
    if static_shape(out) not in (None, shape):
        return None
    return x, out, nodes, scale, bias, axes[0], float(eps[1].reshape(-1)[0])


class FuseLayerNormPass(ir.passes.InPlacePass):
    """Recognise LayerNormalization (opset >= 17, or graphopt-domain with target_runtime='graphopt')."""

    def __init__(self, *, target_runtime: str = "onnx"):
        super().__init__()
        self.target_runtime = check_target_runtime(target_runtime, "pass 'fuse_layernorm'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opsets = dict(model.opset_imports)  # an exact opset upgrade is a modification too
        matches = []
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx"):
                    found = match_layernorm(node)
                    if found is not None:
                        matches.append((graph, *found))
        if not matches:
            return ir.passes.PassResult(model, modified=False)
        domain = choose_domain(model, "LayerNormalization", self.target_runtime)
        if domain is None:
            return ir.passes.PassResult(model, modified=False)
        fused = 0
        for graph, x, out, nodes, scale, bias, axis, eps in matches:
            node_domain = usable_in(graph, "LayerNormalization", domain, self.target_runtime)
            if node_domain is None:
                continue
            dtype = x.dtype.numpy()
            anchor = out.producer()
            norm = static_shape(x)[axis:]
            scale = np.ones(norm, dtype=dtype) if scale is None else scale.astype(dtype)
            inputs = [x, new_const(graph, scale, f"{anchor.name or 'ln'}_scale", anchor)]
            if bias is not None:
                inputs.append(new_const(graph, bias.astype(dtype), f"{anchor.name or 'ln'}_bias", anchor))
            ln = ir.node("LayerNormalization", inputs, {"axis": axis, "epsilon": eps}, domain=node_domain)
            graph.insert_before(anchor, ln)
            ln.outputs[0].shape, ln.outputs[0].type = out.shape, out.type
            replace_value(out, ln.outputs[0])
            remove_dead(graph, nodes)
            fused += 1
        return ir.passes.PassResult(model, modified=fused > 0 or dict(model.opset_imports) != opsets)

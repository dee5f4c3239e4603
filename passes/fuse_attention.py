"""Recognise scaled dot-product attention: Softmax(Q·Kᵀ·scale [+ mask])·V -> one Attention node.

Pattern, anchored at the Softmax (over the last axis):

    s = MatMul(Q', Kt')             Q' = Q, Q·c or Q/c (c a one-element constant); Kt' likewise
    s = s·c | s/c                   optional, folded into ``scale`` together with Q's
    s = s + mask                    optional (any value broadcastable to s)
    y = MatMul(Softmax(s), V)

``Kt`` must be a Transpose: when it swaps the last two axes, K is its input; otherwise the Transpose is
kept with its last two output axes swapped, producing K. Every intermediate must have one consumer.

Node contract (``graphopt.Attention``, version 1): inputs ``Q`` [..., Sq, D], ``K`` [..., Skv, D]
(not transposed), ``V`` [..., Skv, Dv], optional additive ``Mask`` broadcastable to [..., Sq, Skv];
attribute ``scale`` (float); output ``Y = softmax(Q·Kᵀ·scale + Mask, last axis)·V`` [..., Sq, Dv],
leading dims broadcast as in MatMul.

Emitted: ``graphopt.Attention`` when ``target_runtime="graphopt"``; the standard opset-23 ``Attention`` when
the model is already at opset >= 23 and Q, K, V are rank 4 (its [batch, heads, seq, head_dim] form).
The opset is never raised for attention, and with ``target_runtime="onnx"`` below opset 23 nothing fires.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.graphopt_ops import check_target_runtime, choose_domain, usable_in
from graphopt.passes.rewrite_utils import (
    GRAPHOPT_DOMAIN,
    binary_with_const,
    graphs_of,
    home,
    only_consumer,
    remove_dead,
    replace_value,
    static_shape,
)


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float, ir.Node | None]:
    """``value`` = ``y·c`` or ``y/c`` with one single-use node: (y, factor, node); else (value, 1, None)."""
    node = value.producer()
    for op, invert in (("Mul", False), ("Div", True)):
        hit = binary_with_const(node, (op,))
        if hit and hit[1].size == 1 and only_consumer(value) is not None:
            c = float(hit[1].reshape(-1)[0])
            if c != 0:
                return hit[0], (1.0 / c if invert else c), node
    return value, 1.0, None


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def match_attention(softmax: ir.Node):
    """(q, k_source, k_transpose, v, mask, scale, output, nodes) or None."""
    s = softmax.inputs[0]
    rank = _rank(s)
    if rank is None or rank < 2 or softmax.attributes.get_int("axis", -1) % rank != rank - 1:
        return None
    mm2 = only_consumer(softmax.outputs[0])
    if mm2 is None or mm2.op_type != "MatMul" or mm2.inputs[0] is not softmax.outputs[0]:
        return None
    nodes = [softmax, mm2]
    mask = None
    node = s.producer()
    if node is not None and node.op_type == "Add" and only_consumer(s) is softmax:
        a, b = node.inputs
        first = a.producer()
        inner, mask = (a, b) if first is not None and first.op_type in ("MatMul", "Mul", "Div") else (b, a)
        nodes.append(node)
        s = inner
    s, factor, scale_node = _strip_scale(s)
    if scale_node is not None:
        nodes.append(scale_node)
    mm1 = s.producer()
    if mm1 is None or mm1.op_type != "MatMul" or only_consumer(s) is None:
        return None
    nodes.append(mm1)
    q, q_factor, q_scale = _strip_scale(mm1.inputs[0])
    if q_scale is not None:
        nodes.append(q_scale)
    kt_value, k_factor, k_scale = _strip_scale(mm1.inputs[1])  # Q·c and Kᵀ·c: PyTorch's split scale
    kt = kt_value.producer()
    if kt is None or kt.op_type != "Transpose" or only_consumer(kt_value) is None:
        return None
    if k_scale is not None:
        nodes.append(k_scale)
    perm = list(kt.attributes.get_ints("perm", []))
    v = mm2.inputs[1]
    if len(perm) != rank or _rank(q) != rank or _rank(v) != rank:
        return None
    return q, kt, perm, v, mask, factor * q_factor * k_factor, mm2.outputs[0], nodes


class FuseAttentionPass(ir.passes.InPlacePass):
    """Recognise scaled dot-product attention (graphopt-domain, or opset-23 Attention at opset >= 23)."""

    def __init__(self, *, target_runtime: str = "onnx", float32_only: bool = False):
        super().__init__()
        self.target_runtime = check_target_runtime(target_runtime, "pass 'fuse_attention'")
        self.float32_only = float32_only  # compile at -O2: only what its fused float32 kernel computes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opsets = dict(model.opset_imports)  # an exact opset upgrade is a modification too
        fused = 0
        domain: str | None = "unset"
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or node.graph is not home(graph):
                    continue
                found = match_attention(node)
                if found is None:
                    continue
                q, kt, perm, v, mask, scale, out, nodes = found
                if self.float32_only and any(x is not None and x.dtype != ir.DataType.FLOAT for x in (q, v, mask)):
                    continue
                if domain == "unset":
                    domain = choose_domain(model, "Attention", self.target_runtime, may_upgrade=False)
                node_domain = domain
                if domain == "" and len(perm) != 4:  # opset-23 Attention takes rank-4 inputs only
                    node_domain = GRAPHOPT_DOMAIN if self.target_runtime == "graphopt" else None
                if node_domain == GRAPHOPT_DOMAIN:
                    model.opset_imports[GRAPHOPT_DOMAIN] = 1
                node_domain = usable_in(graph, "Attention", node_domain, self.target_runtime)
                if node_domain is None:
                    continue
                swap = list(range(len(perm) - 2)) + [len(perm) - 1, len(perm) - 2]
                if perm == swap:
                    k = kt.inputs[0]
                    nodes.append(kt)
                else:  # keep one Transpose, producing K instead of Kᵀ
                    new_perm = [perm[i] for i in swap]
                    kt.attributes["perm"] = ir.AttrInt64s("perm", new_perm)
                    k = kt.outputs[0]
                    src = static_shape(kt.inputs[0])
                    k.shape = ir.Shape([src[i] for i in new_perm]) if src is not None else None
                inputs = [q, k, v] + ([mask] if mask is not None else [])
                att = ir.node("Attention", inputs, {"scale": float(scale)}, domain=node_domain)
                graph.insert_before(out.producer(), att)
                att.outputs[0].shape, att.outputs[0].type = out.shape, out.type
                replace_value(out, att.outputs[0])
                remove_dead(graph, nodes)
                fused += 1
        return ir.passes.PassResult(model, modified=fused > 0 or dict(model.opset_imports) != opsets)

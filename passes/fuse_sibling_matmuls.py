"""Merge MatMuls that read the same input with constant weights into one wider MatMul and a Split.

A transformer layer projects one hidden state three times (query, key, value), each ``MatMul(x, W_i)``
with a constant ``[K, N_i]`` weight, most often followed by ``Add(., b_i)``. Three products of
``x`` with narrow weights read ``x`` three times and start three kernels; one product with the weights
side by side reads it once and gives the kernel three times the columns to tile and share between
cores (MiniLM's 384-column projections: 0.18 ms each on 2 cores, 0.34 ms for the 1152-column one).

    MatMul(x, W_1) [-> Add(., b_1)], ..., MatMul(x, W_n) [-> Add(., b_n)]
        ->  Split(Add(MatMul(x, [W_1 .. W_n]), [b_1 .. b_n]), axis=-1, split=[N_1 .. N_n])

Exact: every output column is the same dot product over ``K`` as before. A sibling takes part when
its weight is a constant float matrix with the group's ``K`` and dtype, or a constant weight-only
quantized one (``DequantizeLinear`` of int8/int4 codes per output column or per block of ``K``: codes,
scales and zero points go side by side too, the merged weight quantized exactly as its parts), and
its bias (if any) is a constant ``[N_i]`` (or ``[1.., N_i]``) Add that is the MatMul's only consumer;
siblings without a bias get zeros when others have one. A weight stored in an external file stays
out: the merged copy would be resident beside the file's pages (a model over 2 GB must compile within
1.3x its weights). ``_why_not`` says why a MatMul stayed out.

It fires only for graphopt's own compiler (``target_runtime="graphopt"``, what ``compile`` runs): ONNX
Runtime fuses attention itself from three separate projections, and a merged one would hide them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.graphopt_ops import check_target_runtime
from graphopt.passes.rewrite_utils import (const_array, graphs_of, home, new_const, only_consumer, opset_version,
                                           producer_op)

MIN_SIBLINGS = 2
MAX_COLUMNS = 1 << 16  # a merged weight wider than this gains nothing over its parts


def _bias(matmul: ir.Node, n: int) -> tuple[ir.Node | None, np.ndarray | None]:
    """(the Add after ``matmul``, its [n] bias) when the MatMul's one consumer adds a constant bias."""
    add = only_consumer(matmul.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    b = const_array(other)
    if b is None or b.size != n or b.shape[-1:] != (n,) or b.ndim > len(matmul.outputs[0].shape or ()):
        return None, None
    return add, b.reshape(n)


def _quantized(matmul: ir.Node):
    """``(DequantizeLinear, [codes, scales, zero points or None], its column axis)`` when the MatMul's weight
    is a constant ``[K, N]`` dequantized per column (``axis`` 1, scales ``[N]``) or per block of K
    (``axis`` 0, ``block_size``, scales ``[K / block, N]``) and read by this MatMul only; else None."""
    dq = producer_op(matmul.inputs[1], "DequantizeLinear")
    if dq is None or only_consumer(dq.outputs[0]) is not matmul:
        return None
    inputs = list(dq.inputs) + [None] * (3 - len(dq.inputs))
    q, scale, zp = (const_array(v) if v is not None else None for v in inputs)
    if q is None or scale is None or (inputs[2] is not None and zp is None) or q.ndim != 2:
        return None
    axis = dq.attributes.get_int("axis", 1) % 2
    block = dq.attributes.get_int("block_size", 0)
    per_column = axis == 1 and scale.shape == (q.shape[1],) and not block
    per_block = axis == 0 and block > 0 and scale.shape == (q.shape[0] // block, q.shape[1])
    if not (per_column or per_block) or (zp is not None and zp.shape != scale.shape):
        return None
    return dq, [q, scale, zp], scale.ndim - 1


def _kind(matmul: ir.Node):
    """What the MatMul's weight is, as siblings must share it, with its K: a float matrix's dtype, or a
    quantized one's codes/scale/zero-point dtypes and attributes; None when it is neither."""
    w = const_array(matmul.inputs[1])
    if w is not None:
        return (("float", w.dtype), w.shape[0]) if w.ndim == 2 and w.dtype.kind == "f" else None
    quantized = _quantized(matmul)
    if quantized is None:
        return None
    dq, (q, scale, zp), _ = quantized
    attrs = tuple(sorted((k, str(v.value)) for k, v in dq.attributes.items()))
    return ("quantized", q.dtype, scale.dtype, None if zp is None else zp.dtype, attrs), q.shape[0]


def _external(matmul: ir.Node) -> bool:
    """Whether the MatMul's weight (or the codes it dequantizes) is data in an external file."""
    w = matmul.inputs[1]
    dq = producer_op(w, "DequantizeLinear")
    return isinstance((dq.inputs[0] if dq is not None else w).const_value, ir.ExternalTensor)


def _why_not(matmul: ir.Node, k: int | None, kind) -> str | None:
    if _external(matmul):  # gen:gpt2-large: compile's peak RSS 1.20x -> 1.42x the weights with merged copies
        return "its weight is in an external file: a merged copy would stay resident beside the mapped file"
    got = _kind(matmul)
    if got is None:
        return "the weight is not a constant float matrix or a constant dequantized one"
    if k is not None and got != (kind, k):
        return f"weight {got[0][0]} K={got[1]} does not match the group's {kind[0]} K={k}"
    if matmul.outputs[0].is_graph_output():
        return "its output is a graph output"
    return None


class FuseSiblingMatMulsPass(ir.passes.InPlacePass):
    """Merge MatMuls that share their input and have constant weights (see the module docstring)."""

    def __init__(self, *, target_runtime: str = "onnx") -> None:
        super().__init__()
        self.target_runtime = check_target_runtime(target_runtime, "pass 'fuse_sibling_matmuls'")
        self.skipped: list[str] = []

    def _groups(self, graph) -> list[list[ir.Node]]:
        groups = []
        seen: set[int] = set()
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or id(node.inputs[0]) in seen:
                continue
            x = node.inputs[0]
            seen.add(id(x))
            members, k, kind = [], None, None
            for use in x.uses():
                mm = use.node
                if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx") or use.idx != 0 or mm.graph is not home(graph):
                    continue
                why = _why_not(mm, k, kind)
                if why is not None:
                    self.skipped.append(f"MatMul {mm.name}: {why}")
                    continue
                kind, k = _kind(mm)
                members.append(mm)
            if len(members) >= MIN_SIBLINGS:
                groups.append(members)
        return groups

    @staticmethod
    def _merged_weight(graph, weights: list, quantized: list, anchor: ir.Node, name: str) -> tuple[ir.Value, list]:
        """The merged weight and the nodes it needs: a constant of the float ``weights`` side by side, or
        (``quantized``, as ``_quantized`` gives them) a DequantizeLinear of the codes, scales and zero
        points side by side."""
        if quantized[0] is None:
            return new_const(graph, np.concatenate(weights, axis=1), f"{name}_merged_w", anchor), []
        dq, _, scale_axis = quantized[0]
        arrays = [np.concatenate([q[1][i] for q in quantized], axis=1 if i == 0 else scale_axis)
                  for i in range(3) if quantized[0][1][i] is not None]
        inputs = [new_const(graph, a, f"{name}_merged_{what}", anchor) for a, what in zip(arrays, ("q", "scale", "zp"))]
        merged = ir.node("DequantizeLinear", inputs, {k: v.value for k, v in dq.attributes.items()}, name=f"{name}_merged_dq")
        return merged.outputs[0], [merged]

    def _merge(self, graph, members: list[ir.Node], split_input: bool) -> bool:
        # a group is all float or all quantized (``_kind``): the weights, or the codes, scales and zero points
        weights = [const_array(mm.inputs[1]) for mm in members]
        quantized = [None] * len(members) if weights[0] is not None else [_quantized(mm) for mm in members]
        widths = [int((w if q is None else q[1][0]).shape[1]) for w, q in zip(weights, quantized)]
        if sum(widths) > MAX_COLUMNS:
            self.skipped.append(f"MatMul {members[0].name}: {sum(widths)} merged columns")
            return False
        biases = [_bias(mm, n) for mm, n in zip(members, widths)]
        with_bias = any(add is not None for add, _ in biases)
        dtype = next((b.dtype for _, b in biases if b is not None), np.float32)
        first = members[0]
        x = first.inputs[0]
        base = "+".join(mm.name or "MatMul" for mm in members)  # the merged nodes name their parts
        # the merged nodes go where the first sibling was: x is defined there, every consumer comes later
        anchor = min(members, key=lambda mm: list(graph).index(mm))
        w, nodes = self._merged_weight(graph, weights, quantized, anchor, first.name or "matmul")
        mm = ir.node("MatMul", [x, w], name=base)
        nodes.append(mm)
        out = mm.outputs[0]
        if with_bias:
            bias = np.concatenate([b if b is not None else np.zeros(n, dtype)
                                   for (_, b), n in zip(biases, widths)]).astype(dtype)
            add = ir.node("Add", [out, new_const(graph, bias, f"{first.name or 'matmul'}_merged_b", anchor)],
                          name=f"{base}_bias")
            nodes.append(add)
            out = add.outputs[0]
        sizes = np.asarray(widths, np.int64)
        if split_input:  # opset 13 on: the sizes are an input
            split = ir.node("Split", [out, new_const(graph, sizes, "split_sizes", anchor)], {"axis": -1},
                            num_outputs=len(members), name=f"{base}_split")
        else:
            split = ir.node("Split", [out], {"axis": -1, "split": widths}, num_outputs=len(members),
                            name=f"{base}_split")
        nodes.append(split)
        graph.insert_before(anchor, nodes)
        for member, (add, _), piece, q in zip(members, biases, split.outputs, quantized):
            old = (add if add is not None else member).outputs[0]
            name = old.name
            old.name = None
            piece.name, piece.shape, piece.type = name, old.shape, old.type
            ir.convenience.replace_all_uses_with(old, piece, replace_graph_outputs=True)
            for dead in (add, member, None if q is None else q[0]):
                if dead is not None:
                    graph.remove(dead, safe=True)
        return True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.skipped = []
        if self.target_runtime != "graphopt":
            return ir.passes.PassResult(model, modified=False)
        split_input = (opset_version(model) or 13) >= 13
        merged = 0
        for graph in list(graphs_of(model)):
            for members in self._groups(graph):
                merged += self._merge(graph, members, split_input)
        return ir.passes.PassResult(model, modified=merged > 0)

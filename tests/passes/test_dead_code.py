"""DeadCodeEliminationPass: unused nodes, initializers, functions and opsets go; inputs and captures stay."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.dead_code import DeadCodeEliminationPass

HEADER = '<ir_version: 10, opset_import: ["" : 17, "custom" : 1]>\n'


def test_unused_nodes_initializers_opsets_and_functions_go():
    text = HEADER + """g (float[4] x, float[4] unused_input) => (float[4] y) <float[4] w = {1, 2, 3, 4}, float[4] dead_w = {1, 1, 1, 1}> {
        y = Add(x, w)
        d1 = Mul(x, dead_w)
        d2 = Relu(d1)
    }"""
    proto = onnx.parser.parse_model(text)
    fn = helper.make_function("custom", "Unused", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    proto.functions.append(fn)
    model = ir.serde.deserialize_model(proto)
    result = apply_and_compare(DeadCodeEliminationPass(), model)
    assert result.modified
    assert dict(ops(result.model)) == {"Add": 1}
    assert set(result.model.graph.initializers) == {"w"}
    assert [v.name for v in result.model.graph.inputs] == ["x", "unused_input"]
    assert not result.model.functions
    assert "custom" not in result.model.opset_imports


def test_nothing_dead_is_not_modified():
    model = model_from_text(HEADER.replace(', "custom" : 1', "") + "g (float[4] x) => (float[4] y) { a = Relu(x) \n y = Neg(a) }")
    result = apply_and_compare(DeadCodeEliminationPass(), model)
    assert not result.modified
    assert sum(ops(result.model).values()) == 2


def test_subgraph_capture_is_a_use_and_dead_subgraph_nodes_go():
    text = HEADER.replace(', "custom" : 1', "") + """g (float[4] x, bool c) => (float[4] y) {
        cap = Relu(x)
        y = If(c) <then_branch = t () => (float[4] o) { o = Neg(cap) \n dead = Abs(cap) },
                    else_branch = e () => (float[4] o) { o = Identity(cap) }>
    }"""
    model = model_from_text(text)
    feeds = {"x": np.arange(4, dtype=np.float32) - 2, "c": np.array(True)}
    result = apply_and_compare(DeadCodeEliminationPass(), model, feeds=feeds)
    assert result.modified
    counts = ops(result.model)
    assert counts["Relu"] == 1 and counts["Neg"] == 1 and counts["Abs"] == 0


def test_unused_optional_output_is_trimmed_and_reported():
    model = model_from_text(HEADER.replace(', "custom" : 1', "") +
                            "g (float[4] x) => (float[4] y) { a, mask = Dropout(x) \n y = Relu(a) }")
    result = apply_and_compare(DeadCodeEliminationPass(), model)
    assert result.modified
    dropout = next(n for n in result.model.graph if n.op_type == "Dropout")
    assert len(dropout.outputs) == 1


def test_values_used_only_by_a_removed_if_branch_go():
    """A pass that inlines or drops an If leaves its branches holding uses of outer values."""
    model = model_from_text(
        HEADER + """g (float[4] x, bool c) => (float[4] y) {
            n = Neg(x)
            r = Relu(x)
            y = If(c) <then_branch = t () => (float[4] a) { a = Identity(r) },
                       else_branch = e () => (float[4] b) { b = Identity(n) }>
        }"""
    )
    graph = model.graph
    if_node = graph[2]
    relu_out = graph[1].outputs[0]
    if_node.outputs[0].replace_all_uses_with(relu_out, replace_graph_outputs=True)  # "c is True"
    graph.remove(if_node, safe=True)
    assert graph[0].outputs[0].uses()  # the dropped else branch still reads Neg's output
    result = DeadCodeEliminationPass()(model)
    assert result.modified and dict(ops(result.model)) == {"Relu": 1}

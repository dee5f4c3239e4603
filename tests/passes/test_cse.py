"""CommonSubexpressionEliminationPass: identical constants and pure computations merge, others don't."""

from __future__ import annotations

import numpy as np

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.cse import CommonSubexpressionEliminationPass

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def test_duplicated_chain_and_constants_merge():
    model = model_from_text(HEADER + """g (float[2,4] x) => (float[2,4] y) {
        c1 = Constant<value = float[1] {2.0}>()
        c2 = Constant<value = float[1] {2.0}>()
        a1 = Mul(x, c1)
        a2 = Mul(x, c2)
        b1 = Relu(a1)
        b2 = Relu(a2)
        s1 = Softmax<axis = 1>(b1)
        s2 = Softmax<axis = 1>(b2)
        y = Add(s1, s2)
    }""")
    result = apply_and_compare(CommonSubexpressionEliminationPass(), model)
    assert result.modified
    assert dict(ops(result.model)) == {"Mul": 1, "Relu": 1, "Softmax": 1, "Add": 1}
    assert len(result.model.graph.initializers) == 1  # the two constants became one initializer


def test_different_attributes_or_random_ops_do_not_merge():
    model = model_from_text(HEADER + """g (float[2,4] x) => (float[2,4] y) {
        s1 = Softmax<axis = 0>(x)
        s2 = Softmax<axis = 1>(x)
        r1 = RandomUniformLike(x)
        r2 = RandomUniformLike(x)
        a = Add(s1, s2)
        r = Add(r1, r2)
        z = Mul(r, a)
        y = Sub(z, z)
    }""")
    result = CommonSubexpressionEliminationPass(lift_constants=False)(model)
    assert not result.modified
    assert ops(result.model)["Softmax"] == 2 and ops(result.model)["RandomUniformLike"] == 2


def test_two_graph_outputs_keep_both_names():
    model = model_from_text(HEADER + """g (float[2,4] x) => (float[2,4] y1, float[2,4] y2) {
        y1 = Relu(x)
        y2 = Relu(x)
    }""")
    result = apply_and_compare(CommonSubexpressionEliminationPass(), model)
    assert [v.name for v in result.model.graph.outputs] == ["y1", "y2"]
    assert not result.modified


def test_identical_if_nodes_merge_and_different_ones_do_not():
    body = "<then_branch = t () => (float[2] o) {{ o = {op}(x) }}, else_branch = e () => (float[2] o) {{ o = Neg(x) }}>"
    model = model_from_text(HEADER + f"""g (float[2] x, bool c) => (float[2] y) {{
        a = If(c) {body.format(op="Relu")}
        b = If(c) {body.format(op="Relu")}
        d = If(c) {body.format(op="Abs")}
        s = Add(a, b)
        y = Add(s, d)
    }}""")
    feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(True)}
    result = apply_and_compare(CommonSubexpressionEliminationPass(), model, feeds=feeds)
    assert result.modified
    assert sum(1 for n in result.model.graph if n.op_type == "If") == 2


def test_in_subgraph():
    model = model_from_text(HEADER + """g (float[2] x, bool c) => (float[2] y) {
        y = If(c) <then_branch = t () => (float[2] o) { a = Relu(x) \n b = Relu(x) \n o = Add(a, b) },
                   else_branch = e () => (float[2] o) { o = Neg(x) }>
    }""")
    feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(True)}
    result = apply_and_compare(CommonSubexpressionEliminationPass(), model, feeds=feeds)
    assert result.modified and ops(result.model)["Relu"] == 1

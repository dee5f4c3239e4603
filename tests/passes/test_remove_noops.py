"""RemoveNoopsPass: each no-op disappears, numerics unchanged, graph outputs keep their names."""

from __future__ import annotations

import numpy as np
import pytest

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.remove_noops import RemoveNoopsPass

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _model(body: str, inits: str = "", x: str = "float[2,3,4] x", y: str = "float[2,3,4] y"):
    return model_from_text(HEADER + f"g ({x}) => ({y}) {inits} {{ {body} }}")


NOOPS = {
    "Identity": "a = Identity(x)",
    "Dropout": "a = Dropout(x)",
    "Cast": "a = Cast<to = 1>(x)",
    "Reshape": "s = Constant<value = int64[3] {2, 0, -1}>() \n a = Reshape(x, s)",
    "Transpose": "a = Transpose<perm = [0, 1, 2]>(x)",
    "Pad": "p = Constant<value = int64[6] {0, 0, 0, 0, 0, 0}>() \n a = Pad(x, p)",
    "Mul": "one = Constant<value = float[1] {1.0}>() \n a = Mul(one, x)",
    "Div": "one = Constant<value = float {1.0}>() \n a = Div(x, one)",
    "Add": "z = Constant<value = float[1,4] {0.0, 0.0, 0.0, 0.0}>() \n a = Add(x, z)",
    "Sub": "z = Constant<value = float {0.0}>() \n a = Sub(x, z)",
    "Slice": ("s = Constant<value = int64[2] {0, 0}>() \n e = Constant<value = int64[2] {9223372036854775807, 4}>()"
              "\n ax = Constant<value = int64[2] {0, 2}>() \n a = Slice(x, s, e, ax)"),
    "Expand": "s = Constant<value = int64[2] {1, 4}>() \n a = Expand(x, s)",
    "Concat": "a = Concat<axis = 1>(x)",
    "Squeeze": "a = Squeeze(x)",
}


@pytest.mark.parametrize("op", sorted(NOOPS))
def test_noop_is_removed(op):
    # the no-op feeds a Relu so that it is an inner node; a second model has it as the graph output
    model = _model(NOOPS[op] + "\n y = Relu(a)")
    result = apply_and_compare(RemoveNoopsPass(), model)
    assert result.modified
    assert op not in ops(result.model)
    assert ops(result.model)["Relu"] == 1


@pytest.mark.parametrize("op", ["Identity", "Mul", "Transpose"])
def test_graph_output_keeps_its_name(op):
    model = _model("r = Relu(x)\n" + NOOPS[op].replace("(x", "(r").replace(", x)", ", r)").replace("a =", "y ="))
    result = apply_and_compare(RemoveNoopsPass(), model)
    assert result.modified and op not in ops(result.model)
    assert result.model.graph.outputs[0].name == "y"
    assert result.model.graph.outputs[0].producer().op_type == "Relu"


NOT_NOOPS = {
    "Cast to another type": ("a = Cast<to = 10>(x) \n y = Cast<to = 1>(a)", "Cast"),
    "Reshape to another shape": ("s = Constant<value = int64[2] {6, 4}>() \n a = Reshape(x, s) \n"
                                 "t = Constant<value = int64[3] {2, 3, 4}>() \n y = Reshape(a, t)", "Reshape"),
    "Transpose that moves axes": ("a = Transpose<perm = [1, 0, 2]>(x) \n y = Transpose<perm = [1, 0, 2]>(a)", "Transpose"),
    "Mul by 2": ("c = Constant<value = float {2.0}>() \n y = Mul(x, c)", "Mul"),
    "Add of zeros that broadcasts": ("z = Constant<value = float[2,2,3,4] {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,"
                                     "0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,"
                                     "0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,"
                                     "0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}>() \n"
                                     "a = Add(x, z) \n y = ReduceSum<keepdims = 0>(a, zz)", "Add"),
    "Slice that drops elements": ("s = Constant<value = int64[1] {1}>() \n e = Constant<value = int64[1] {4}>() \n"
                                  "ax = Constant<value = int64[1] {2}>() \n a = Slice(x, s, e, ax) \n"
                                  "p = Constant<value = int64[6] {0, 0, 1, 0, 0, 0}>() \n y = Pad(a, p)", "Slice"),
    "Sub of x from 0": ("z = Constant<value = float {0.0}>() \n y = Sub(z, x)", "Sub"),
}


@pytest.mark.parametrize("case", sorted(NOT_NOOPS))
def test_not_a_noop_stays(case):
    body, op = NOT_NOOPS[case]
    if "zz" in body:
        body = "zz = Constant<value = int64[1] {0}>() \n" + body
    before = ops(_model(body))
    result = apply_and_compare(RemoveNoopsPass(), _model(body))
    assert ops(result.model)[op] == before[op]
    assert not result.modified


def test_training_dropout_and_used_mask_stay():
    body = ("r = Constant<value = float {0.5}>() \n t = Constant<value = bool {1}>() \n"
            "a = Dropout(x, r, t) \n b, m = Dropout(x) \n mf = Cast<to = 1>(m) \n s = Add(a, b) \n y = Add(s, mf)")
    model = _model(body)
    result = RemoveNoopsPass()(model)
    assert ops(result.model)["Dropout"] == 2
    assert not result.modified


def test_output_fed_by_input_is_kept():
    model = _model("y = Identity(x)")
    result = RemoveNoopsPass()(model)
    assert not result.modified
    assert ops(result.model)["Identity"] == 1


def test_in_subgraph():
    text = HEADER + """g (float[2,3,4] x, bool c) => (float[2,3,4] y) {
        y = If(c) <then_branch = t () => (float[2,3,4] o) { i = Identity(x) \n o = Relu(i) },
                    else_branch = e () => (float[2,3,4] o) { o = Neg(x) }>
    }"""
    model = model_from_text(text)
    feeds = {"x": np.ones((2, 3, 4), np.float32), "c": np.array(True)}
    result = apply_and_compare(RemoveNoopsPass(), model, feeds=feeds)
    assert result.modified and ops(result.model)["Identity"] == 0

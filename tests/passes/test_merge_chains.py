"""MergeChainsPass: Transpose and Reshape chains merge, Squeeze/Unsqueeze pairs cancel."""

from __future__ import annotations

import numpy as np

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.merge_chains import MergeChainsPass

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _model(body, x="float[2,3,4] x", y="float[2,3,4] y", **initializers):
    return model_from_text(HEADER + f"g ({x}) => ({y}) {{ {body} }}", **initializers)


def test_transposes_compose_into_one():
    model = _model("a = Transpose<perm = [1, 0, 2]>(x) \n b = Transpose<perm = [0, 2, 1]>(a) \n y = Relu(b)",
                   y="float[3,4,2] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and ops(result.model)["Transpose"] == 1


def test_inverse_transposes_vanish():
    model = _model("a = Transpose<perm = [2, 0, 1]>(x) \n b = Transpose<perm = [1, 2, 0]>(a) \n y = Relu(b)")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and ops(result.model)["Transpose"] == 0


def test_reshape_chain_becomes_one_reshape():
    model = _model("s1 = Constant<value = int64[2] {6, 4}>() \n a = Reshape(x, s1) \n"
                   "s2 = Constant<value = int64[2] {4, -1}>() \n b = Reshape(a, s2) \n"
                   "f = Flatten<axis = 1>(b) \n y = Relu(f)", y="float[4,6] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified
    counts = ops(result.model)
    assert counts["Reshape"] + counts["Flatten"] == 1


def test_squeeze_unsqueeze_pair_cancels():
    model = _model("ax = Constant<value = int64[1] {1}>() \n a = Unsqueeze(x, ax) \n b = Squeeze(a, ax) \n y = Relu(b)")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and ops(result.model)["Squeeze"] == 0 and ops(result.model)["Unsqueeze"] == 0


def test_graph_output_name_kept_when_chain_cancels():
    model = _model("r = Relu(x) \n a = Transpose<perm = [1, 0, 2]>(r) \n y = Transpose<perm = [1, 0, 2]>(a)")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and ops(result.model)["Transpose"] == 0
    assert result.model.graph.outputs[0].name == "y"


def test_reshape_with_zero_after_reshape_and_shared_producer_stay():
    # a 0 in the second target copies a dim of the first Reshape's output: no merge without static shapes
    model = model_from_text(HEADER + """g (float[N,12] x) => (float[N,3,4] y, float[N,2,6] z) {
        s1 = Constant<value = int64[3] {0, 3, 4}>()
        a = Reshape(x, s1)
        s2 = Constant<value = int64[3] {0, 3, -1}>()
        y = Reshape(a, s2)
        t = Transpose<perm = [0, 2, 1]>(a)
        s3 = Constant<value = int64[3] {0, 2, 6}>()
        z = Reshape(t, s3)
    }""")
    result = MergeChainsPass()(model)
    assert not result.modified
    assert ops(result.model)["Reshape"] == 3


def test_channel_shuffle_becomes_one_gather():
    model = _model("s1 = Constant<value = int64[5] {1, 2, 3, 2, 2}>() \n a = Reshape(x, s1) \n"
                   "t = Transpose<perm = [0, 2, 1, 3, 4]>(a) \n s2 = Constant<value = int64[4] {1, 6, 2, 2}>() \n"
                   "b = Reshape(t, s2) \n y = Relu(b)", x="float[1,6,2,2] x", y="float[1,6,2,2] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and dict(ops(result.model)) == {"Gather": 1, "Relu": 1}


def test_reshape_transpose_that_mixes_axes_stays():
    model = _model("t = Transpose<perm = [0, 2, 1]>(x) \n s = Constant<value = int64[3] {2, 3, 4}>() \n"
                   "b = Reshape(t, s) \n y = Relu(b)")
    result = apply_and_compare(MergeChainsPass(), model)
    assert not result.modified and ops(result.model)["Transpose"] == 1


def test_global_pool_and_flatten_become_reduce_mean():
    model = _model("p = AveragePool<kernel_shape = [3, 4]>(x) \n f = Flatten(p) \n y = Relu(f)",
                   x="float[2,5,3,4] x", y="float[2,5] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and dict(ops(result.model)) == {"ReduceMean": 1, "Relu": 1}
    model = _model("p = GlobalMaxPool(x) \n s = Constant<value = int64[2] {2, 5}>() \n f = Reshape(p, s) \n y = Relu(f)",
                   x="float[2,5,3,4] x", y="float[2,5] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and dict(ops(result.model)) == {"ReduceMax": 1, "Relu": 1}


def test_padded_or_partial_pool_stays():
    model = _model("p = AveragePool<kernel_shape = [3, 3]>(x) \n f = Flatten(p) \n y = Relu(f)",
                   x="float[2,5,3,4] x", y="float[2,10] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert not result.modified and ops(result.model)["AveragePool"] == 1


def test_same_unary_op_moves_after_concat():
    model = _model("a = LeakyRelu<alpha = 0.2>(x) \n b = LeakyRelu<alpha = 0.2>(x2) \n y = Concat<axis = 1>(a, b)",
                   x="float[2,3,4] x, float[2,5,4] x2", y="float[2,8,4] y")
    result = apply_and_compare(MergeChainsPass(), model)
    assert result.modified and dict(ops(result.model)) == {"Concat": 1, "LeakyRelu": 1}
    assert result.model.graph.outputs[0].name == "y"


def test_different_unary_ops_or_attributes_stay_before_concat():
    for body in ("a = Relu(x) \n b = Sigmoid(x2) \n y = Concat<axis = 1>(a, b)",
                 "a = LeakyRelu<alpha = 0.2>(x) \n b = LeakyRelu<alpha = 0.1>(x2) \n y = Concat<axis = 1>(a, b)",
                 "a = Relu(x) \n b = Relu(x2) \n y = Concat<axis = 1>(a, b) \n z = Neg(a)"):
        outputs = "float[2,8,4] y" + (", float[2,3,4] z" if "z =" in body else "")
        model = _model(body, x="float[2,3,4] x, float[2,5,4] x2", y=outputs)
        result = apply_and_compare(MergeChainsPass(), model)
        assert not result.modified


def test_activation_of_a_conv_stays_before_concat():
    # a runtime computes Conv+Relu in one pass; Relu after the Concat would be a pass of its own
    w = np.random.default_rng(3).standard_normal((4, 3, 1, 1)).astype(np.float32)
    model = _model("c1 = Conv(x, w) \n c2 = Conv(x2, w) \n a = Relu(c1) \n b = Relu(c2) \n y = Concat<axis = 1>(a, b)",
                   x="float[1,3,4,4] x, float[1,3,4,4] x2", y="float[1,8,4,4] y", w=w)
    result = apply_and_compare(MergeChainsPass(), model)
    assert not result.modified and ops(result.model)["Relu"] == 2

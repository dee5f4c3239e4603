"""MergeChainsPass: Transpose and Reshape chains merge, Squeeze/Unsqueeze pairs cancel."""

from __future__ import annotations

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.merge_chains import MergeChainsPass

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _model(body, x="float[2,3,4] x", y="float[2,3,4] y"):
    return model_from_text(HEADER + f"g ({x}) => ({y}) {{ {body} }}")


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

"""FoldBatchNormPass: BN folds into Conv/ConvTranspose/Gemm/MatMul, and only where it is exact."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.passes.fold_batchnorm import FoldBatchNormPass
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def _arr(name, shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(np.abs(a) + 0.1 if positive else a, name)


def _bn_inits(c, prefix="bn"):
    return [_arr(f"{prefix}_s", [c]), _arr(f"{prefix}_b", [c]), _arr(f"{prefix}_m", [c]),
            _arr(f"{prefix}_v", [c], positive=True)]


def _bn(x, y, prefix="bn"):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], epsilon=1e-3, name=prefix)


def _model(nodes, inputs, outputs, inits):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _ops(model):
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _apply(model):
    feeds = random_inputs(model, seed=1)
    before = run_onnxruntime(model, feeds)
    p = FoldBatchNormPass()
    result = p(model)
    verify(result.model)
    after = run_onnxruntime(result.model, feeds)
    assert list(after) == list(before)  # graph output names kept
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4)
    return result, p


def test_conv_with_and_without_bias():
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        _bn("c1", "y1", "bn1"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], strides=[2, 2]),
        _bn("c2", "y2", "bn2"),
    ]
    inits = [_arr("w1", [4, 3, 3, 3]), _arr("b1", [4]), _arr("w2", [5, 3, 1, 1]),
             *_bn_inits(4, "bn1"), *_bn_inits(5, "bn2")]
    model = _model(nodes, [("x", [1, 3, 8, 8])], [("y1", None), ("y2", None)], inits)
    result, _ = _apply(model)
    assert result.modified
    assert _ops(result.model) == {"Conv": 2}
    assert all(len(n.inputs) == 3 for n in result.model.graph)
    old = {f"bn{i}_{k}" for i in (1, 2) for k in "sbmv"} | {"w1", "b1", "w2"}
    assert not old & set(result.model.graph.initializers)  # BN params and old weights are gone
    assert not FoldBatchNormPass()(result.model).modified


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_channel_axis_and_group(group):
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=group, strides=[2, 2]), _bn("c", "y")]
    # W: [C_in, C_out/group, kH, kW] -> C_out = 3 * group
    inits = [_arr("w", [4, 3, 2, 2]), *_bn_inits(3 * group)]
    model = _model(nodes, [("x", [1, 4, 5, 5])], [("y", None)], inits)
    result, _ = _apply(model)
    assert result.modified and _ops(result.model) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_and_beta(trans_b):
    w_shape = [6, 5] if trans_b else [5, 6]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=0.7, beta=0.5), _bn("g", "y")]
    inits = [_arr("w", w_shape), _arr("c", [6]), *_bn_inits(6)]
    model = _model(nodes, [("x", [3, 5])], [("y", [3, 6])], inits)
    result, _ = _apply(model)
    assert result.modified and _ops(result.model) == {"Gemm": 1}
    (gemm,) = result.model.graph
    assert "beta" not in gemm.attributes


def test_matmul_with_and_without_bias_add():
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        _bn("a1", "y1", "bn1"),
        helper.make_node("MatMul", ["x", "w2"], ["m2"]),
        _bn("m2", "y2", "bn2"),
    ]
    inits = [_arr("w1", [5, 6]), _arr("b1", [6]), _arr("w2", [5, 4]), *_bn_inits(6, "bn1"), *_bn_inits(4, "bn2")]
    model = _model(nodes, [("x", [3, 5])], [("y1", [3, 6]), ("y2", [3, 4])], inits)
    result, _ = _apply(model)
    assert result.modified
    assert _ops(result.model) == {"MatMul": 2, "Add": 2}


def test_shared_weight_gets_new_initializers():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]), _bn("c1", "y1", "bn1"),
        helper.make_node("Conv", ["x", "w"], ["c2"]), _bn("c2", "y2", "bn2"),
    ]
    inits = [_arr("w", [4, 3, 1, 1]), *_bn_inits(4, "bn1"), *_bn_inits(4, "bn2")]
    model = _model(nodes, [("x", [1, 3, 4, 4])], [("y1", None), ("y2", None)], inits)
    result, _ = _apply(model)
    assert result.modified and _ops(result.model) == {"Conv": 2}
    w1, w2 = (n.inputs[1] for n in result.model.graph)
    assert w1 is not w2 and "w" not in result.model.graph.initializers


def test_negative_cases_leave_the_graph_alone():
    nodes = [
        # Conv output also read by Relu: folding would change what Relu sees.
        helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y1", "bn1"), helper.make_node("Relu", ["c"], ["r"]),
        # BN mean comes from a graph input: not constant.
        helper.make_node("Conv", ["x", "w2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "bn2_s", "bn2_b", "mean_in", "bn2_v"], ["y2"], name="bn2"),
        # A lone BN after Sigmoid: left as it is.
        helper.make_node("Sigmoid", ["x"], ["s"]), _bn("s", "y3", "bn3"),
    ]
    inits = [_arr("w", [4, 3, 1, 1]), _arr("w2", [4, 3, 1, 1]), *_bn_inits(4, "bn1"), *_bn_inits(4, "bn2"),
             *_bn_inits(3, "bn3")]
    model = _model(nodes, [("x", [1, 3, 4, 4]), ("mean_in", [4])],
                   [("y1", None), ("r", None), ("y2", None), ("y3", None)], inits)
    result, p = _apply(model)
    assert not result.modified
    assert _ops(result.model) == {"Conv": 2, "BatchNormalization": 3, "Relu": 1, "Sigmoid": 1}
    assert "other consumers" in p.last_skipped["bn1"]
    assert "not all constant" in p.last_skipped["bn2"]
    assert "not produced by" in p.last_skipped["bn3"]


def test_inside_if_branch():
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "t")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
          helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    g = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [_arr("w", [3, 3, 1, 1]), *_bn_inits(3)])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32), "cond": np.array(True)}
    before = run_onnxruntime(model, feeds)
    result = FoldBatchNormPass()(model)
    verify(result.model)
    assert result.modified and _ops(result.model) == {"If": 1, "Conv": 1, "Relu": 1}
    np.testing.assert_allclose(run_onnxruntime(result.model, feeds)["y"], before["y"], rtol=1e-4, atol=1e-5)

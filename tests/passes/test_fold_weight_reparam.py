"""FoldWeightReparamPass: weight-norm and constant chains on weights become one initializer."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.passes.fold_weight_reparam import FoldWeightReparamPass
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def _t(name, shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, inits, inputs, outputs, opset=18):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph)


def _apply(model):
    feeds = random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)
    p = FoldWeightReparamPass()
    result = p(model)
    verify(result.model)
    after = run_onnxruntime(result.model, feeds)
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-4, atol=1e-5)
    return result, p


def test_weight_norm_reduce_l2_on_conv():
    nodes = [
        helper.make_node("ReduceL2", ["v", "axes"], ["norm"], keepdims=1),
        helper.make_node("Div", ["v", "norm"], ["vn"]),
        helper.make_node("Mul", ["g", "vn"], ["w"]),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [_t("v", [8, 3, 3, 3]), _i64("axes", [1, 2, 3]), _t("g", [8, 1, 1, 1]), _t("b", [8])]
    model = _model(nodes, inits, [("x", [1, 3, 6, 6])], [("y", [1, 8, 6, 6])])
    result, _ = _apply(model)
    assert result.modified
    assert _ops(result.model) == {"Conv": 1}
    assert sorted(result.model.graph.initializers) == ["b", "w_folded"]
    assert not FoldWeightReparamPass()(result.model).modified


def test_weight_norm_sqrt_reduce_sum_on_matmul():
    nodes = [
        helper.make_node("Mul", ["v", "v"], ["vv"]),
        helper.make_node("ReduceSum", ["vv", "axes"], ["ss"], keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm"]),
        helper.make_node("Div", ["v", "norm"], ["vn"]),
        helper.make_node("Mul", ["vn", "g"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    # MatMul weight [K, N]: output channels on axis 1, the norm is over axis 0.
    inits = [_t("v", [6, 5]), _i64("axes", [0]), _t("g", [1, 5])]
    model = _model(nodes, inits, [("x", [2, 6])], [("y", [2, 5])])
    result, _ = _apply(model)
    assert result.modified and _ops(result.model) == {"MatMul": 1}


def test_cast_transpose_scale_chain_on_gemm():
    nodes = [
        helper.make_node("Cast", ["w64"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0]),
        helper.make_node("Mul", ["wt", "scale"], ["w"]),
        helper.make_node("Gemm", ["x", "w"], ["y"]),
    ]
    inits = [_t("w64", [4, 6], np.float64), numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    model = _model(nodes, inits, [("x", [2, 6])], [("y", [2, 4])])
    result, _ = _apply(model)
    assert result.modified and _ops(result.model) == {"Gemm": 1}
    (gemm,) = result.model.graph
    assert gemm.inputs[1].const_value.dtype == ir.DataType.FLOAT


def test_not_folded_non_constant_growth_or_quantized():
    nodes = [
        # scale comes from a graph input: not constant
        helper.make_node("Mul", ["v1", "s_in"], ["w1"]),
        helper.make_node("MatMul", ["x", "w1"], ["y1"]),
        # [6,1] + [1,5] -> [6,5]: the folded weight would be bigger than any input
        helper.make_node("Add", ["col", "row"], ["w2"]),
        helper.make_node("MatMul", ["x", "w2"], ["y2"]),
        # quantized weight: DequantizeLinear is never folded away
        helper.make_node("DequantizeLinear", ["q", "qs", "qz"], ["w3"]),
        helper.make_node("MatMul", ["x", "w3"], ["y3"]),
    ]
    inits = [_t("v1", [6, 5]), _t("col", [6, 1]), _t("row", [1, 5]),
             numpy_helper.from_array(RNG.integers(-5, 5, (6, 5)).astype(np.int8), "q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "qs"), numpy_helper.from_array(np.array(0, np.int8), "qz")]
    model = _model(nodes, inits, [("x", [2, 6]), ("s_in", [1])],
                   [("y1", [2, 5]), ("y2", [2, 5]), ("y3", [2, 5])])
    result, p = _apply(model)
    assert not result.modified
    assert _ops(result.model) == {"Mul": 1, "MatMul": 3, "Add": 1, "DequantizeLinear": 1}
    assert any("larger than its inputs" in why for why in p.last_skipped.values())


def test_shared_chain_value_is_kept_for_its_other_user():
    nodes = [
        helper.make_node("Mul", ["v", "k"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
    ]
    inits = [_t("v", [6, 5]), numpy_helper.from_array(np.array(3.0, np.float32), "k")]
    model = _model(nodes, inits, [("x", [2, 6])], [("y", [2, 5]), ("s", [])])
    result, _ = _apply(model)
    assert result.modified
    assert _ops(result.model) == {"Mul": 1, "MatMul": 1, "ReduceSum": 1}
    mm = next(n for n in result.model.graph if n.op_type == "MatMul")
    assert mm.inputs[1].const_value is not None

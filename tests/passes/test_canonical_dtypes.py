"""CanonicalDtypesPass: fp64/fp16 weights that are only ever cast to fp32 are stored as fp32."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.passes.canonical_dtypes import CanonicalDtypesPass
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def _model(nodes, inits, outputs=("y",), x_dtype=TensorProto.FLOAT):
    vi = [helper.make_tensor_value_info("x", x_dtype, [2, 4])]
    vo = [helper.make_empty_tensor_value_info(n) for n in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _apply(model):
    feeds = random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)
    p = CanonicalDtypesPass()
    result = p(model)
    verify(result.model)
    after = run_onnxruntime(result.model, feeds)
    for k in before:
        assert after[k].dtype == before[k].dtype
        np.testing.assert_array_equal(after[k], before[k])  # exact: same numbers, bit for bit
    return result, p


def _ops(model):
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


@pytest.mark.parametrize("np_dtype", [np.float64, np.float16])
def test_weight_cast_to_fp32_becomes_fp32(np_dtype):
    w = RNG.standard_normal((4, 3)).astype(np_dtype) * 3.3
    nodes = [
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "wf"], ["m"]),
        helper.make_node("Cast", ["w"], ["wf2"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["wf2"], ["s"], keepdims=0),
        helper.make_node("Add", ["m", "s"], ["y"]),
    ]
    result, p = _apply(_model(nodes, [numpy_helper.from_array(w, "w")]))
    assert result.modified and p.converted == ["w"]
    assert _ops(result.model) == {"MatMul": 1, "ReduceSum": 1, "Add": 1}
    stored = result.model.graph.initializers["w"]
    assert stored.dtype == ir.DataType.FLOAT and stored.const_value.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(stored.const_value.numpy(), w.astype(np.float32))
    assert not CanonicalDtypesPass()(result.model).modified


def test_constant_node_fp16():
    w = RNG.standard_normal((2, 4)).astype(np.float16)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "wf"], ["y"]),
    ]
    result, _ = _apply(_model(nodes, []))
    assert result.modified and _ops(result.model) == {"Constant": 1, "Mul": 1}
    const = next(iter(result.model.graph)).attributes["value"].as_tensor()
    assert const.dtype == ir.DataType.FLOAT


def test_model_that_computes_in_fp64_or_fp16_is_left_alone():
    w64 = RNG.standard_normal((2, 4))
    w16 = RNG.standard_normal((2, 4)).astype(np.float16)
    nodes = [
        # fp64 compute: the weight meets the input in fp64, only the result is cast.
        helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["x64", "w64"], ["p64"]),
        helper.make_node("Cast", ["p64"], ["p"], to=TensorProto.FLOAT),
        # fp16 weight used both in fp16 compute and through a Cast: not every use is a Cast.
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["x16", "w16"], ["q16"]),
        helper.make_node("Cast", ["w16"], ["w16f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["p", "w16f"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w64, "w64"), numpy_helper.from_array(w16, "w16")]
    result, p = _apply(_model(nodes, inits, outputs=("y", "q16")))
    assert not result.modified and p.converted == []
    assert result.model.graph.initializers["w64"].const_value.dtype == ir.DataType.DOUBLE
    assert _ops(result.model)["Cast"] == 4


def test_fp32_to_fp16_cast_is_not_narrowed_and_overridable_weight_stays():
    w = RNG.standard_normal((2, 4)).astype(np.float32)
    w64 = RNG.standard_normal((2, 4))
    nodes = [
        helper.make_node("Cast", ["w"], ["w16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["w16"], ["wb"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["w_in"], ["wi"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "wb"], ["a"]),
        helper.make_node("Add", ["a", "wi"], ["y"]),
    ]
    model = _model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w64, "w_in")])
    w_in = model.graph.initializers["w_in"]  # also a graph input: the user may override it
    model.graph.inputs.append(w_in)
    result, _ = _apply(model)
    assert not result.modified and _ops(result.model)["Cast"] == 3

"""ParameterSharingPass: identical constants merge whatever their storage; overridable inputs stay."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.passes.parameter_sharing import ParameterSharingPass
from graphopt.core.verify import verify

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


def _model(nodes, inits, inputs=(("x", [3, 4]),), outputs=("y",), graph_inputs_extra=()):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vi += list(graph_inputs_extra)
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _apply(model, feeds=None):
    feeds = feeds or random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)
    result = ParameterSharingPass()(model)
    verify(result.model)
    after = run_onnxruntime(result.model, feeds)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    return result


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph)


def test_identical_initializers_merge():
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"]),
        helper.make_node("Mul", ["a", "w2"], ["b"]),
        helper.make_node("Sub", ["b", "w3"], ["y"]),
    ]
    w3 = W.copy()
    w3[0, 0] += 1e-7  # one ulp-ish away: different bytes, must stay
    inits = [numpy_helper.from_array(W, "w1"), numpy_helper.from_array(W.copy(), "w2"),
             numpy_helper.from_array(w3, "w3")]
    result = _apply(_model(nodes, inits))
    assert result.modified
    assert sorted(result.model.graph.initializers) == ["w1", "w3"]
    add, mul, _ = result.model.graph
    assert mul.inputs[1] is add.inputs[1]
    assert not ParameterSharingPass()(result.model).modified


def test_constant_nodes_and_storage_forms_merge():
    nodes = [
        helper.make_node("Constant", [], ["c_tensor"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Constant", [], ["c_float"], value_float=2.0),
        helper.make_node("Constant", [], ["c_w"], value=numpy_helper.from_array(W)),
        helper.make_node("Mul", ["x", "c_tensor"], ["a"]),
        helper.make_node("Mul", ["a", "c_float"], ["b"]),
        helper.make_node("Add", ["b", "c_w"], ["d"]),
        helper.make_node("Add", ["d", "w_init"], ["e"]),
        helper.make_node("Mul", ["e", "two_init"], ["y"]),
    ]
    inits = [numpy_helper.from_array(W, "w_init"), numpy_helper.from_array(np.array(2.0, np.float32), "two_init")]
    result = _apply(_model(nodes, inits))
    assert result.modified
    # Every constant has an initializer twin: all three Constant nodes go, initializers are kept.
    assert _ops(result.model) == {"Mul": 3, "Add": 2}
    assert sorted(result.model.graph.initializers) == ["two_init", "w_init"]


def test_int_forms_and_different_dtypes():
    nodes = [
        helper.make_node("Constant", [], ["s1"], value_ints=[3, 4]),
        helper.make_node("Constant", [], ["s2"], value=numpy_helper.from_array(np.array([3, 4], np.int64))),
        helper.make_node("Constant", [], ["s3"], value=numpy_helper.from_array(np.array([3, 4], np.int32))),
        helper.make_node("Reshape", ["x", "s1"], ["a"]),
        helper.make_node("Reshape", ["a", "s2"], ["b"]),
        helper.make_node("Cast", ["s3"], ["s3f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["s3f"], ["r"], keepdims=1),
        helper.make_node("Add", ["b", "r"], ["y"]),
    ]
    result = _apply(_model(nodes, []))
    assert result.modified
    assert _ops(result.model)["Constant"] == 2  # int64 pair merged, int32 kept apart
    r1, r2 = (n for n in result.model.graph if n.op_type == "Reshape")
    assert r1.inputs[1] is r2.inputs[1] and r1.inputs[1].name == "s1"  # the earliest is kept


def test_overridable_inputs_and_outputs_are_not_merged():
    nodes = [helper.make_node("Add", ["x", "w_in"], ["a"]), helper.make_node("Add", ["a", "w"], ["y"]),
             helper.make_node("Identity", ["x"], ["x2"])]
    inits = [numpy_helper.from_array(W, "w_in"), numpy_helper.from_array(W.copy(), "w")]
    w_in = helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [3, 4])
    model = _model(nodes, inits, outputs=("y", "x2"), graph_inputs_extra=[w_in])
    result = _apply(model, feeds={"x": W})
    assert not result.modified
    assert sorted(result.model.graph.initializers) == ["w", "w_in"]


def test_subgraph_constants_merge_within_their_graph():
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["k1"], value_float=3.0),
         helper.make_node("Constant", [], ["k2"], value_float=3.0),
         helper.make_node("Mul", ["x", "k1"], ["t0"]), helper.make_node("Add", ["t0", "k2"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    model = _model(nodes, [], graph_inputs_extra=[cond])
    result = _apply(model, feeds={"x": W, "cond": np.array(True)})
    assert result.modified
    branch = next(iter(result.model.graph)).attributes["then_branch"].as_graph()
    assert [n.op_type for n in branch] == ["Constant", "Mul", "Add"]


def _near_model(rng, delta: float):
    """x -> MatMul(w0) -> MatMul(w1) -> MatMul(w2) -> y, w1 = w0 + delta noise, w2 unrelated."""
    w0 = rng.standard_normal((8, 8)).astype(np.float32)
    w1 = w0 + (rng.uniform(-1, 1, (8, 8)) * delta).astype(np.float32)
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["a", "w1"], ["b"]),
             helper.make_node("MatMul", ["b", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "near", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(w, n) for w, n in ((w0, "w0"), (w1, "w1"), (w2, "w2"))])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), w0, w1


def test_tolerance_merges_near_equal_weights_and_reports_the_cost():
    rng = np.random.default_rng(3)
    model, w0, w1 = _near_model(rng, 1e-3)
    exact = ParameterSharingPass()
    assert not exact(model).modified  # off by default: near-equal is not equal
    feeds = random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)["y"]
    p = ParameterSharingPass(tolerance=1e-3)
    assert p(model).modified
    verify(model)
    assert set(model.graph.initializers) == {"w0", "w2"}
    ((kept, removed, diff, nbytes),) = p.shared
    assert (kept, removed, nbytes) == ("w0", "w1", 256)
    assert diff == float(np.max(np.abs(w1.astype(np.float64) - w0)))
    assert diff <= 1e-3 * np.max(np.abs(w0))
    after = run_onnxruntime(model, feeds)["y"]
    assert 0 < np.max(np.abs(after - before)) <= 1e-2 * np.max(np.abs(before))  # changed, by little


def test_tolerance_is_relative_and_keeps_what_differs_more():
    rng = np.random.default_rng(3)
    model, w0, _ = _near_model(rng, 0.5)
    p = ParameterSharingPass(tolerance=1e-3)
    assert not p(model).modified and p.shared == []


def test_weight_digests_are_kept_with_the_tensor():
    import hashlib

    from graphopt.passes.rewrite_utils import tensor_digest

    tensor = ir.tensor(W, name="w")
    assert tensor_digest(tensor) == hashlib.sha256(W.tobytes()).digest()
    assert tensor.meta["graphopt.sha256"] == tensor_digest(tensor)  # the second pass reads it, not the bytes
    assert tensor_digest(ir.tensor(W + 1, name="w")) != tensor_digest(tensor)  # a new tensor is hashed anew

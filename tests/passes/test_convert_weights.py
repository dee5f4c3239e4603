"""ConvertWeightsPass: float32 weights stored as fp16/bf16 with a Cast back, compute stays float32."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.core.errors import UnsupportedError, UsageError
from graphopt.models import resolve
from graphopt.models.inputs import light_reference_data
from graphopt.passes.convert_weights import ConvertWeightsPass, convert_weights, rounding_loss
from graphopt.passes.graphopt_ops import run_ort
from graphopt.core.verify import verify

from rendered_text import LINES, ctc_decode, render_line

RNG = np.random.default_rng(0)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _model(opset=17):
    """x[2,64] -> MatMul(w) -> Add(b) -> LayerNorm(scale, bias) -> MatMul(w_big) -> MatMul(w_tiny) -> y."""
    w = RNG.standard_normal((64, 64)).astype(np.float32) * 0.1
    b = RNG.standard_normal(64).astype(np.float32)
    scale = 1 + 0.1 * RNG.standard_normal(64).astype(np.float32)
    shift = 0.1 * RNG.standard_normal(64).astype(np.float32)
    w_big = RNG.standard_normal((64, 32)).astype(np.float32)
    w_big[3, 4] = 1e5  # overflows fp16
    w_tiny = (RNG.standard_normal((32, 32)) * 1e-6).astype(np.float32)  # fp16 denormals: 4% error
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm0"),
        helper.make_node("Add", ["m", "b"], ["a"], name="add0"),
        helper.make_node("LayerNormalization", ["a", "scale", "shift"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w_big"], ["m1"], name="mm1"),
        helper.make_node("MatMul", ["m1", "w_tiny"], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in
             dict(w=w, b=b, scale=scale, shift=shift, w_big=w_big, w_tiny=w_tiny).items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _stored_dtypes(model):
    return {k: v.const_value.dtype for k, v in model.graph.initializers.items()}


@pytest.mark.parametrize("dtype, half", [("fp16", ir.DataType.FLOAT16), ("bf16", ir.DataType.BFLOAT16)])
def test_weights_stored_half_except_by_rule_and_loss(dtype, half):
    model = _model()
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model, feeds)[0]
    p = ConvertWeightsPass(dtype)
    result = p(model)
    verify(result.model)
    stored = _stored_dtypes(result.model)
    assert stored[f"w__{dtype}"] == half and stored[f"b__{dtype}"] == half
    # LayerNormalization's scale and bias stay fp32 by the rule table
    assert stored["scale"] == stored["shift"] == ir.DataType.FLOAT
    assert "LayerNormalization" in p.kept["scale"]
    if dtype == "fp16":  # 1e5 overflows fp16, 1e-6 values lose 4% as denormals; bf16 holds both
        assert stored["w_big"] == stored["w_tiny"] == ir.DataType.FLOAT
        assert "range" in p.kept["w_big"] and "relative error" in p.kept["w_tiny"]
    else:
        assert stored[f"w_big__{dtype}"] == stored[f"w_tiny__{dtype}"] == half
    casts = [n for n in result.model.graph if n.op_type == "Cast"]
    assert len(casts) == len(p.converted) and all(n.attributes.get_int("to") == TensorProto.FLOAT for n in casts)
    # the graph still computes in float32 (the consumers see the original names) and ORT runs it
    assert result.model.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert {n.inputs[1].name for n in result.model.graph if n.op_type == "MatMul"} == {"w", "w_big", "w_tiny"}
    after = run_ort(result.model, feeds)[0]
    assert after.dtype == np.float32
    assert _cosine(after, before) > (0.9999 if dtype == "fp16" else 0.999)
    assert not np.array_equal(after, before)  # weights were really rounded


def test_keep_float32_by_op_type_and_node_name():
    p = ConvertWeightsPass("fp16", keep_float32=("Add", "mm0"))
    model = p(_model()).model
    stored = _stored_dtypes(model)
    assert stored["w"] == stored["b"] == ir.DataType.FLOAT
    assert "keep_float32" in p.kept["w"] and "keep_float32" in p.kept["b"]
    assert not p.converted  # the rest is kept by the rules
    with pytest.raises(UsageError, match="NotAnOp"):
        ConvertWeightsPass("fp16", keep_float32=("NotAnOp",))(_model())
    with pytest.raises(UsageError, match="fp8"):
        ConvertWeightsPass("fp8")


def _matmul(opset):
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(np.random.default_rng(opset).standard_normal((64, 64)).astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


def test_bf16_needs_opset_13_and_refuses_clearly():
    model = convert_weights(_matmul(11), dtype="bf16")  # upgraded exactly
    assert model.opset_imports[""] == 13 and _stored_dtypes(model)["w__bf16"] == ir.DataType.BFLOAT16
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    assert _cosine(run_ort(model, {"x": x})[0], run_ort(_matmul(11), {"x": x})[0]) > 0.99
    with pytest.raises(UnsupportedError, match="opset 9"):
        convert_weights(_matmul(9), dtype="bf16")
    fp16 = convert_weights(_matmul(9), dtype="fp16")  # Cast from fp16 exists at opset 9
    assert fp16.opset_imports[""] == 9 and _stored_dtypes(fp16)["w__fp16"] == ir.DataType.FLOAT16


def test_rounding_loss_measures_overflow_and_denormals():
    assert rounding_loss(np.array([70000.0, 1.0], np.float32), "fp16")[0]
    assert not rounding_loss(np.array([70000.0, 1.0], np.float32), "bf16")[0]
    assert rounding_loss(np.full(8, 1e-7, np.float32), "fp16")[1] > 0.05
    assert rounding_loss(RNG.standard_normal(1000).astype(np.float32), "fp16")[1] < 3e-4


def _saved_size(model, path):
    graphopt.save(model, path)
    return os.path.getsize(path)


def test_fp16_halves_resnet50_and_keeps_its_output(tmp_path):
    name = "light:resnet50"
    feeds = light_reference_data(resolve(name))[0]
    model = graphopt.optimize(name, opt_level=2).model
    size = _saved_size(model, tmp_path / "fp32.onnx")
    before = run_ort(model, feeds)[0]
    half = convert_weights(model, dtype="fp16")
    assert _saved_size(half, tmp_path / "fp16.onnx") < 0.51 * size
    assert _cosine(run_ort(half, feeds)[0], before) >= 0.999


def test_fp16_halves_ppocr_rec_and_reads_the_same_text(tmp_path):
    name = "rapidocr:rec"
    model = graphopt.optimize(name, opt_level=2, input_shapes=["x:1,3,48,320"]).model
    chars = model.metadata_props["character"].splitlines()
    lines = [render_line(t) for t in LINES]
    before = [run_ort(model, {"x": x})[0] for x in lines]
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    size = _saved_size(model, tmp_path / "fp32.onnx")
    p = ConvertWeightsPass("fp16")
    half = p(model).model
    assert sum(v.const_value.nbytes for v in half.graph.initializers.values()) < 0.501 * weight_bytes
    assert _saved_size(half, tmp_path / "fp16.onnx") < 0.53 * size  # the rest is the graph itself
    # kept fp32: scalars and one LayerNorm bias whose small values lose 0.14% as fp16 denormals
    reasons = collections.Counter(why.split(" ")[0] for why in p.kept.values())
    assert reasons["relative"] == 1 and set(reasons) == {"fewer", "relative"}
    after = [run_ort(half, {"x": x})[0] for x in lines]
    assert min(_cosine(a, b) for a, b in zip(after, before)) >= 0.999
    texts = [ctc_decode(b, chars) for b in before]
    assert texts == [t.replace(" ", "") for t in LINES]  # the fp32 model reads every line
    assert [ctc_decode(a, chars) for a in after] == texts


def test_compute_fp16_keeps_normalization_and_interface_float32():
    model = _model()
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model, feeds)[0]
    p = ConvertWeightsPass("fp16", compute="fp16")
    result = p(model)
    verify(result.model)
    graph = result.model.graph
    dtype = {o.name: o.dtype for n in graph for o in n.outputs}
    assert graph.inputs[0].dtype == graph.outputs[0].dtype == ir.DataType.FLOAT and graph.outputs[0].name == "y"
    assert dtype["m"] == dtype["a"] == ir.DataType.FLOAT16  # MatMul and Add compute in fp16
    ln = graph.node("ln")
    assert ln.outputs[0].dtype == ir.DataType.FLOAT and ln.inputs[0].producer().op_type == "Cast"
    assert {v.name for v in ln.inputs[1:]} == {"scale", "shift"} and "scale" in p.kept  # fp32 weights
    # w_big overflows fp16 and w_tiny loses 4%: their MatMuls stay float32
    assert dtype["m1"] == dtype["y"] == ir.DataType.FLOAT
    assert set(p.converted) == {"w", "b"}
    after = run_ort(result.model, feeds)[0]
    assert after.dtype == np.float32 and _cosine(after, before) > 0.999
    with pytest.raises(UsageError, match="compute"):
        ConvertWeightsPass("bf16", compute="fp16")


def test_compute_fp16_ppocr_rec_reads_the_same_text():
    model = graphopt.optimize("rapidocr:rec", opt_level=2, input_shapes=["x:1,3,48,320"]).model
    chars = model.metadata_props["character"].splitlines()
    lines = [render_line(t) for t in LINES]
    before = [run_ort(model, {"x": x})[0] for x in lines]
    half = convert_weights(model, dtype="fp16", compute="fp16")
    verify(half)
    counts = collections.Counter(o.dtype for n in half.graph for o in n.outputs)
    assert counts[ir.DataType.FLOAT16] > 3 * counts[ir.DataType.FLOAT]  # most of the graph computes in fp16
    after = [run_ort(half, {"x": x})[0] for x in lines]
    assert all(a.dtype == np.float32 for a in after)
    assert min(_cosine(a, b) for a, b in zip(after, before)) >= 0.999
    assert [ctc_decode(a, chars) for a in after] == [ctc_decode(b, chars) for b in before]


def test_compute_fp16_retargets_constants_and_keeps_fixed_float_inputs():
    """Resize's scales are tensor(float) at every opset: they stay fp32; ConstantOfShape's default
    (float32 zeros) and Cast(to=FLOAT) are retargeted to fp16."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["zeros"], name="zeros"),
             helper.make_node("Cast", ["k"], ["kf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["r", "zeros"], ["z"]),
             helper.make_node("Mul", ["z", "kf"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                                       helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32), "k": np.array([3], np.int64)}
    before = run_ort(model, feeds)[0]
    half = convert_weights(model, dtype="fp16", compute="fp16")
    verify(half)
    assert half.graph.node("resize").inputs[2].dtype == ir.DataType.FLOAT
    assert half.graph.node("resize").outputs[0].dtype == ir.DataType.FLOAT16
    assert half.graph.node("zeros").attributes["value"].as_tensor().dtype == ir.DataType.FLOAT16
    assert half.graph.node("cast").attributes.get_int("to") == TensorProto.FLOAT16
    np.testing.assert_allclose(run_ort(half, feeds)[0], before, rtol=1e-3, atol=1e-3)


def test_compute_fp16_leaves_a_constant_that_overflows_float32():
    g = helper.make_graph([helper.make_node("Constant", [], ["big"], name="big",
                                            value=numpy_helper.from_array(np.full(4, 1e6, np.float32))),
                           helper.make_node("Mul", ["x", "big"], ["m"], name="mul"),
                           helper.make_node("Relu", ["m"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = convert_weights(ir.serde.deserialize_model(helper.make_model(g)), dtype="fp16", compute="fp16")
    assert model.graph.node("big").outputs[0].dtype == model.graph.node("mul").outputs[0].dtype == ir.DataType.FLOAT
    assert model.graph.node("relu").outputs[0].dtype == ir.DataType.FLOAT16
    x = np.array([1e-3, -2e-3, 3e-3, 0.0], np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], np.maximum(x * 1e6, 0), rtol=1e-3)

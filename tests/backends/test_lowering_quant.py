"""Quantized-op lowering: conformance cases and ONNX Runtime comparisons (exact integer outputs)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import check_against_ort, make_model, run_case, select_cases  # noqa: E402

F, U8, I8, I32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger"}
@pytest.mark.parametrize("case", select_cases(QUANT_OPS), ids=lambda c: c.name)
def test_conformance(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype,axis", [(U8, None), (I8, 1), (TensorProto.INT16, 0)])
def test_quantize_dequantize_roundtrip_against_ort(dtype, axis):
    """Per-tensor and per-axis scales; values at .5 boundaries exercise round-half-to-even and saturation."""
    np_t = {U8: np.uint8, I8: np.int8, TensorProto.INT16: np.int16}[dtype]
    shape = [3, 4, 5]
    n = shape[axis] if axis is not None else 1
    scale = (_rng(1).uniform(0.01, 0.2, n) if axis is not None else np.array(0.05)).astype(np.float32)
    zp = (_rng(2).integers(0, 20, n) if axis is not None else np.array(7)).astype(np_t)
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    opset = 21 if dtype == TensorProto.INT16 else 13
    model = make_model(nodes, [("x", F, shape)], [("q", dtype, None), ("y", F, None)], {"s": scale, "z": zp}, opset=opset)
    x = _rng(3).uniform(-30, 30, shape).astype(np.float32)
    x.reshape(-1)[:6] = [0.025, 0.075, -0.025, 1e6, -1e6, 0.125]  # ties and saturation
    check_against_ort(model, {"x": x})


def test_qlinear_conv_per_channel_with_bias_against_ort():
    w = _rng(1).integers(-60, 60, (6, 2, 3, 3)).astype(np.int8)
    inits = {"xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8), "w": w,
             "ws": _rng(2).uniform(0.005, 0.02, 6).astype(np.float32), "wz": np.zeros(6, np.int8),
             "ys": np.array(0.05, np.float32), "yz": np.array(100, np.uint8),
             "b": _rng(3).integers(-500, 500, 6).astype(np.int32)}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            group=2, strides=[2, 1], pads=[1, 1, 0, 1])
    model = make_model([node], [("x", U8, [2, 4, 7, 6])], [("y", U8, None)], inits, opset=13)
    check_against_ort(model, {"x": _rng(4).integers(0, 255, (2, 4, 7, 6)).astype(np.uint8)})


def test_qlinear_matmul_batched_against_ort():
    inits = {"as": np.array(0.03, np.float32), "az": np.array(3, np.int8), "b": _rng(1).integers(-128, 127, (5, 7)).astype(np.int8),
             "bs": np.array(0.01, np.float32), "bz": np.array(-2, np.int8),
             "ys": np.array(0.2, np.float32), "yz": np.array(-5, np.int8)}
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    model = make_model([node], [("a", I8, [2, 3, 5])], [("y", I8, None)], inits, opset=13)
    check_against_ort(model, {"a": _rng(2).integers(-128, 127, (2, 3, 5)).astype(np.int8)})


def test_matmul_integer_per_column_zero_point_against_ort():
    inits = {"b": _rng(1).integers(0, 255, (6, 4)).astype(np.uint8), "az": np.array(12, np.uint8),
             "bz": _rng(2).integers(0, 255, 4).astype(np.uint8)}
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    model = make_model([node], [("a", U8, [3, 6])], [("y", I32, None)], inits, opset=13)
    check_against_ort(model, {"a": _rng(3).integers(0, 255, (3, 6)).astype(np.uint8)})


def test_dynamic_quantize_linear_against_ort():
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    model = make_model([node], [("x", F, [4, 9])], [("y", U8, None), ("s", F, None), ("z", U8, None)], opset=13)
    check_against_ort(model, {"x": _rng(5).uniform(-3, 7, (4, 9)).astype(np.float32)})


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_weight_only_blockwise_matmul_compiles_and_matches_ort(bits, symmetric):
    """int4/uint4 constants of block-wise DequantizeLinear (weight-only quantization) are held one value a
    byte and dequantized in the compiled code: the bundle matches ORT on the same quantized model."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    import graphopt
    from graphopt.passes.quantize_weights import quantize_weights

    rng = _rng(3)
    # 1.3 MB as float32: past -O2's 1 MiB folding bound, so the DequantizeLinear reaches the compiled code
    w = (rng.standard_normal((512, 640)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F, [4, 512])], [helper.make_tensor_value_info("y", F, [4, 640])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    quantize_weights(model, bits=bits, block_size=32, symmetric=symmetric)
    proto = ir.serde.serialize_model(model)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no int8 MatMulNBits rewrite
    expected = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    got = graphopt.compile(model, target="x86")(x)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x @ w).max() > 0  # the weights really were quantized


# ------------------------------------------------------------ dynamic quantization: ORT's exact semantics


def _dql_ranges() -> dict[str, np.ndarray]:
    """Inputs of DynamicQuantizeLinear that reach every branch of its definition, each [6, 10]."""
    rng = _rng(11)
    ties = np.arange(60, dtype=np.float32).reshape(6, 10) * 4.0 + 1.5  # 1.5, 5.5, ... 237.5
    ties.reshape(-1)[0], ties.reshape(-1)[-1] = 0.0, 255.0  # range [0, 255]: scale exactly 1
    zp_tie = rng.uniform(-2.5, 252.5, (6, 10)).astype(np.float32)
    zp_tie.reshape(-1)[:2] = [-2.5, 252.5]  # scale 1, zero point round(2.5) = 2 (half to even)
    huge = rng.uniform(-1, 1, (6, 10)).astype(np.float32)
    huge.reshape(-1)[:2] = [1e30, -3e29]
    return {
        "mixed": rng.uniform(-3, 7, (6, 10)).astype(np.float32),
        "positive": rng.uniform(0.5, 4, (6, 10)).astype(np.float32),
        "negative": rng.uniform(-9, -0.25, (6, 10)).astype(np.float32),
        "constant_positive": np.full((6, 10), 3.0, np.float32),
        "constant_negative": np.full((6, 10), -0.7, np.float32),
        "zeros": np.zeros((6, 10), np.float32),  # empty range: ORT's scale is 1, zero point 0
        "ties": ties,
        "zero_point_tie": zp_tie,
        "huge": huge,
        "float_max": np.array([3.4e38, -3.4e38] + [1.0] * 58, np.float32).reshape(6, 10),  # range overflows to inf
        "denormal": np.full((6, 10), 1e-40, np.float32),
    }


def test_dynamic_quantize_linear_adversarial_ranges_against_ort():
    """Scale, zero point and values equal ORT's bit for bit over positive, negative, constant, all-zero
    (scale 1, not 0/0), tie-rounding, huge and denormal inputs (one node per range, one compile)."""
    ranges = _dql_ranges()
    nodes = [helper.make_node("DynamicQuantizeLinear", [k], [f"{k}_y", f"{k}_s", f"{k}_z"]) for k in ranges]
    outputs = [(f"{k}_{o}", t, None) for k in ranges for o, t in (("y", U8), ("s", F), ("z", U8))]
    model = make_model(nodes, [(k, F, [6, 10]) for k in ranges], outputs, opset=13)
    got = check_against_ort(model, ranges)
    assert got["ties_s"] == 1.0 and got["zero_point_tie_z"] == 2
    assert got["zeros_s"] == 1.0 and got["zeros_z"] == 0 and not got["zeros_y"].any()
    assert not (got["ties_y"].reshape(-1)[1:-1] % 2).any()  # every k + 0.5 went to its even neighbour


def _mmi_model(a_type, b_type, a_shape, b_shape, b_zp_shape):
    az = np.array(3 if a_type == U8 else -4, {U8: np.uint8, I8: np.int8}[a_type])
    bz = _rng(7).integers(0 if b_type == U8 else -128, 128, b_zp_shape).astype({U8: np.uint8, I8: np.int8}[b_type])
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    return make_model([node], [("a", a_type, a_shape), ("b", b_type, b_shape)], [("y", I32, None)],
                      {"az": az, "bz": bz}, opset=13), az, bz


def _int_values(elem_type, shape, seed):
    lo, hi = (0, 256) if elem_type == U8 else (-128, 128)
    x = _rng(seed).integers(lo, hi, shape)
    x.reshape(-1)[:2] = [lo, hi - 1]  # both extremes of the type
    return x.astype(np.uint8 if elem_type == U8 else np.int8)


@pytest.mark.parametrize("a_type,b_type", [(U8, U8), (U8, I8), (I8, U8), (I8, I8)], ids=["u8u8", "u8i8", "i8u8", "i8i8"])
@pytest.mark.parametrize("b_zp_shape", [(), (5,)], ids=["zp_scalar", "zp_per_column"])
def test_matmul_integer_types_and_zero_points_against_ort(a_type, b_type, b_zp_shape):
    """uint8/int8 on either side, scalar or per-column zero point of b, a batched 3-D a: int32 exact."""
    model, _, _ = _mmi_model(a_type, b_type, [2, 3, 7], [7, 5], b_zp_shape)
    check_against_ort(model, {"a": _int_values(a_type, (2, 3, 7), 1), "b": _int_values(b_type, (7, 5), 2)})


def test_matmul_integer_per_row_zero_point_of_a():
    """A per-row zero point of a (ONNX allows it; ORT rejects it): exact against the int64 product."""
    from graphopt.backends.lowering.testing import run_lowered

    az = np.array([0, 255, 17, 128], np.uint8)
    bz = np.array(-3, np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    model = make_model([node], [("a", U8, [4, 9]), ("b", I8, [9, 6])], [("y", I32, None)], {"az": az, "bz": bz}, opset=13)
    a, b = _int_values(U8, (4, 9), 3), _int_values(I8, (9, 6), 4)
    want = (a.astype(np.int64) - az[:, None]) @ (b.astype(np.int64) - bz)
    np.testing.assert_array_equal(run_lowered(model, {"a": a, "b": b})["y"], want.astype(np.int32))


@pytest.mark.parametrize("x_type,w_type", [(U8, U8), (U8, I8), (I8, I8)], ids=["u8u8", "u8i8", "i8i8"])
def test_conv_integer_against_ort(x_type, w_type):
    """ConvInteger with zero points, padding (which holds the input's zero point), stride and groups."""
    np_w = np.uint8 if w_type == U8 else np.int8
    inits = {"w": _int_values(w_type, (4, 3, 3, 3), 5), "xz": np.array(9 if x_type == U8 else -2, np.uint8 if x_type == U8 else np.int8),
             "wz": np.array(4, np_w)}
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 2, 1, 0], strides=[2, 1], group=2)
    model = make_model([node], [("x", x_type, [1, 6, 7, 8])], [("y", I32, None)], inits, opset=13)
    check_against_ort(model, {"x": _int_values(x_type, (1, 6, 7, 8), 6)})


def test_conv_integer_per_channel_weight_zero_point():
    """Per-output-channel weight zero points (ONNX allows them, ORT's kernel does not): against ONNX's reference."""
    from onnx.reference import ReferenceEvaluator

    from graphopt.backends.lowering.testing import run_lowered

    inits = {"w": _int_values(U8, (3, 2, 3, 3), 8), "xz": np.array(100, np.uint8), "wz": np.array([0, 128, 255], np.uint8)}
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])
    model = make_model([node], [("x", U8, [1, 2, 5, 6])], [("y", I32, None)], inits, opset=13)
    x = _int_values(U8, (1, 2, 5, 6), 9)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run_lowered(model, {"x": x})["y"], want)


def _dynamic_linear_model(k: int, n: int, seed: int):
    """x -> DynamicQuantizeLinear -> MatMulInteger(int8 weight, per-column zero point) -> Cast -> Mul(scales):
    the layer ONNX Runtime's quantize_dynamic and flan-t5's export write."""
    rng = _rng(seed)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=F),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y"])]
    inits = {"w": w, "wz": rng.integers(-3, 4, n).astype(np.int8), "ws": rng.uniform(1e-3, 4e-3, n).astype(np.float32)}
    return make_model(nodes, [("x", F, [1, 16, k])], [("y", F, None), ("xq", U8, None)], inits, opset=13)


def test_dynamic_quantized_linear_compiled_matches_ort():
    """The whole dynamic-int8 layer through graphopt.compile (its integer schedules included) equals ORT:
    identical quantized activations, products exact, only the float rescale may differ by an ulp."""
    import onnx_ir as ir
    import onnxruntime as ort

    import graphopt

    model = _dynamic_linear_model(256, 96, 12)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    compiled = graphopt.compile(ir.serde.deserialize_model(model), target="x86")
    for x in (_rng(13).standard_normal((1, 16, 256)) * 3, _rng(14).uniform(0.1, 2, (1, 16, 256)), np.zeros((1, 16, 256))):
        x = x.astype(np.float32)
        want_y, want_q = sess.run(None, {"x": x})
        got = compiled(x)
        np.testing.assert_array_equal(np.asarray(got["xq"]), want_q)
        np.testing.assert_allclose(np.asarray(got["y"]), want_y, rtol=1e-6, atol=1e-6)


def test_int8_dynamic_quantized_model_compiled_matches_ort():
    """graphopt's own --quantize int8-dynamic output (DynamicQuantizeLinear + MatMulInteger + Gemm bias),
    compiled, against ORT running the same quantized model."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    import graphopt
    from graphopt.passes.quantize_dynamic import QuantizeDynamicPass

    rng = _rng(21)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
         helper.make_node("MatMul", ["x", "w2"], ["y2"])], "g",
        [helper.make_tensor_value_info("x", F, [8, 64])],
        [helper.make_tensor_value_info("h", F, [8, 48]), helper.make_tensor_value_info("y2", F, [8, 40])],
        [onnx.numpy_helper.from_array((rng.standard_normal((48, 64)) * 0.1).astype(np.float32), "w1"),
         onnx.numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b1"),
         onnx.numpy_helper.from_array((rng.standard_normal((64, 40)) * 0.1).astype(np.float32), "w2")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    qpass = QuantizeDynamicPass()
    qpass(model)
    assert len(qpass.quantized) == 2
    proto = ir.serde.serialize_model(model)
    assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == 2
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    compiled = graphopt.compile(model, target="x86")
    x = (rng.standard_normal((8, 64)) * 2).astype(np.float32)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    got = compiled(x)
    for name in ("h", "y2"):
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,w,float_path", [(518, 127, True), (519, 127, False), (600, -128, False)],
                         ids=["at_2_24", "past_2_24", "far_past"])
def test_matmul_integer_of_constant_weights_exact_in_float32_or_int32(k, w, float_path):
    """A constant int8 weight whose partial sums stay below 2**24 (255 * column sum of |w|) runs as a float32
    matmul (the float schedules serve it); past the bound it stays int32. Both exact, at the extremes:
    |a - a_zp| = 255 everywhere, every weight at the type's end."""
    from graphopt.backends.lowering.convert import lower
    import onnx_ir as ir

    inits = {"b": np.full((k, 8), w, np.int8), "az": np.array(255, np.uint8)}
    node = helper.make_node("MatMulInteger", ["a", "b", "az"], ["y"])
    model = make_model([node], [("a", U8, [4, k])], [("y", I32, None)], inits, opset=13)
    got = check_against_ort(model, {"a": np.zeros((4, k), np.uint8)})
    assert int(np.abs(got["y"]).max()) == 255 * k * abs(w)
    script = lower(ir.serde.deserialize_model(model)).mod["main"].script()
    assert ('out_dtype="float32"' in script) == float_path

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

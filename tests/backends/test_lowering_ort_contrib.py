"""ONNX Runtime's com.microsoft FusedConv and FusedGemm: lowered vs ONNX Runtime running them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.backends.lowering.testing import run_lowered
from graphopt.core.errors import UnsupportedError
from graphopt.passes.graphopt_ops import run_ort

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _model(node, inputs, out_shape, inits):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", F, out_shape)], initializer=list(inits),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(proto)


def _const(name, shape):
    return onnx.numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _check(model, feeds):
    got = run_lowered(model, feeds)["y"]
    want = run_ort(model, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


CONV_ACTIVATIONS = [("Relu", None), ("LeakyRelu", [0.1]), ("Clip", [-0.5, 1.5]), ("HardSigmoid", [0.3, 0.4]),
                    ("Sigmoid", None), ("Tanh", None), (None, None)]


@pytest.mark.parametrize("activation,params", CONV_ACTIVATIONS)
@pytest.mark.parametrize("with_z", [False, True])
def test_fused_conv(activation, params, with_z):
    attrs = {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    if activation:
        attrs["activation"] = activation
    if params:
        attrs["activation_params"] = params
    names = ["x", "w", "b"] + (["z"] if with_z else [])
    node = helper.make_node("FusedConv", names, ["y"], domain="com.microsoft", **attrs)
    inputs = [("x", [1, 4, 9, 9])] + ([("z", [1, 6, 5, 5])] if with_z else [])
    model = _model(node, inputs, [1, 6, 5, 5], [_const("w", (6, 4, 3, 3)), _const("b", (6,))])
    feeds = {"x": RNG.standard_normal((1, 4, 9, 9)).astype(np.float32)}
    if with_z:
        feeds["z"] = RNG.standard_normal((1, 6, 5, 5)).astype(np.float32)
    _check(model, feeds)


@pytest.mark.parametrize("activation,alpha", [("Relu", None), ("LeakyRelu", 0.2), ("Sigmoid", None), ("Tanh", None)])
def test_fused_gemm(activation, alpha):
    attrs = {"activation": activation, "transB": 1, "alpha": 0.5}
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    node = helper.make_node("FusedGemm", ["a", "b", "c"], ["y"], domain="com.microsoft", **attrs)
    model = _model(node, [("a", [3, 7])], [3, 5], [_const("b", (5, 7)), _const("c", (5,))])
    _check(model, {"a": RNG.standard_normal((3, 7)).astype(np.float32)})


def test_unknown_activation_is_a_clear_error():
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", activation="Softsign")
    model = _model(node, [("x", [1, 2, 4, 4])], [1, 3, 2, 2], [_const("w", (3, 2, 3, 3))])
    with pytest.raises(UnsupportedError, match="activation 'Softsign'"):
        run_lowered(model, {"x": np.ones((1, 2, 4, 4), np.float32)})


def test_a_real_model_written_for_onnx_runtime_compiles_and_matches_it(tmp_path):
    import graphopt
    from graphopt.models import random_inputs, resolve

    src, shapes = resolve("rapidocr:cls"), ["x:1,3,48,192"]
    result = graphopt.optimize(src, opt_level=3, input_shapes=shapes, target_runtime="ort")
    assert sum(n.op_type == "FusedConv" for n in result.model.graph) > 0
    path = tmp_path / "cls.ort.onnx"
    graphopt.save(result.model, path)
    feeds = random_inputs(str(src), seed=0, input_shapes=shapes)
    got = next(iter(graphopt.compile(path, target="x86")(**feeds).values()))
    np.testing.assert_allclose(got, run_ort(ir.load(src), feeds)[0], rtol=1e-4, atol=1e-5)

"""graphopt-domain ops (Gelu, HardSwish, Mish, LayerNormalization, Attention): lowered vs ONNX Runtime
running their standard-op expansion (graphopt.passes.graphopt_ops.expand_graphopt_ops)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.backends.lowering.table import find_rule
from graphopt.backends.lowering.testing import run_lowered
from graphopt.passes.graphopt_ops import run_ort

F = TensorProto.FLOAT


def _model(node, inputs, out_shape, opset=17, inits=()):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", F, out_shape)], initializer=list(inits),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("graphopt", 1)])
    return ir.serde.deserialize_model(proto)


def _check(model, feeds, rtol=1e-4, atol=1e-5):
    got = run_lowered(model, feeds)["y"]
    want = run_ort(model, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("op,attrs", [("Gelu", {}), ("Gelu", {"approximate": "tanh"}), ("HardSwish", {}), ("Mish", {})])
def test_activations(op, attrs):
    x = (np.random.default_rng(0).standard_normal((2, 3, 5)) * 4).astype(np.float32)
    node = helper.make_node(op, ["x"], ["y"], domain="graphopt", **attrs)
    _check(_model(node, [("x", [2, 3, 5])], [2, 3, 5]), {"x": x})


@pytest.mark.parametrize("axis,shape", [(-1, (2, 7)), (1, (2, 3, 5)), (-2, (1, 4, 3, 6))])
def test_layer_norm(axis, shape):
    rng = np.random.default_rng(1)
    norm_shape = list(shape[axis:])
    scale = onnx.numpy_helper.from_array(rng.standard_normal(norm_shape).astype(np.float32), "s")
    bias = onnx.numpy_helper.from_array(rng.standard_normal(norm_shape).astype(np.float32), "b")
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], domain="graphopt", axis=axis, epsilon=1e-3)
    model = _model(node, [("x", list(shape))], list(shape), inits=[scale, bias])
    _check(model, {"x": (rng.standard_normal(shape) * 3 + 1).astype(np.float32)})


@pytest.mark.parametrize("mask_shape", [None, (5, 7), (2, 1, 5, 7)])
def test_attention(mask_shape):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    k = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    v = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    names = ["q", "k", "v"] + (["m"] if mask_shape else [])
    inputs = [("q", q.shape), ("k", k.shape), ("v", v.shape)] + ([("m", mask_shape)] if mask_shape else [])
    feeds = {"q": q, "k": k, "v": v}
    if mask_shape:
        feeds["m"] = np.where(rng.random(mask_shape) < 0.3, -1e4, 0.0).astype(np.float32)
    node = helper.make_node("Attention", names, ["y"], domain="graphopt", scale=0.5)
    _check(_model(node, inputs, [2, 3, 5, 6]), feeds)


def test_rules_are_in_the_graphopt_domain():
    for op in ("Gelu", "HardSwish", "Mish", "LayerNormalization", "Attention"):
        assert find_rule("graphopt", op, 1) is not None, op

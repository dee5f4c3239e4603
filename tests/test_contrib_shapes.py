"""Shapes through ONNX Runtime's com.microsoft ops that keep their input's shape (graphopt/core/contrib_shapes.py):
ONNX's inference has no schema for them, and every shape after the first one was lost."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_ir as ir

from graphopt.core.shapes import infer_shapes


def _model():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"))
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y", "", "", "sum"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("BiasGelu", ["y", "bias"], ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w"], ["z"]),
        helper.make_node("Transpose", ["z"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["sum"], ["s"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 16])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT, [1, "seq", 16])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("t", "s")]
    graph = helper.make_graph(nodes, "g", [x, skip], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_shapes_pass_through_skip_layer_norm_and_bias_gelu():
    model = infer_shapes(ir.serde.deserialize_model(_model()))
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    for name, want in (("y", "[1,seq,16]"), ("sum", "[1,seq,16]"), ("g", "[1,seq,16]"), ("z", "[1,seq,8]"),
                       ("t", "[1,8,seq]"), ("s", "[1,seq,16]")):
        assert str(values[name].shape).replace(" ", "") == want, (name, values[name].shape)

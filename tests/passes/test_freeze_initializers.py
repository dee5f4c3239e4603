from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import graphopt
from graphopt.passes.freeze_initializers import FreezeInitializersPass
from graphopt.core.verify import verify


def _model(as_input: bool) -> onnx.ModelProto:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])]
    if as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3]))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [2, 3], w.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    return m


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_initializer_inputs_become_constants():
    proto = _model(as_input=True)
    model = ir.serde.deserialize_model(proto)
    result = FreezeInitializersPass()(model)
    assert result.modified
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert "w" in model.graph.initializers and model.ir_version >= 4
    verify(model)
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_array_equal(_run(ir.serde.serialize_model(model), x), _run(proto, x))


def test_does_not_fire_without_initializer_inputs():
    model = ir.serde.deserialize_model(_model(as_input=False))
    assert not FreezeInitializersPass()(model).modified
    assert model.ir_version == 3


def test_light_model_weights_fold_after_freezing():
    model = graphopt.load("light:squeezenet")
    n_inputs = len(model.graph.inputs)
    res = graphopt.optimize(model, opt_level=2)
    assert n_inputs > 1 and len(res.model.graph.inputs) == 1

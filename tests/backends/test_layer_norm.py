"""LayerNormalization over the last axis with vector-wide partial sums (backends/schedules/layer_norm.py):
numerics against ONNX Runtime, static and symbolic rows, and the rule that takes it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends import schedules
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules.testing import ort_run
from graphopt.front import api


def _model(rows, n, residual: bool, axis: int = -1):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes, src = [], "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, n])]
    if residual:  # the residual add fuses into the norm's function
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, rows, n]))
        nodes.append(helper.make_node("Add", ["x", "r"], ["s"]))
        src = "s"
    nodes.append(helper.make_node("LayerNormalization", [src, "g", "b"], ["y"], axis=axis, epsilon=1e-5))
    graph = helper.make_graph(nodes, "ln", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model, rows, rng):
    n = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    # an offset and a spread: the variance of values far from zero is where a one-pass formula loses digits
    return {i.name: (rng.standard_normal((1, rows, n)) * 3 + 50).astype(np.float32) for i in model.graph.input}


@pytest.mark.parametrize("n,residual", [(384, False), (768, True), (48, False)])
def test_static_layer_norm_matches_ort(tmp_path, n, residual):
    model = _model(37, n, residual)
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target="x86")
    assert "layer_norm" in schedules.last_report().values(), schedules.last_report()
    feeds = _feeds(model, 37, np.random.default_rng(1))
    np.testing.assert_allclose(compiled(**feeds)["y"], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_symbolic_rows_match_ort(tmp_path):
    model = _model("seq", 384, True)
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target="x86", dim_bounds={"seq": 64})
    rng = np.random.default_rng(2)
    for rows in (1, 5, 64):
        feeds = _feeds(model, rows, rng)
        np.testing.assert_allclose(compiled(**feeds)["y"], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_a_row_that_is_not_whole_vectors_keeps_tvms_layer_norm(tmp_path):
    model = _model(8, 50, False)
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target="x86")
    assert "layer_norm" not in schedules.last_report().values()
    feeds = _feeds(model, 8, np.random.default_rng(3))
    np.testing.assert_allclose(compiled(**feeds)["y"], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)

"""WeightStatisticsPass: per-tensor and per-channel min/max, in meta and surviving save/load."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core import io
from graphopt.core.diffcheck import random_inputs, run_onnxruntime
from graphopt.passes.weight_statistics import MAX_CHANNELS, WeightStatisticsPass, minmax_rescale, read_statistics
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def _model(nodes, inits, inputs, outputs):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _weights():
    return {
        "wc": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "wt": RNG.standard_normal((4, 3, 2, 2)).astype(np.float32),  # ConvTranspose, group 2 -> 6 channels
        "wg": RNG.standard_normal((5, 6)).astype(np.float32),  # Gemm transB: 5 channels on axis 0
        "wm": RNG.standard_normal((6, 7)).astype(np.float32),  # MatMul: 7 channels on the last axis
    }


def _conv_model():
    w = _weights()
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"]),
        helper.make_node("ConvTranspose", ["x4", "wt"], ["t"], group=2),
        helper.make_node("Gemm", ["v", "wg"], ["g"], transB=1),
        helper.make_node("MatMul", ["g6", "wm"], ["m"]),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inputs = [("x", [1, 3, 5, 5]), ("x4", [1, 4, 3, 3]), ("v", [2, 6]), ("g6", [2, 6])]
    outputs = [("c", [1, 4, 3, 3]), ("t", [1, 6, 4, 4]), ("g", [2, 5]), ("m", [2, 7]), ("r", [1, 3, 5, 5])]
    return _model(nodes, inits, inputs, outputs), w


def test_statistics_per_tensor_and_channel_and_numerics_unchanged(tmp_path):
    model, w = _conv_model()
    feeds = random_inputs(model, seed=0)
    before = run_onnxruntime(model, feeds)
    p = WeightStatisticsPass()
    result = p(model)
    verify(result.model)
    assert result.modified and p.annotated == 4
    expected_rows = {
        "wc": w["wc"].reshape(4, -1),
        "wt": w["wt"].reshape(2, 2, 3, 4).transpose(0, 2, 1, 3).reshape(6, -1),
        "wg": w["wg"],
        "wm": w["wm"].T,
    }
    for name, rows in expected_rows.items():
        stats = read_statistics(result.model.graph.initializers[name])
        assert stats["graphopt.min"] == pytest.approx(float(w[name].min()))
        assert stats["graphopt.max"] == pytest.approx(float(w[name].max()))
        np.testing.assert_allclose(stats["graphopt.channel_min"], rows.min(axis=1), rtol=1e-7)
        np.testing.assert_allclose(stats["graphopt.channel_max"], rows.max(axis=1), rtol=1e-7)
    after = run_onnxruntime(result.model, feeds)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])

    # survives save/load as JSON in metadata_props
    path = io.save(result.model, tmp_path / "m.onnx")
    loaded = io.load(path)
    for name in expected_rows:
        v = loaded.graph.initializers[name]
        assert json.loads(v.metadata_props["graphopt.max"]) == pytest.approx(float(w[name].max()))
        assert read_statistics(v)["graphopt.channel_min"] == pytest.approx(list(expected_rows[name].min(axis=1)))
    # already annotated: nothing changes
    assert not WeightStatisticsPass()(loaded).modified


def test_changed_weight_is_reannotated_and_activation_inputs_ignored():
    model, w = _conv_model()
    WeightStatisticsPass()(model)
    wc = model.graph.initializers["wc"]
    wc.const_value = ir.tensor(w["wc"] * 2, name="wc")
    p = WeightStatisticsPass()
    assert p(model).modified and p.annotated == 1
    assert read_statistics(wc)["graphopt.max"] == pytest.approx(float((w["wc"] * 2).max()))
    assert read_statistics(model.graph.inputs[0]) == {}


def test_many_channels_only_per_tensor():
    n = MAX_CHANNELS + 1
    wm = RNG.standard_normal((2, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wm"], ["y"])]
    model = _model(nodes, [numpy_helper.from_array(wm, "wm")], [("x", [1, 2])], [("y", [1, n])])
    assert WeightStatisticsPass()(model).modified
    stats = read_statistics(model.graph.initializers["wm"])
    assert set(stats) == {"graphopt.min", "graphopt.max"}


def test_no_constant_weights_means_unmodified():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _model(nodes, [], [("x", [1, 2]), ("w", [2, 3])], [("y", [1, 3])])
    assert not WeightStatisticsPass()(model).modified


def test_minmax_rescale():
    x = np.array([[-1.0, 0.0, 3.0], [2.0, 2.0, 2.0]])
    lo, hi = np.array([[-1.0], [2.0]]), np.array([[3.0], [2.0]])
    out = minmax_rescale(x, lo, hi)
    np.testing.assert_allclose(out, [[0.0, 0.25, 1.0], [0.0, 0.0, 0.0]])  # zero range -> 0, no NaN
    assert minmax_rescale(5.0, 0.0, 10.0) == pytest.approx(0.5)

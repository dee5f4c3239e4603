"""Teacher-guided reconstruction after channel pruning: refitted layers bring the output back toward
the unpruned model's on inputs the fit never saw; im2col matches ONNX Runtime's convolution."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_prune_channels import feeds, prune_model

from graphopt.compression.compress import copy_model, ort_run
from graphopt.passes.prune_channels import PruneChannelsPass
from graphopt.passes.reconstruct import ReconstructPass, im2col
from graphopt.core.verify import verify


def _error(model, teacher, data, name="y") -> float:
    run, ref = ort_run(model), ort_run(teacher)
    return float(np.mean([np.sum((run(f)[name] - ref(f)[name]) ** 2) / np.sum(ref(f)[name] ** 2) for f in data]))


def test_reconstruction_reduces_the_error_against_the_teacher():
    teacher = prune_model(seed=4, dead=False)
    pruned = copy_model(teacher)
    p = PruneChannelsPass(0.5, multiple=1)
    p(pruned)
    refit = copy_model(pruned)
    rp = ReconstructPass(teacher, feeds(24, seed=2), p.kept, ridge=1e-4)
    assert rp(refit).modified
    verify(refit)
    assert set(rp.errors) == {"c2", "c4", "c5", "gemm"}  # every layer that lost input channels
    for before, after in rp.errors.values():
        assert after < before
    held_out = feeds(8, seed=99)
    assert _error(refit, teacher, held_out) < 0.5 * _error(pruned, teacher, held_out)


def test_too_few_rows_keep_the_pruned_weights():
    teacher = prune_model(seed=4, dead=False)
    model = copy_model(teacher)
    p = PruneChannelsPass(0.5, multiple=1)
    p(model)
    w = next(n for n in model.graph if n.name == "gemm").inputs[1].const_value.numpy().copy()
    rp = ReconstructPass(teacher, feeds(2), p.kept)
    rp(model)
    assert "gemm" in rp.skipped and "2 rows" in rp.skipped["gemm"]  # one row a sample, 4 unknowns
    np.testing.assert_array_equal(next(n for n in model.graph if n.name == "gemm").inputs[1].const_value.numpy(), w)


@pytest.mark.parametrize("strides, pads, dilations", [([1, 1], [1, 1, 1, 1], [1, 1]), ([2, 1], [0, 2, 1, 0], [1, 2])])
def test_im2col_matches_onnxruntime_conv(strides, pads, dilations):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, pads=pads, dilations=dilations)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    y = ort_run(model)({"x": x})["y"]
    positions = np.arange(y.shape[0] * y.shape[2] * y.shape[3])
    patches = im2col(x, next(iter(model.graph)), 3, 2, y.shape[2:], positions)
    got = (patches @ w.reshape(4, -1).T).reshape(y.shape[0], y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rapidocr_rec_reconstruction_beats_pruning_alone(tmp_path):
    """PP-OCRv4 rec at 20% channels, calibrated on 8 rendered text lines: the refitted model's output is
    closer to the unpruned one on other lines, and reads more characters right (a few minutes)."""
    from graphopt.front import api
    from graphopt.compression import evaluate
    from graphopt.compression.calibration import load_calibration

    calib = tmp_path / "calib.npz"
    evaluate.write_calibration("ocr-rec", calib, 8, input_shape="x:1,3,48,320")
    teacher = api.optimize("rapidocr:rec", input_shapes=["x:1,3,48,320"]).model
    data = load_calibration(calib, teacher)
    pruned = copy_model(teacher)
    p = PruneChannelsPass(0.2, data=data)
    p(pruned)
    refit = copy_model(pruned)
    ReconstructPass(teacher, data, p.kept)(refit)
    metric = evaluate.resolve_metric("ocr-rec", "rapidocr:rec", input_shapes=["x:1,3,48,320"], samples=20)
    evaluate.write_calibration("ocr-rec", tmp_path / "held.npz", 4, seed=7, input_shape="x:1,3,48,320")
    held_out = list(load_calibration(tmp_path / "held.npz", teacher))
    name = teacher.graph.outputs[0].name
    assert _error(refit, teacher, held_out, name) < 0.5 * _error(pruned, teacher, held_out, name)
    assert metric(ort_run(refit)) > metric(ort_run(pruned)) + 0.2

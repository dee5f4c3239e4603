"""Default matmul / dense / batch-matmul schedules against ONNX Runtime (transposed operands, batches)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.schedules.testing import build, ort_run, single_node_model


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((1, 64), (64, 48)), ((7, 33), (33, 50)), ((3, 5, 16, 24), (3, 5, 24, 17)), ((2, 40, 32), (32, 96)), ((1, 1, 128), (128, 10))],
)
def test_matmul_matches_ort(a_shape, b_shape):
    rng = np.random.default_rng(0)
    model = single_node_model("MatMul", {"a": a_shape, "b": b_shape}, {})
    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32), "b": rng.standard_normal(b_shape).astype(np.float32)}
    built = build(model, {"a": a_shape, "b": b_shape})
    assert "matmul" in built.report.values(), built.report
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_transposed_operands(trans_a, trans_b):
    rng = np.random.default_rng(1)
    m, k, n = 9, 40, 24
    a_shape = (k, m) if trans_a else (m, k)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    model = single_node_model("Gemm", {"a": a_shape}, {"w": w, "c": c}, transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0)
    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32)}
    built = build(model, {"a": a_shape})
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_attention_like_matmul_with_transposed_activation():
    """Q @ K^T with K transposed in the graph (both operands are activations)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["y"])]
    graph = helper.make_graph(
        nodes, "qk",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 20, 16]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 20, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {n: rng.standard_normal((1, 2, 20, 16)).astype(np.float32) for n in ("q", "k")}
    built = build(model, {"q": (1, 2, 20, 16), "k": (1, 2, 20, 16)})
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_scheduled_matmul_is_faster():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    model = single_node_model("MatMul", {"a": (64, 256)}, {"w": w})
    feeds = {"a": rng.standard_normal((64, 256)).astype(np.float32)}
    fast, slow = build(model, {"a": (64, 256)}), build(model, {"a": (64, 256)}, scheduled=False)
    np.testing.assert_allclose(fast(feeds)[0], slow(feeds)[0], rtol=1e-4, atol=1e-3)
    assert slow.time_ms(feeds, number=2) / fast.time_ms(feeds, number=10) >= 3


@pytest.mark.parametrize("k,n,parallel", [(2048, 1000, True), (512, 256, False)])
def test_gemv_runs_parallel_when_it_streams_megabytes(k, n, parallel):
    """A classifier GEMV (2M multiply-adds over 8 MB of weights) is bound by memory: two cores stream
    it faster, though its multiply-adds are below the contraction threshold; a small one stays serial."""
    import tvm

    from graphopt.backends.schedules import apply_default_schedules
    from graphopt.backends.schedules.testing import fused, host_target

    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    model = single_node_model("MatMul", {"x": (1, k)}, {"w": w})
    out = apply_default_schedules(fused(model, {"x": (1, k)}), host_target())
    func = next(f for _, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    from graphopt.backends.schedules import features_of

    assert ("T.parallel" in func.script()) == (parallel and features_of(host_target()).cores > 1)
    built = build(model, {"x": (1, k)})
    x = rng.standard_normal((1, k)).astype(np.float32)
    np.testing.assert_allclose(built({"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-3)

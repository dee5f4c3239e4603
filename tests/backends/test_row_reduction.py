"""A row reduction with its elementwise epilogue (a layer norm written out as ReduceMean/Sub/Pow/
ReduceMean/Add/Sqrt/Div, as ViT-S and Moonshine ship it) takes the normalization rule with lane-wise
partial sums (backends/schedules/reduction.py), against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.schedules.testing import build, ort_run

F = TensorProto.FLOAT


def _written_out_layer_norm(shape, eps=1e-6):
    rng = np.random.default_rng(0)
    n = shape[-1]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(eps, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
             helper.make_node("Sub", ["x", "m"], ["d"]), helper.make_node("Pow", ["d", "two"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]), helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]), helper.make_node("Div", ["d", "s"], ["nrm"]),
             helper.make_node("Mul", ["nrm", "g"], ["sc"]), helper.make_node("Add", ["sc", "b"], ["y"])]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", F, list(shape))],
                              [helper.make_tensor_value_info("y", F, list(shape))], inits[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("shape", [(1, 257, 384), (2, 35, 416), (2, 100, 100)])
def test_written_out_layer_norm_matches_ort(shape):
    """ViT-S's and Moonshine's widths (whole vectors), and a width with a tail (100: its reduction keeps
    the serial chain); 2-D rows and a batch of 2."""
    model = _written_out_layer_norm(shape)
    x = (np.random.default_rng(1).standard_normal(shape) * 3 + 1).astype(np.float32)
    built = build(model, {"x": shape})
    assert list(built.report.values()).count("normalization") >= 2, built.report  # both means with their epilogues
    np.testing.assert_allclose(built(feeds := {"x": x})[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_partial_sums_are_vectorized():
    """The mean's reduction becomes 16 lane-wise partial sums in a vector loop (not one serial chain)."""
    from graphopt.backends.schedules import features_of, reduction
    from graphopt.backends.schedules.features import RuleContext
    from graphopt.backends.schedules.testing import fused, host_target

    shape = (1, 257, 384)
    mod = fused(_written_out_layer_norm(shape), {"x": shape})
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if "mean" in gv.name_hint and hasattr(f, "body")}
    assert funcs
    ctx = RuleContext(features_of(host_target()), frozenset())
    for name, func in funcs.items():
        sch = reduction.schedule_normalization(func, ctx)
        assert sch is not None, name
        text = sch.mod["main"].script()
        assert "_rf" in text and "T.vectorized" in text, name


def test_mean_over_everything_then_subtract_is_not_recomputed_per_element():
    """Moonshine's GroupNorm (one group): a mean over all of a [1, 1, N] tensor, then a subtract. The
    row rule would put the mean under the subtract's loops (computed again for every element, a run
    of minutes at Moonshine's N); it is left to the other rules."""
    shape = (1, 1, 40000)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["y"])]
    graph = helper.make_graph(nodes, "centre", [helper.make_tensor_value_info("x", F, list(shape))],
                              [helper.make_tensor_value_info("y", F, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    built = build(model, {"x": shape})
    assert "normalization" not in built.report.values(), built.report
    np.testing.assert_allclose(built(feeds := {"x": x})[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)

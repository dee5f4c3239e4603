"""If / Loop / Scan lowering: conformance cases and ORT comparisons (run-time and constant conditions)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.backends.lowering.testing import run_lowered
from graphopt.core.errors import UnsupportedError

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import run_case, select_cases  # noqa: E402

F, B, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64
LOWERABLE = {"test_if", "test_loop11", "test_scan_sum", "test_scan9_sum", "test_scan9_multi_state", "test_scan9_scalar"}


@pytest.mark.parametrize("case", [c for c in select_cases({"If", "Loop", "Scan"}) if c.name in LOWERABLE],
                         ids=lambda c: c.name)
def test_conformance(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(model, feeds):
    onnx.checker.check_model(model)
    want = _ort(model, feeds)
    got = run_lowered(model, feeds)
    for out, w in zip(model.graph.output, want):
        assert got[out.name].shape == w.shape, out.name
        np.testing.assert_allclose(got[out.name], w, rtol=1e-5, atol=1e-6, err_msg=out.name)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _if_model(cond_const: bool | None):
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"]), helper.make_node("Relu", ["x"], ["u"])],
                               "then", [], [_vi("t", F, [2, 3]), _vi("u", F, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t2"]), helper.make_node("Abs", ["x"], ["u2"])],
                               "else", [], [_vi("t2", F, [2, 3]), _vi("u2", F, [2, 3])])
    nodes, inputs, inits = [], [_vi("x", F, [2, 3])], []
    if cond_const is None:
        inputs.append(_vi("c", B, []))
    else:
        inits.append(onnx.numpy_helper.from_array(np.array(cond_const), "c"))
    nodes.append(helper.make_node("If", ["c"], ["y", "z"], then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(nodes, "if", inputs, [_vi("y", F, [2, 3]), _vi("z", F, [2, 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("cond", [True, False])
def test_if_runtime_condition(cond):
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    _check(_if_model(None), {"x": x, "c": np.array(cond)})


@pytest.mark.parametrize("cond", [True, False])
def test_if_constant_condition_is_inlined(cond):
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    _check(_if_model(cond), {"x": x})


def _loop_model(trips: int, runtime_cond: bool, scan_out: bool, threshold: float = 6.0):
    """y += x * (i + 1) while sum(y) < threshold (condition from the body), optionally scanning y."""
    body_nodes = [
        helper.make_node("Cast", ["i"], ["fi"], to=F),
        helper.make_node("Constant", [], ["one"], value=onnx.numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Add", ["fi", "one"], ["k"]),
        helper.make_node("Mul", ["x", "k"], ["xk"]),
        helper.make_node("Add", ["y_in", "xk"], ["y_out"]),
    ]
    if runtime_cond:
        body_nodes += [
            helper.make_node("ReduceSum", ["y_out"], ["s"], keepdims=0),
            helper.make_node("Constant", [], ["th"], value=onnx.numpy_helper.from_array(np.array(threshold, np.float32))),
            helper.make_node("Less", ["s", "th"], ["c_out"]),
        ]
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    outs = [_vi("c_out", B, []), _vi("y_out", F, [3])]
    if scan_out:
        body_nodes.append(helper.make_node("Identity", ["y_out"], ["scan"]))
        outs.append(_vi("scan", F, [3]))
    body = helper.make_graph(body_nodes, "body", [_vi("i", I64, []), _vi("c_in", B, []), _vi("y_in", F, [3])], outs)
    inits = [onnx.numpy_helper.from_array(np.array(trips, np.int64), "M"), onnx.numpy_helper.from_array(np.array(True), "c0")]
    graph_outs = [_vi("y", F, [3])] + ([_vi("ys", F, [trips, 3])] if scan_out else [])
    node = helper.make_node("Loop", ["M", "c0", "y0"], [o.name for o in graph_outs], body=body)
    graph = helper.make_graph([node], "loop", [_vi("y0", F, [3]), _vi("x", F, [3])], graph_outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_loop_constant_trip_count_with_scan_output():
    rng = np.random.default_rng(2)
    _check(_loop_model(5, runtime_cond=False, scan_out=True),
           {"y0": rng.standard_normal(3).astype(np.float32), "x": rng.standard_normal(3).astype(np.float32)})


@pytest.mark.parametrize("x", [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
def test_loop_runtime_condition_exits_early(x):
    """The condition turns false after a data-dependent number of iterations (0, 1 or several)."""
    _check(_loop_model(8, runtime_cond=True, scan_out=False),
           {"y0": np.zeros(3, np.float32), "x": np.array(x, np.float32)})


def test_loop_runtime_condition_with_scan_output_is_refused():
    with pytest.raises(UnsupportedError, match="scan outputs"):
        run_lowered(_loop_model(4, runtime_cond=True, scan_out=True),
                    {"y0": np.zeros(3, np.float32), "x": np.ones(3, np.float32)})


def test_loop_over_unroll_limit_is_refused():
    with pytest.raises(UnsupportedError, match="unrolling limit"):
        run_lowered(_loop_model(1000, runtime_cond=False, scan_out=False),
                    {"y0": np.zeros(3, np.float32), "x": np.ones(3, np.float32)})


def test_scan9_axes_and_directions():
    """Two scan inputs (one reversed, one scanned along axis 1), two outputs (axis 1, reversed)."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "a"], ["s1"]), helper.make_node("Mul", ["s1", "b"], ["s_out"]),
         helper.make_node("Sub", ["s_out", "a"], ["o1"]), helper.make_node("Identity", ["s_out"], ["o2"])],
        "body", [_vi("s_in", F, [4]), _vi("a", F, [4]), _vi("b", F, [4])],
        [_vi("s_out", F, [4]), _vi("o1", F, [4]), _vi("o2", F, [4])],
    )
    node = helper.make_node("Scan", ["s0", "A", "Bt"], ["s", "O1", "O2"], body=body, num_scan_inputs=2,
                            scan_input_directions=[1, 0], scan_input_axes=[0, 1],
                            scan_output_axes=[1, 0], scan_output_directions=[0, 1])
    graph = helper.make_graph([node], "scan", [_vi("s0", F, [4]), _vi("A", F, [5, 4]), _vi("Bt", F, [4, 5])],
                              [_vi("s", F, [4]), _vi("O1", F, [4, 5]), _vi("O2", F, [5, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    rng = np.random.default_rng(3)
    _check(model, {"s0": rng.standard_normal(4).astype(np.float32), "A": rng.standard_normal((5, 4)).astype(np.float32),
                   "Bt": rng.uniform(0.5, 1.0, (4, 5)).astype(np.float32)})


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["silero:vad", "silero:16k_op15"])
def test_silero_with_if_on_sample_rate(spec):
    """silero-vad's If picks the 16 kHz or 8 kHz network from the sample rate; frozen to 16 kHz (the
    8 kHz branch does not type-check for a 512-sample input), the If is inlined."""
    from graphopt.models import resolve
    from graphopt.models.inputs import random_inputs

    feeds = random_inputs(spec, seed=0, input_shapes=["input:1,512", "state:2,1,128"])
    feeds["sr"] = np.array(16000, dtype=np.int64)
    model = onnx.load(str(resolve(spec)))
    want = _ort(model, feeds)
    sr = next(vi for vi in model.graph.input if vi.name == "sr")
    model.graph.input.remove(sr)
    model.graph.initializer.append(onnx.numpy_helper.from_array(feeds.pop("sr"), "sr"))
    for vi in model.graph.input:  # static input shapes for the lowering
        dims = vi.type.tensor_type.shape.dim
        for d, n in zip(dims, feeds[vi.name].shape):
            d.Clear()
            d.dim_value = n
    got = run_lowered(model, feeds)
    for out, w in zip(model.graph.output, want):
        np.testing.assert_allclose(got[out.name], w, rtol=1e-3, atol=1e-4, err_msg=out.name)

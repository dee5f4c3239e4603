"""exp, erf, sigmoid and softmax through the fast legalizations: numerics against ONNX Runtime over the
whole float32 range the ops see, and the switch that turns it off."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.front import api
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import fast_math
from graphopt.backends.schedules.testing import ort_run


def unary_model(op, shape, **attrs):
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], op.lower(),
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_both(tmp_path, model, x):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compiled = compile_model(api.load(path), target="x86")
    return compiled(x=x)["y"], ort_run(model, {"x": x})[0]


def reference(op, x, axis=-1):
    """The op in float64 (the ONNX reference implementation's definitions)."""
    x = x.astype(np.float64)
    if op == "Softmax":
        e = np.exp(x - x.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)
    return 1 / (1 + np.exp(-x)) if op == "Sigmoid" else np.exp(x)


@pytest.mark.parametrize("op,shape,attrs,scale", [
    ("Softmax", (1, 40, 6625), {"axis": -1}, 4.0),  # PP-OCRv4 rec's output: a row length with no power-of-two divisor
    ("Softmax", (2, 8, 40, 40), {"axis": -1}, 4.0),  # attention scores: 2 vectors and a tail of 8
    ("Softmax", (3, 17, 5), {"axis": 1}, 4.0),  # not the last axis
    ("Softmax", (4, 7), {"axis": -1}, 4.0),  # rows shorter than a vector
    ("Sigmoid", (1, 1, 64, 63), {}, 30.0),  # saturates at both ends
    ("Exp", (4, 1000), {}, 20.0),
])
def test_fast_math_matches_ort(tmp_path, op, shape, attrs, scale):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    got, want = run_both(tmp_path, unary_model(op, shape, **attrs), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # against float64: within a few float32 roundings (ORT's own sigmoid is further off near 0)
    np.testing.assert_allclose(got, reference(op, x, attrs.get("axis", -1)), rtol=3e-6, atol=1e-30)


def test_extreme_inputs(tmp_path):
    """exp underflows to ~0 and saturates near float32's largest value; sigmoid goes to 0 and 1."""
    x = np.array([[-1e4, -100.0, -87.0, 0.0, 1e-6, 50.0, 88.0, 1e4]], np.float32)
    sig, want = run_both(tmp_path, unary_model("Sigmoid", x.shape), x)
    np.testing.assert_allclose(sig, want, rtol=1e-6, atol=1e-30)
    e, want = run_both(tmp_path, unary_model("Exp", x.shape), x)
    finite = np.isfinite(want)
    np.testing.assert_allclose(e[finite], want[finite], rtol=2e-6, atol=1e-37)
    assert e[0, -1] > 1e38  # exp(1e4): clamped at exp(88.38), where the library gives inf


def test_erf_matches_ort_and_float64(tmp_path):
    """erf (exact GELU's) through fast_erf: within 5e-7 of erf in float64 over [-6, 6] and beyond, NaN kept."""
    import math

    x = np.concatenate([np.linspace(-6, 6, 4093), [0.0, -0.0, 1e-30, 3.999, 4.001, 1e4, -1e4]]).astype(np.float32)
    x = x.reshape(1, -1)
    got, want = run_both(tmp_path, unary_model("Erf", x.shape), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    exact = np.vectorize(math.erf)(x.astype(np.float64))
    assert np.abs(got - exact).max() < 5e-7
    nan, _ = run_both(tmp_path, unary_model("Erf", (1, 2)), np.array([[np.nan, 1.0]], np.float32))
    assert np.isnan(nan[0, 0]) and abs(nan[0, 1] - math.erf(1.0)) < 5e-7


def test_legalize_map_switch(monkeypatch):
    assert set(fast_math.legalize_map()) == {"relax.exp", "relax.erf", "relax.sigmoid", "relax.nn.softmax",
                                             "relax.tanh", "relax.power"}
    monkeypatch.setenv("GRAPHOPT_FAST_MATH", "0")
    assert fast_math.legalize_map() == {}


def test_other_dtypes_keep_tvm_legalization(tmp_path):
    """float64 softmax is legalized by TVM's rule (the library exp), and still right."""
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "sm64",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3, 50])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((3, 50))
    got, want = run_both(tmp_path, model, x)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("shape,rule", [((1, 40, 6625), "softmax"), ((4, 7), "generic")])
def test_softmax_rule_takes_rows_of_a_vector_or_more(tmp_path, shape, rule):
    from graphopt.backends import schedules

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got, _ = run_both(tmp_path, unary_model("Softmax", shape, axis=-1), x)
    assert schedules.last_report().get("softmax") == rule, schedules.last_report()
    np.testing.assert_allclose(got, reference("Softmax", x), rtol=3e-6)


def test_softmax_with_fused_neighbours(tmp_path):
    """A scale before and a multiply after the softmax fuse into its function (attention's scores)."""
    shape = (2, 4, 40, 40)
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    nodes = [helper.make_node("Mul", ["x", "half"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("Mul", ["p", "three"], ["y"])]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], [half, three])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (np.random.default_rng(4).standard_normal(shape) * 4).astype(np.float32)
    got, want = run_both(tmp_path, model, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, 3 * reference("Softmax", 0.5 * x), rtol=3e-6)


def test_tanh_matches_ort_and_float64(tmp_path):
    """tanh through fast_tanh: within 2e-6 of tanh in float64, saturated past +-9, NaN kept."""
    x = np.concatenate([np.linspace(-10, 10, 4093), [0.0, -0.0, 1e-30, 8.999, 9.001, 1e4, -1e4]])
    x = x.astype(np.float32).reshape(1, -1)
    got, want = run_both(tmp_path, unary_model("Tanh", x.shape), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert np.abs(got - np.tanh(x.astype(np.float64))).max() < 2e-6
    nan, _ = run_both(tmp_path, unary_model("Tanh", (1, 2)), np.array([[np.nan, 1.0]], np.float32))
    assert np.isnan(nan[0, 0])


@pytest.mark.parametrize("exponent", [2.0, 3.0, 2.5])
def test_small_powers_are_products(tmp_path, exponent):
    """x ** 2 and x ** 3 (tanh-GELU's cube) as products, as ONNX Runtime computes them; other
    exponents keep TVM's pow."""
    from onnx import numpy_helper

    shape = (4, 1000)
    graph = helper.make_graph([helper.make_node("Pow", ["x", "e"], ["y"])], "pow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              [numpy_helper.from_array(np.array(exponent, np.float32), "e")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 5
    if exponent == 2.5:
        x = np.abs(x)
    got, want = run_both(tmp_path, model, x)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)

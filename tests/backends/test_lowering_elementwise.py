"""Elementwise lowering rules, each compared with ONNX Runtime on random inputs (and ONNX conformance cases)."""

from __future__ import annotations

import numpy as np
import pytest
from conformance_util import all_cases, check_against_ort, make_model, run_case
from onnx import TensorProto as T
from onnx import helper

rng = np.random.default_rng(1)
F, I32, I64, B = T.FLOAT, T.INT32, T.INT64, T.BOOL


def _f(*shape, lo=-3.0, hi=3.0):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def _one(op, feeds, types, out_type=F, opset=18, **attrs):
    names = list(feeds)
    node = helper.make_node(op, names, ["y"], **attrs)
    inputs = [(n, t, list(np.asarray(v).shape)) for (n, v), t in zip(feeds.items(), types)]
    return check_against_ort(make_model([node], inputs, [("y", out_type, None)], opset=opset), feeds)


def _many(ops, x, opset=20):
    """One model applying each (op, attrs) to x (one compile for many ops)."""
    nodes = [helper.make_node(op, ["x"], [f"y{k}"], **attrs) for k, (op, attrs) in enumerate(ops)]
    outs = [(f"y{k}", F, None) for k in range(len(ops))]
    return check_against_ort(make_model(nodes, [("x", F, list(x.shape))], outs, opset=opset), {"x": x})


UNARY = ["Abs", "Neg", "Exp", "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh", "Asinh", "Tanh", "Erf", "Sign",
         "Floor", "Ceil", "Round", "Relu", "Sigmoid", "Softplus", "Softsign", "Mish", "Identity"]


def test_unary_float_ops():
    x = _f(3, 5)
    x[0, :3] = [0.5, 1.5, -2.5]  # Round: ties go to even
    _many([(op, {}) for op in UNARY], x)


def test_activations_with_attributes():
    _many([
        ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.7}), ("Selu", {}), ("Celu", {"alpha": 1.3}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("HardSwish", {}), ("ThresholdedRelu", {"alpha": 0.5}),
        ("Shrink", {"lambd": 0.8, "bias": 0.3}), ("Gelu", {}), ("Gelu", {"approximate": "tanh"}),
    ], _f(4, 6))


def test_log_sqrt_reciprocal_on_positive_inputs():
    _many([(op, {}) for op in ("Log", "Sqrt", "Reciprocal", "Acosh")], _f(2, 7, lo=1.1, hi=4.0))


def test_broadcasting_binary_float_ops():
    a, b = _f(2, 3, 4), _f(3, 1)
    for op in ("Add", "Sub", "Mul", "Div"):
        _one(op, {"a": a, "b": b}, [F, F])
    for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
        _one(op, {"a": np.round(a), "b": np.round(b)}, [F, F], out_type=B)


def test_integer_division_truncates_and_mod_follows_fmod():
    a = rng.integers(-20, 20, (4, 5)).astype(np.int32)
    b = rng.integers(1, 6, (4, 5)).astype(np.int32) * rng.choice([-1, 1], (4, 5)).astype(np.int32)
    _one("Div", {"a": a, "b": b}, [I32, I32], out_type=I32)
    _one("Mod", {"a": a, "b": b}, [I32, I32], out_type=I32)
    _one("Mod", {"a": a, "b": b}, [I32, I32], out_type=I32, fmod=1)
    af, bf = _f(3, 4), _f(3, 4, lo=0.5, hi=2.0) * rng.choice([-1, 1], (3, 4)).astype(np.float32)
    _one("Mod", {"a": af, "b": bf}, [F, F], fmod=1)


def test_pow_with_integer_exponent_and_variadic_ops():
    _one("Pow", {"a": _f(3, 4, lo=0.5, hi=2.0), "b": rng.integers(-2, 3, (4,)).astype(np.int64)}, [F, I64])
    feeds = {"a": _f(2, 3), "b": _f(3), "c": _f(2, 1)}
    for op in ("Max", "Min", "Sum", "Mean"):
        _one(op, feeds, [F, F, F])


def test_logic_bitwise_and_where():
    p, q = rng.random((3, 4)) > 0.5, rng.random((4,)) > 0.5
    for op in ("And", "Or", "Xor"):
        _one(op, {"p": p, "q": q}, [B, B], out_type=B)
    _one("Not", {"p": p}, [B], out_type=B)
    i, j = rng.integers(0, 255, (3, 4)).astype(np.int32), rng.integers(0, 255, (4,)).astype(np.int32)
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        _one(op, {"i": i, "j": j}, [I32, I32], out_type=I32)
    _one("Where", {"p": p, "a": _f(3, 4), "b": _f(4)}, [B, F, F])


def test_casts_between_float_int_and_bool():
    x = np.array([[-2.7, -0.2, 0.0, 0.6, 3.9, 250.0]], np.float32)
    _one("Cast", {"x": x}, [F], out_type=I32, to=I32)  # truncation toward zero
    _one("Cast", {"x": x}, [F], out_type=B, to=B)
    _one("Cast", {"x": x}, [F], out_type=T.FLOAT16, to=T.FLOAT16)
    _one("Cast", {"x": x.astype(np.int64)}, [I64], out_type=F, to=F)


def test_clip_with_and_without_bounds_and_isinf_isnan():
    x = _f(3, 4)
    _one("Clip", {"x": x, "lo": np.array(-1.0, np.float32), "hi": np.array(0.5, np.float32)}, [F, F, F])
    _one("Clip", {"x": x}, [F])
    z = x.copy()
    z[0, :3] = [np.inf, -np.inf, np.nan]
    _one("IsInf", {"z": z}, [F], out_type=B, detect_negative=0)
    _one("IsNaN", {"z": z}, [F], out_type=B)


CONFORMANCE_SAMPLE = {
    "test_mod_mixed_sign_int32", "test_mod_mixed_sign_float32", "test_mod_float_edge_cases_fmod_0_float32",
    "test_bitshift_right_int32_negative_shift", "test_clip_default_int8_inbounds", "test_clip_splitbounds",
    "test_prelu_broadcast", "test_where_long_example", "test_div_int32_trunc", "test_pow_types_int32_float32",
    "test_cast_FLOAT_to_BFLOAT16", "test_castlike_FLOAT16_to_FLOAT", "test_round", "test_gelu_tanh_2",
    "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2", "test_cast_FLOAT_to_FLOAT8E4M3FNUZ", "test_cast_FLOAT8E4M3FN_to_FLOAT",
    "test_swish", "test_swiglu_alpha", "test_bitcast_float32_to_int32",
    "test_castlike_UINT2_to_FLOAT16_expanded", "test_cast_FLOAT_to_FLOAT4E2M1", "test_cast_e8m0_FLOAT_to_FLOAT8E8M0",
    "test_adam_multiple", "test_nesterov_momentum", "test_adagrad",
}


def test_cast_to_4bit_integers_truncates_and_wraps():
    """Whole numbers out of range keep their low bits, as in ONNX Runtime; fractions truncate toward zero,
    as in ONNX's reference implementation (ONNX Runtime rounds them half away from zero instead).
    The conformance case test_cast_FLOAT_to_INT4 takes its expected output from ml_dtypes, whose answer
    for out-of-range floats changed in ml_dtypes 0.7 from wrapping to 0: it checks the installed
    ml_dtypes, not a lowering, so it is not part of this sample."""
    from onnx.reference import ReferenceEvaluator

    from graphopt.backends.lowering.testing import run_lowered

    whole = np.arange(-20, 21, dtype=np.float32)
    frac = np.array([-7.75, -2.5, -0.5, -0.25, 0.25, 0.5, 0.75, 2.5, 6.9], np.float32)
    for to in (T.INT4, T.UINT4):
        nodes = [helper.make_node("Cast", ["x"], ["q"], to=to), helper.make_node("Cast", ["q"], ["y"], to=F)]
        check_against_ort(make_model(nodes, [("x", F, [whole.size])], [("y", F, None)], opset=21), {"x": whole})
        x = np.abs(frac) if to == T.UINT4 else frac
        model = make_model(nodes, [("x", F, [x.size])], [("y", F, None)], opset=21)
        np.testing.assert_array_equal(run_lowered(model, {"x": x})["y"], ReferenceEvaluator(model).run(None, {"x": x})[0])


@pytest.mark.parametrize("name", sorted(CONFORMANCE_SAMPLE))
def test_conformance_sample(name):
    (case,) = [c for c in all_cases() if c.name == name]
    ok, why, _frozen = run_case(case)
    assert ok, why

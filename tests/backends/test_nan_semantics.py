"""NaN and ±inf through compiled max/min ops, against ONNX Runtime (CPUExecutionProvider).

Each case compiles a one-op (or conv + activation) model through the whole compile and runs it on
inputs holding NaN, +inf and -inf at known positions: the NaN positions must equal ORT's, the other
values match (infinities exactly). What ORT answers, and where graphopt differs on purpose, is in
``backends/lowering/nan_minmax.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.bundle.loader import cpu_has_amx
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules.testing import ort_run

NAN, INF = np.nan, np.inf
SPECIALS = np.array([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 3.0e38], np.float32)


def make_model(nodes, inputs: dict, inits: dict | None = None, opset: int = 17, outputs=("y",)):
    graph = helper.make_graph(
        nodes, "nan_case",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def one_op(op, inputs: dict, inits: dict | None = None, opset: int = 17, **attrs):
    node = helper.make_node(op, [*inputs, *(inits or {})], ["y"], **attrs)
    return make_model([node], inputs, inits, opset)


def assert_like_ort(model, feeds: dict, rtol=1e-5, atol=1e-6):
    compiled = compile_model(ir.serde.deserialize_model(model), target="x86")
    got = compiled(**feeds)
    want = ort_run(model, feeds)
    for (name, g), w in zip(got.items(), want):
        g = np.asarray(g)
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{name}: NaN positions differ")
        ok = ~np.isnan(w)
        np.testing.assert_array_equal(np.isinf(g[ok]), np.isinf(w[ok]), err_msg=f"{name}: inf positions differ")
        np.testing.assert_allclose(g[ok], w[ok], rtol=rtol, atol=atol, err_msg=name)
    return got


def specials(shape, seed=0) -> np.ndarray:
    """Normal values with every special value placed at fixed positions (the first ones, then every
    7th element)."""
    x = np.random.default_rng(seed).standard_normal(int(np.prod(shape))).astype(np.float32) * 3
    n = min(len(SPECIALS), x.size)
    x[:n] = SPECIALS[:n]
    x[n::7] = np.resize(SPECIALS[:3], x[n::7].shape)
    return x.reshape(shape)


X = (2, 3, 40)  # 240 elements: vectorized loops and their tails
UNARY = [
    ("Relu", {}, 17),
    ("LeakyRelu", {"alpha": 0.1}, 17),
    ("HardSigmoid", {}, 17),
    ("HardSwish", {}, 17),
    ("Celu", {}, 17),
    ("Sigmoid", {}, 17),  # fast_math's exp
    ("Exp", {}, 17),
    ("Clip", {"min": -2.0, "max": 2.0}, 6),
    ("Clip", {}, 13),  # no bounds: ORT clamps ±inf to ±FLT_MAX
]


@pytest.mark.parametrize("op,attrs,opset", UNARY, ids=[f"{o}-{s}" for o, _, s in UNARY])
def test_unary(op, attrs, opset):
    assert_like_ort(one_op(op, {"x": X}, opset=opset, **attrs), {"x": specials(X)})


@pytest.mark.parametrize("lo,hi", [(-2.0, 2.0), (NAN, 2.0), (-1.0, NAN), (None, 0.5), (-0.5, None)])
def test_clip_with_bound_inputs(lo, hi):
    """Clip-13 with constant bounds (a NaN bound is ignored, as ORT does) and one bound omitted."""
    inits = {k: np.float32(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None}
    names = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
    node = helper.make_node("Clip", names, ["y"])
    assert_like_ort(make_model([node], {"x": X}, inits, opset=13), {"x": specials(X)})


def test_clip_with_runtime_bounds():
    model = one_op("Clip", {"x": X, "lo": [], "hi": []}, opset=13)
    for lo, hi in ((-1.0, 1.0), (NAN, 1.0)):
        assert_like_ort(model, {"x": specials(X), "lo": np.array(lo, np.float32), "hi": np.array(hi, np.float32)})


def test_prelu():
    slope = np.linspace(-0.5, 0.5, 40).astype(np.float32)
    assert_like_ort(one_op("PRelu", {"x": X}, {"s": slope}), {"x": specials(X)})


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_variadic_broadcasting(op):
    """NaN from any operand wins, in any position; a single NaN constant too."""
    a, b = specials(X, 1), np.array([[2.0], [NAN], [-INF]], np.float32)
    c = specials((40,), 3)[::-1].copy()
    inputs = {"a": X, "b": (3, 1), "c": (40,)}
    assert_like_ort(one_op(op, inputs), {"a": a, "b": b, "c": c})
    two = one_op(op, {"a": X, "b": X})
    assert_like_ort(two, {"a": specials(X, 4), "b": specials(X, 5)[::-1].copy()})
    const = one_op(op, {"a": X}, {"k": np.array([1.0, NAN, -INF] * 13 + [0.0], np.float32)})
    assert_like_ort(const, {"a": specials(X, 6)})


def rows_with_nan(n: int, width: int) -> np.ndarray:
    """Even rows start with a NaN (odd rows hold none), then an all-NaN row, an all -inf row and a
    row with ±inf and no NaN. (Where a NaN sits after the first element, ORT's answer depends on
    which of its kernels runs: some skip it, some do not; not tested.)"""
    x = np.random.default_rng(7).standard_normal((n, width)).astype(np.float32)
    x[0:n - 3:2, 0] = NAN
    x[n - 3] = NAN
    x[n - 2] = -INF
    x[n - 1, ::3] = INF
    x[n - 1, 1::3] = -INF
    return x


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axis,width", [(0, 21), (1, 16)])
def test_reduce_max_min(op, axis, width):
    """ORT's reduce kernels answer NaN when the first reduced element is NaN (along a contiguous
    axis of 16; of 37, ORT's vectorized kernel skips it in rows that start off a 16-byte boundary)."""
    x = rows_with_nan(24, width)
    x = x if axis == 1 else np.ascontiguousarray(x.T)
    model = one_op(op, {"x": x.shape}, opset=13, axes=[axis], keepdims=0)
    got = assert_like_ort(model, {"x": x})
    assert np.isnan(got["y"][0]) and not np.isnan(got["y"][1])  # NaN first, NaN second


def test_reduce_over_every_axis_and_middle_axis():
    x = np.random.default_rng(12).standard_normal((4, 6, 16)).astype(np.float32)
    x[:, 0, ::2] = NAN  # first along the middle axis
    x[1, 2, :] = -INF
    x[2, :, 5] = INF
    assert_like_ort(one_op("ReduceMin", {"x": x.shape}, opset=13, axes=[1], keepdims=1), {"x": x})
    assert_like_ort(one_op("ReduceMax", {"x": x.shape}, opset=18, keepdims=1), {"x": x})  # x[0, 0, 0] is NaN


def windows_input(partial_nan: bool = True) -> np.ndarray:
    """[1, 2, 8, 8]: 2x2 windows (stride 2) with a NaN in each of the four positions (or, without
    ``partial_nan``, -inf there), windows with ±inf and finite values."""
    x = np.random.default_rng(8).standard_normal((1, 2, 8, 8)).astype(np.float32)
    for w in range(4):  # window (0, w): NaN at position w of the window
        x[0, 0, w // 2, 2 * w + w % 2] = NAN
    x[0, 0, 2:4, 0:2] = NAN
    if not partial_nan:
        x[0, 0] = np.where(np.isnan(x[0, 0]), -INF, x[0, 0])
    x[0, 0, 4:6, 2:4] = [[-INF, 1.0], [INF, -INF]]
    x[0, 1, 6:8, 6:8] = [[-INF, 2.0], [-INF, -3.0]]
    x[0, 1, 0, 5] = INF
    return x


@pytest.mark.parametrize("attrs,partial_nan", [
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, False),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, False),
])
def test_max_pool_2d(attrs, partial_nan):
    """ORT's 2-D max pool folds each window with ``m > x ? m : x`` (a NaN is kept unless a later
    value of the window replaces it), and so does graphopt's, in the same order for disjoint 2x2
    windows; for overlapping windows that hold a NaN among numbers the survivor depends on each
    one's order (and, with padding, on where ORT starts), so those take ±inf and no NaN."""
    assert_like_ort(one_op("MaxPool", {"x": (1, 2, 8, 8)}, **attrs), {"x": windows_input(partial_nan)})


def test_global_max_pool():
    """Channels: NaN at the last position, all NaN, ±inf without NaN, finite."""
    x = np.random.default_rng(9).standard_normal((1, 4, 4, 4)).astype(np.float32)
    x[0, 0, 3, 3] = NAN
    x[0, 1] = NAN
    x[0, 2, 0, :] = [INF, -INF, 1.0, -INF]
    assert_like_ort(one_op("GlobalMaxPool", {"x": (1, 4, 4, 4)}), {"x": x})


@pytest.mark.parametrize("rows", [[NAN, 1, 2], [1, INF, 2], [INF, INF, 0], [-INF, 0, 1], [1, 2, 3]])
def test_softmax_rows(rows):
    """A row with NaN, or with +inf, is NaN throughout (inf - inf); -inf gives 0 (rows of 40: the
    vector-wide softmax; of 3: TVM's)."""
    x = np.random.default_rng(10).standard_normal((3, 40)).astype(np.float32)
    x[1, [0, 17, 39]] = rows
    assert_like_ort(one_op("Softmax", {"x": (3, 40)}, opset=13), {"x": x})


def conv_chain(channels: int, hw: int, convs: int, act: str, seed: int = 0):
    """``convs`` 3x3 convs, each followed by ``act`` (fused into the conv by graphopt's passes)."""
    rng = np.random.default_rng(seed)
    nodes, inits, src = [], {}, "x"
    for i in range(convs):
        inits[f"w{i}"] = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)
        inits[f"b{i}"] = rng.standard_normal(channels) * 0.1
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1] * 4))
        out = "y" if i == convs - 1 else f"a{i}"
        if act == "Relu":
            nodes.append(helper.make_node("Relu", [f"c{i}"], [out]))
        else:
            inits.setdefault("lo", np.float32(0.0))
            inits.setdefault("hi", np.float32(6.0))
            nodes.append(helper.make_node("Clip", [f"c{i}", "lo", "hi"], [out]))
        src = out
    return make_model(nodes, {"x": (1, channels, hw, hw)}, inits)


def nan_image(channels, hw):
    x = np.random.default_rng(11).standard_normal((1, channels, hw, hw)).astype(np.float32)
    x[0, :, 2, 3] = NAN  # a NaN pixel spreads over a growing square, conv after conv
    x[0, 0, hw - 2, hw - 2] = NAN  # in one channel only
    return x


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_conv_activation_fused(act):
    """Conv + Relu / Clip as FusedConv, through the default conv schedules."""
    assert_like_ort(conv_chain(16, 12, 2, act), {"x": nan_image(16, 12)}, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_has_amx(), reason="needs a CPU with AMX-BF16")
def test_amx_conv_relu_epilogue():
    """64-channel convs at 14x14 go to the AMX kernel, with the relu in its epilogue."""
    assert_like_ort(conv_chain(64, 14, 4, "Relu"), {"x": nan_image(64, 14)}, rtol=1e-4, atol=1e-3)


def test_squeezenet_all_nan_input():
    """The whole net on an all-NaN image answers NaN where ORT does (everywhere; it answered 0.001
    when Relu turned NaN into 0)."""
    from graphopt.front import api
    from graphopt import models

    feeds, _ = models.reference_data("light:squeezenet")
    feeds = {k: np.full_like(v, NAN) for k, v in feeds.items()}
    got = api.compile("light:squeezenet", target="x86", opt_level=2)(**feeds)
    want = ort_run(onnx.load(str(models.resolve("light:squeezenet"))), feeds)
    for g, w in zip(got.values(), want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        assert np.isnan(w).all()

"""nn lowering (conv, pools, normalizations, Resize, Attention): ONNX conformance cases and ONNX Runtime
comparisons over shape/attribute sweeps (odd sizes, strides, dilations, groups, padding, batch > 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.core.errors import UnsupportedError

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import check_against_ort, make_model, run_case, select_cases  # noqa: E402

F = TensorProto.FLOAT
NN_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "LRN", "Resize", "Upsample", "GridSample", "RMSNormalization",
    "RotaryEmbedding", "CausalConvWithState", "AffineGrid", "RoiAlign", "MaxUnpool", "Col2Im",
    "DeformConv",
}
# Cases made of other families' ops (function expansions) or of types Relax has no dtype for.
SKIP = ("_expanded", "_bf16")


def _cases(ops):
    return [c for c in select_cases(ops) if not any(s in c.name for s in SKIP)]


def _split(cases, per_op: int = 2):
    """(the first ``per_op`` cases of each op, the rest): the default suite runs the first part."""
    from conformance_util import primary_op

    seen: dict[str, int] = {}
    first, rest = [], []
    for c in cases:
        op = primary_op(c)
        seen[op] = seen.get(op, 0) + 1
        (first if seen[op] <= per_op else rest).append(c)
    return first, rest


_FIRST, _REST = _split(_cases(NN_OPS))


@pytest.mark.parametrize("case", _FIRST, ids=lambda c: c.name)
def test_conformance(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


@pytest.mark.slow
@pytest.mark.parametrize("case", _REST, ids=lambda c: c.name)
def test_conformance_more(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases({"Attention", "LinearAttention"}), ids=lambda c: c.name)
def test_conformance_attention(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONV = [
    # x shape, w shape, attributes
    ((2, 4, 9, 7), (6, 2, 3, 3), dict(group=2, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])),
    ((1, 6, 11, 10), (6, 1, 3, 3), dict(group=6, auto_pad="SAME_UPPER", strides=[2, 2])),
    ((1, 3, 10, 9), (5, 3, 4, 2), dict(auto_pad="SAME_LOWER", strides=[3, 2])),
    ((3, 2, 13), (4, 2, 5), dict(strides=[3], pads=[2, 1])),
    ((1, 2, 5, 6, 7), (4, 2, 3, 2, 3), dict(strides=[1, 2, 2], pads=[1, 0, 1, 1, 1, 0])),
]


@pytest.mark.parametrize("xs,ws,attrs", CONV, ids=[str(i) for i in range(len(CONV))])
def test_conv_against_ort(xs, ws, attrs):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    model = make_model([node], [("x", F, list(xs))], [("y", F, None)],
                       {"w": _rand(*ws, seed=1), "b": _rand(ws[0], seed=2)}, opset=13)
    check_against_ort(model, {"x": _rand(*xs)})


CONV_T = [
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(group=2, strides=[2, 3], output_padding=[1, 2], pads=[1, 0, 0, 1])),
    ((1, 2, 5, 5), (2, 3, 3, 3), dict(strides=[2, 2], output_shape=[12, 11])),
    ((1, 3, 4, 7), (3, 2, 2, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2], dilations=[1, 2])),
    ((2, 3, 7), (3, 4, 3), dict(strides=[2], pads=[1, 2])),
    # stride = kernel: lowered as a 1x1 conv and depth-to-space (square, non-square, 1x1)
    ((2, 5, 6, 7), (5, 3, 2, 2), dict(strides=[2, 2])),
    ((1, 4, 5, 3), (4, 6, 3, 2), dict(strides=[3, 2], kernel_shape=[3, 2])),
    ((1, 3, 4, 4), (3, 2, 1, 1), dict(strides=[1, 1])),
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_T, ids=[str(i) for i in range(len(CONV_T))])
def test_conv_transpose_against_ort(xs, ws, attrs):
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
    cout = ws[1] * attrs.get("group", 1)
    model = make_model([node], [("x", F, list(xs))], [("y", F, None)],
                       {"w": _rand(*ws, seed=1), "b": _rand(cout, seed=2)}, opset=13)
    check_against_ort(model, {"x": _rand(*xs)})


def test_conv_transpose_with_stride_equal_to_kernel_is_a_1x1_conv():
    """No conv2d_transpose is left: the non-overlapping patches come from a 1x1 conv and a transpose."""
    import onnx_ir as ir

    from graphopt.backends.lowering import lower

    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    model = make_model([node], [("x", F, [1, 8, 10, 12])], [("y", F, None)], {"w": _rand(8, 4, 2, 2, seed=1)}, opset=13)
    text = str(lower(ir.from_proto(model)).mod)
    assert "conv2d_transpose" not in text and "R.nn.conv2d(" in text
    check_against_ort(model, {"x": _rand(1, 8, 10, 12)})


POOLS = [
    ("MaxPool", (2, 3, 9, 8), dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1, pads=[1, 0, 1, 1])),
    ("MaxPool", (1, 2, 10, 9), dict(kernel_shape=[3, 3], strides=[2, 3], auto_pad="SAME_UPPER")),
    ("MaxPool", (1, 2, 11, 9), dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[2, 1, 1, 1], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", (2, 3, 9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 1, 1, 1])),
    ("AveragePool", (2, 3, 9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 1, 1, 1],
                                       count_include_pad=1)),
    ("AveragePool", (1, 2, 11), dict(kernel_shape=[4], strides=[3], auto_pad="SAME_LOWER")),
    ("LpPool", (1, 3, 8, 7), dict(kernel_shape=[3, 2], strides=[2, 2], p=3, pads=[1, 0, 0, 1])),
]


@pytest.mark.parametrize("op,xs,attrs", POOLS, ids=[f"{p[0]}-{i}" for i, p in enumerate(POOLS)])
def test_pool_against_ort(op, xs, attrs):
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    check_against_ort(make_model([node], [("x", F, list(xs))], [("y", F, None)], opset=18), {"x": _rand(*xs)})


def test_maxpool_indices_against_ort():
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    model = make_model([node], [("x", F, [2, 3, 7, 6])], [("y", F, None), ("i", TensorProto.INT64, None)], opset=12)
    check_against_ort(model, {"x": _rand(2, 3, 7, 6)})


NORMS = [
    ("InstanceNormalization", (2, 3, 5, 4), {}, ["s:3", "b:3"]),
    ("GroupNormalization", (2, 6, 5, 3), dict(num_groups=3, epsilon=1e-3), ["s:6", "b:6"]),
    ("LayerNormalization", (2, 3, 5), dict(axis=1), ["s:3,5", "b:3,5"]),
    ("BatchNormalization", (3, 4, 5, 2), dict(epsilon=1e-3), ["s:4", "b:4", "m:4", "v:4"]),
    ("LRN", (2, 7, 4, 3), dict(size=5, alpha=1e-3, beta=0.6, bias=1.5), []),
    ("LpNormalization", (3, 4, 5), dict(axis=1, p=1), []),
]


@pytest.mark.parametrize("op,xs,attrs,params", NORMS, ids=[n[0] for n in NORMS])
def test_norm_against_ort(op, xs, attrs, params):
    inits = {}
    for k, spec in enumerate(params):
        name, dims = spec.split(":")
        shape = [int(d) for d in dims.split(",")]
        val = _rand(*shape, seed=10 + k)
        inits[name] = np.abs(val) + 0.5 if name == "v" else val
    node = helper.make_node(op, ["x"] + list(inits), ["y"], **attrs)
    model = make_model([node], [("x", F, list(xs))], [("y", F, None)], inits, opset=21)
    check_against_ort(model, {"x": _rand(*xs) * 2 + 0.5})


RESIZE = [
    ((1, 2, 5, 7), dict(mode="linear", coordinate_transformation_mode="half_pixel"), [1, 1, 1.6, 0.6], None),
    ((2, 3, 6, 5), dict(mode="cubic", coordinate_transformation_mode="align_corners"), None, [2, 3, 9, 11]),
    ((1, 1, 7, 4), dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [1, 1, 0.5, 2.5], None),
    ((1, 2, 3, 5, 4), dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), None, [1, 2, 5, 3, 7]),
    # integer nearest upsampling (Relax resize2d path), as in PP-OCR det
    ((2, 3, 5, 7), dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [1, 1, 2, 3], None),
    ((1, 2, 3, 4), dict(mode="nearest", coordinate_transformation_mode="half_pixel"), [1, 1, 2, 2], None),
]


@pytest.mark.parametrize("xs,attrs,scales,sizes", RESIZE, ids=[str(i) for i in range(len(RESIZE))])
def test_resize_against_ort(xs, attrs, scales, sizes):
    inits = {"roi": np.array([], np.float32)}
    names = ["x", "roi"]
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
        names.append("scales")
    else:
        inits["sizes"] = np.array(sizes, np.int64)
        names += ["", "sizes"]
    node = helper.make_node("Resize", names, ["y"], **attrs)
    model = make_model([node], [("x", F, list(xs))], [("y", F, None)], inits, opset=13)
    check_against_ort(model, {"x": _rand(*xs)})


def test_attention_gqa_causal_against_ort():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    model = make_model([node], [("q", F, [2, 4, 5, 8]), ("k", F, [2, 2, 7, 8]), ("v", F, [2, 2, 7, 6])],
                       [("y", F, None)], opset=23)
    check_against_ort(model, {"q": _rand(2, 4, 5, 8), "k": _rand(2, 2, 7, 8, seed=1), "v": _rand(2, 2, 7, 6, seed=2)})


@pytest.mark.parametrize("mode,padding", [("linear", "reflection"), ("cubic", "border"), ("nearest", "zeros")])
def test_grid_sample_against_ort(mode, padding):
    node = helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, padding_mode=padding, align_corners=0)
    model = make_model([node], [("x", F, [2, 3, 5, 7]), ("g", F, [2, 4, 6, 2])], [("y", F, None)], opset=20)
    grid = np.random.default_rng(4).uniform(-1.3, 1.3, (2, 4, 6, 2)).astype(np.float32)
    check_against_ort(model, {"x": _rand(2, 3, 5, 7), "g": grid})


@pytest.mark.parametrize("mode,ctm", [("max", "half_pixel"), ("max", "output_half_pixel"), ("avg", "half_pixel")])
def test_roi_align_against_ort(mode, ctm):
    node = helper.make_node("RoiAlign", ["x", "r", "i"], ["y"], mode=mode, output_height=3, output_width=2,
                            sampling_ratio=2, spatial_scale=0.5, coordinate_transformation_mode=ctm)
    model = make_model([node], [("x", F, [2, 3, 9, 8]), ("r", F, [3, 4]), ("i", TensorProto.INT64, [3])],
                       [("y", F, None)], opset=16)
    rois = np.array([[0, 0, 10, 12], [3.5, 2, 15, 17.5], [-4, 1, 6, 30]], np.float32)
    check_against_ort(model, {"x": _rand(2, 3, 9, 8), "r": rois, "i": np.array([0, 1, 1], np.int64)})


def test_roi_align_max_needs_a_static_sample_grid():
    node = helper.make_node("RoiAlign", ["x", "r", "i"], ["y"], mode="max", output_height=2, output_width=2)
    model = make_model([node], [("x", F, [1, 1, 4, 4]), ("r", F, [1, 4]), ("i", TensorProto.INT64, [1])],
                       [("y", F, None)], opset=16)
    from graphopt.backends.lowering.testing import run_lowered

    with pytest.raises(UnsupportedError, match="sampling_ratio"):
        run_lowered(model, {"x": _rand(1, 1, 4, 4), "r": np.array([[0, 0, 3, 3]], np.float32), "i": np.zeros(1, np.int64)})


def test_col2im_against_ort():
    inits = {"image_shape": np.array([7, 6], np.int64), "block_shape": np.array([2, 3], np.int64)}
    node = helper.make_node("Col2Im", ["x", "image_shape", "block_shape"], ["y"], strides=[2, 1], pads=[1, 0, 0, 1],
                            dilations=[2, 1])
    model = make_model([node], [("x", F, [2, 12, 15])], [("y", F, None)], inits, opset=18)
    check_against_ort(model, {"x": _rand(2, 12, 15)})


def test_deform_conv_groups_against_reference():
    """group=2, offset_group=2, strides, pads, dilations, mask and bias (ONNX's reference evaluator)."""
    from onnx.reference import ReferenceEvaluator

    from graphopt.backends.lowering.testing import run_lowered

    node = helper.make_node("DeformConv", ["x", "w", "off", "b", "m"], ["y"], group=2, offset_group=2,
                            strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2], kernel_shape=[2, 2])
    xs, oh, ow = (1, 4, 5, 6), 3, 5
    inits = {"w": _rand(6, 2, 2, 2, seed=1), "b": _rand(6, seed=2)}
    model = make_model([node], [("x", F, list(xs)), ("off", F, [1, 16, oh, ow]), ("m", F, [1, 8, oh, ow])],
                       [("y", F, None)], inits, opset=22)
    feeds = {"x": _rand(*xs), "off": _rand(1, 16, oh, ow, seed=3),
             "m": np.random.default_rng(4).uniform(0, 1, (1, 8, oh, ow)).astype(np.float32)}
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(run_lowered(model, feeds)["y"], want, rtol=1e-4, atol=1e-5)


def test_runtime_scales_ask_for_a_constant():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    model = make_model([node], [("x", F, [1, 1, 2, 2]), ("scales", F, [4])], [("y", F, None)], opset=13)
    from graphopt.backends.lowering.testing import run_lowered

    with pytest.raises(UnsupportedError, match="scales"):
        run_lowered(model, {"x": _rand(1, 1, 2, 2), "scales": np.ones(4, np.float32)})

"""ConvTranspose with a stride > 1 as one conv over the output phases (backends/lowering/conv_transpose.py):
numerics against ONNX Runtime over strides, kernels, pads and output padding, lowered and scheduled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.backends.lowering import lower
from graphopt.backends.schedules.testing import build, ort_run

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import check_against_ort, make_model  # noqa: E402

F = TensorProto.FLOAT


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(xs, ws, attrs, bias=True, weight_input=False):
    ins = ["x", "w", "b"] if bias else ["x", "w"]
    node = helper.make_node("ConvTranspose", ins, ["y"], **attrs)
    inits = {"b": _rand(ws[1], seed=2)} if bias else {}
    inputs = [("x", F, list(xs))]
    if weight_input:
        inputs.append(("w", F, list(ws)))
    else:
        inits["w"] = _rand(*ws, seed=1)
    return make_model([node], inputs, [("y", F, None)], inits, opset=13)


PHASE = [
    # x shape, w shape [C, O, kh, kw], attributes
    ((1, 6, 5, 5), (6, 4, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),           # ViT-S's decoder head
    ((2, 3, 4, 6), (3, 5, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    ((1, 4, 5, 4), (4, 3, 5, 3), dict(strides=[3, 2], pads=[2, 0, 1, 1])),           # kernel not a stride multiple
    ((1, 2, 3, 4), (2, 3, 2, 3), dict(strides=[3, 3], output_padding=[2, 1])),       # output past the kernel
    ((1, 3, 4, 4), (3, 2, 3, 3), dict(strides=[2, 2], output_shape=[9, 8])),          # pads from output_shape
    ((1, 3, 5, 4), (3, 2, 4, 4), dict(strides=[2, 1], pads=[1, 0, 1, 2])),           # stride 1 on one axis
]


@pytest.mark.parametrize("xs,ws,attrs", PHASE, ids=[str(i) for i in range(len(PHASE))])
def test_phase_conv_transpose_matches_ort(xs, ws, attrs):
    model = _model(xs, ws, attrs)
    text = str(lower(ir.from_proto(model)).mod)
    assert "conv2d_transpose" not in text and "R.nn.conv2d(" in text  # the phase conv, no dilated input
    check_against_ort(model, {"x": _rand(*xs)})


def test_weight_computed_at_run_time():
    """A weight that is a graph input is rearranged into the phase kernel in the graph."""
    xs, ws = (1, 3, 4, 5), (3, 2, 4, 3)
    model = _model(xs, ws, dict(strides=[2, 2], pads=[1, 0, 1, 1]), weight_input=True)
    check_against_ort(model, {"x": _rand(*xs), "w": _rand(*ws, seed=5)})


@pytest.mark.parametrize("attrs", [dict(strides=[2, 2], dilations=[2, 2]), dict(strides=[2, 2], group=3),
                                   dict(strides=[1, 1], pads=[1, 0, 0, 1])])
def test_other_forms_keep_the_transposed_conv(attrs):
    """Dilation, groups and stride 1 stay Relax's conv2d_transpose, and still match."""
    xs, ws = (1, 3, 4, 4), (3, 2, 3, 3)
    model = _model(xs, ws, attrs, bias=False)
    assert "conv2d_transpose" in str(lower(ir.from_proto(model)).mod)
    check_against_ort(model, {"x": _rand(*xs)})


def test_scheduled_vit_head_matches_ort():
    """ViT-S's 4x4 stride-2 upsampling at its channel counts (smaller map), with the default schedules:
    the phase conv takes the conv2d rule and no function is left to the generic schedule."""
    xs, ws = (1, 384, 6, 6), (384, 256, 4, 4)
    model = _model(xs, ws, dict(strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4]))
    feeds = {"x": _rand(*xs, seed=3)}
    built = build(model, {"x": xs})
    assert any(r.startswith("conv2d") for r in built.report.values()), built.report
    assert "generic" not in built.report.values(), built.report
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-3, atol=1e-4)


def test_upsampling_head_with_a_one_channel_conv_runs_blocked():
    """ViT-S's decoder: 4x4 stride-2 upsamplings, then a 64->1 conv on the largest map. The narrow conv
    reads its input converted to NCHW; the upsampling convs stay in the blocked layout."""
    import onnx_ir as ir

    from graphopt.backends.compile import compile_model
    from graphopt.backends.schedules import last_report

    ws, b2 = _rand(32, 32, 4, 4, seed=1) * 0.1, _rand(1, 32, 1, 1, seed=2) * 0.1
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1"], ["u1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["u1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w1"], ["u2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["u2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2"], ["y"]),
    ]
    model = make_model(nodes, [("x", F, [1, 32, 12, 12])], [("y", F, None)], {"w1": ws, "w2": b2}, opset=13)
    x = _rand(1, 32, 12, 12, seed=3)
    got = compile_model(ir.serde.deserialize_model(model))(x=x)["y"]
    rules = last_report()
    assert list(rules.values()).count("conv2d_blocked") == 2, rules
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-4)

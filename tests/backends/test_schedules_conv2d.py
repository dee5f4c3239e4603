"""Default conv2d schedules: numerics against ONNX Runtime over a sweep of shapes, and the speed-up."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.schedules.testing import build, ort_run

# (N, C, H, W, O, K, stride, pad, dilation, groups, epilogue)
CASES = [
    (1, 16, 14, 14, 32, 3, 1, 1, 1, 1, "relu"),      # width-vector plan
    (1, 16, 15, 13, 32, 3, 2, 1, 1, 1, "relu"),      # odd sizes, stride 2: channel-vector plan
    (2, 8, 9, 11, 16, 1, 1, 0, 1, 1, "none"),        # batch 2, 1x1
    (1, 12, 10, 10, 20, 3, 1, 2, 2, 1, "bias"),      # dilation 2, channels not a lane multiple
    (1, 16, 12, 12, 16, 3, 1, 1, 1, 16, "relu"),     # depthwise
    (1, 16, 13, 13, 16, 3, 2, 1, 1, 16, "relu"),     # depthwise stride 2 (generic fallback)
    (1, 8, 10, 10, 12, 3, 1, 1, 1, 2, "bias"),       # grouped
    (1, 32, 7, 7, 64, 3, 1, 1, 1, 1, "add"),         # narrow 7x7 map: channel-vector plan, residual add
    (1, 3, 17, 17, 16, 7, 2, 3, 1, 1, "relu"),       # stem-like 7x7 stride 2, 3 input channels
    (1, 8, 6, 20, 16, (1, 5), 1, (0, 2), 1, 1, "none"),  # non-square kernel
]


def conv_model(n, c, h, w, o, k, stride, pad, dil, groups, epi, rng):
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    wt = rng.standard_normal((o, c // groups, kh, kw)).astype(np.float32) * 0.2
    b = rng.standard_normal(o).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(b, "b")]
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if epi != "none" else []), ["c"],
                            strides=[stride, stride], pads=[ph, pw, ph, pw], dilations=[dil, dil], group=groups)
    nodes = [conv]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])]
    out = "c"
    if epi == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        out = "y"
    elif epi == "add":
        oh = (h + 2 * ph - dil * (kh - 1) - 1) // stride + 1
        ow = (w + 2 * pw - dil * (kw - 1) - 1) // stride + 1
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [n, o, oh, ow]))
        nodes.append(helper.make_node("Add", ["c", "r"], ["y"]))
        out = "y"
    graph = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", CASES, ids=[f"conv{i}" for i in range(len(CASES))])
def test_conv2d_matches_ort(case):
    rng = np.random.default_rng(0)
    model = conv_model(*case, rng)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    built = build(model, {k: v.shape for k, v in feeds.items()})
    # grouped convs with a strided width have no vector plan yet: they keep the generic schedule
    expected = "generic" if case[9] > 1 and case[6] > 1 else "conv2d"
    assert set(built.report.values()) == {expected}, built.report
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_plans_chosen():
    """Stride 1 takes the width-vector plan, stride 2 the channel-vector plan: both are 'conv2d'."""
    rng = np.random.default_rng(1)
    for case in (CASES[0], CASES[1], CASES[7]):
        model = conv_model(*case, rng)
        built = build(model, {"x": case[:4], **({"r": (1, 64, 7, 7)} if case[-1] == "add" else {})})
        assert "conv2d" in built.report.values(), built.report


def test_scheduled_conv_is_much_faster():
    """A 3x3 conv (32 ch, 28x28) + relu: the default schedule beats the unscheduled loops by 5x or more."""
    rng = np.random.default_rng(2)
    model = conv_model(1, 32, 28, 28, 32, 3, 1, 1, 1, 1, "relu", rng)
    feeds = {"x": rng.standard_normal((1, 32, 28, 28)).astype(np.float32)}
    fast = build(model, {"x": (1, 32, 28, 28)})
    slow = build(model, {"x": (1, 32, 28, 28)}, scheduled=False)
    np.testing.assert_allclose(fast(feeds)[0], slow(feeds)[0], rtol=1e-4, atol=1e-4)
    t_fast = fast.time_ms(feeds, number=10)
    t_slow = slow.time_ms(feeds, number=1)
    assert t_slow / t_fast >= 5, (t_slow, t_fast)


@pytest.mark.parametrize(
    "shape,o,k,stride,pad,out_pad",
    [((1, 8, 10, 10), 8, 2, 2, 0, 0), ((1, 6, 7, 9), 10, 3, 2, 1, 1), ((2, 4, 5, 5), 4, 3, 1, 1, 0)],
)
def test_conv_transpose_matches_ort(shape, o, k, stride, pad, out_pad):
    from graphopt.backends.schedules.testing import single_node_model

    rng = np.random.default_rng(3)
    w = rng.standard_normal((shape[1], o, k, k)).astype(np.float32)
    model = single_node_model("ConvTranspose", {"x": shape}, {"w": w}, strides=[stride, stride],
                              kernel_shape=[k, k], pads=[pad] * 4, output_padding=[out_pad, out_pad])
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    built = build(model, {"x": shape})
    assert "conv2d" in built.report.values(), built.report  # a conv over the dilated input
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_constant_weight_is_repacked_at_compile_time():
    """A 1x1 conv on a 7x7 map takes the channel-vector plan with its constant weight packed once."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from graphopt.backends.schedules import apply_default_schedules, features_of
    from graphopt.backends.schedules.conv2d import CHANNEL_VECTORS
    from graphopt.backends.schedules.tiling import accumulator_tile
    from graphopt.backends.schedules.prepack import REPACK_ATTR
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(4)
    model = conv_model(1, 32, 7, 7, 48, 1, 1, 0, 1, 1, "relu", rng)
    mod = from_onnx(model, {"x": (1, 32, 7, 7)}, keep_params_in_input=False)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.FoldConstant(),
                                    relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])(mod)
    feats = features_of(get_target("x86"))  # the host: the compiled function runs here
    out = apply_default_schedules(mod, feats.target)
    (func,) = [f for _, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    lanes = max(d for d in range(1, feats.lanes() + 1) if 48 % d == 0)
    # two channel vectors per register tile when the 7 columns still fill it with them (AVX-512: 2x7
    # accumulators); else one vector by 7 columns (AVX2: 2x1 would leave the tile nearly empty)
    if 48 % (2 * lanes) == 0 and CHANNEL_VECTORS == 2 and 2 * accumulator_tile(feats, 7, 2) > accumulator_tile(feats, 7, 1):
        lanes *= 2
    assert [int(d) for d in func.params[1].ty.shape] == [48 // lanes, 32, 1, 1, lanes]
    assert REPACK_ATTR not in (func.attrs or {})
    ex = tvm.compile(out, target=feats.target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = rng.standard_normal((1, 32, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_weight_given_as_input_is_repacked_per_call_when_strided():
    """A weight that is a graph input cannot be packed at compile time: a strided conv repacks it per call."""
    rng = np.random.default_rng(5)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
    graph = helper.make_graph(
        [node], "convw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 9, 9]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 8, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((1, 8, 9, 9)).astype(np.float32), "w": rng.standard_normal((16, 8, 3, 3)).astype(np.float32)}
    built = build(model, {"x": (1, 8, 9, 9), "w": (16, 8, 3, 3)})  # stride 2: repacked inside the function
    assert "conv2d" in built.report.values()
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_hardswish_epilogue_and_zero_pad_fold_into_one_loop_nest():
    """A 1x1 conv whose output feeds x * clip(x/6 + 1/2, 0, 1) (x used twice, as exporters write
    HardSwish) and a final affine: one loop nest, no copy of the input for a pad of zero width."""
    import onnx_ir as ir
    import tvm
    from tvm import relax

    from graphopt.backends.compile import fused_module
    from graphopt.backends.schedules import apply_default_schedules, features_of
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((32, 16, 1, 1)) * 0.3).astype(np.float32)
    consts = {"w": w, "b": rng.standard_normal(32).astype(np.float32), "sixth": np.float32(1 / 6),
              "half": np.float32(0.5), "zero": np.float32(0), "one": np.float32(1), "g": np.float32(1.5)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Mul", ["c", "sixth"], ["t1"]), helper.make_node("Add", ["t1", "half"], ["t2"]),
             helper.make_node("Max", ["t2", "zero"], ["t3"]), helper.make_node("Min", ["t3", "one"], ["t4"]),
             helper.make_node("Mul", ["c", "t4"], ["hs"]), helper.make_node("Mul", ["hs", "g"], ["t5"]),
             helper.make_node("Add", ["t5", "half"], ["y"])]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 40, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = fused_module(ir.from_proto(model), "x86", opt_level=2)  # graphopt's lowering, as compile does
    feats = features_of(get_target("x86"))
    out = apply_default_schedules(mod, feats.target)
    funcs = {gv.name_hint: f for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    (func,) = funcs.values()
    text = func.script()
    import re

    # accumulator init, update and its write-back, which computes the whole epilogue; no pad, no other pass
    assert sorted(set(re.findall(r'T\.sblock\("(\w+)"\)', text)) - {"root"}) == [
        "conv2d_nchw_init", "conv2d_nchw_intermediate_local", "conv2d_nchw_update"], text
    vm = relax.VirtualMachine(tvm.compile(out, target=feats.target), tvm.cpu())
    x = rng.standard_normal((1, 16, 40, 48)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


KNOB_CASES = [
    (1, 16, 14, 14, 32, 1, 1, 0, 1, 1, "relu"),     # pointwise: both plans, packed input
    (1, 16, 15, 13, 32, 3, 2, 1, 1, 1, "relu"),     # strided: channel-vector plan
    (1, 16, 16, 16, 32, 3, 1, 1, 1, 1, "add"),      # width-vector plan, residual add
    (1, 16, 12, 12, 16, 3, 1, 1, 1, 16, "relu"),    # depthwise: row accumulation
]


@pytest.mark.parametrize("case", KNOB_CASES, ids=[f"knobs{i}" for i in range(len(KNOB_CASES))])
def test_every_decision_one_step_from_the_default_matches_ort(case):
    """What a tuning search may pick must be as correct as the default: every schedule one decision
    away from the default (register tiles at the ends of their range), compiled and run against ORT."""
    import tvm

    from graphopt.backends.schedules import features_of, schedule_with_knobs
    from graphopt.backends.schedules.prepack import constant_params
    from graphopt.backends.schedules.testing import fused, host_target
    from graphopt.backends.tuning.search import neighbours

    rng = np.random.default_rng(0)
    model = conv_model(*case, rng)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    shapes = {k: v.shape for k, v in feeds.items()}
    mod = fused(model, shapes)
    consts = constant_params(mod)
    gv, func = next((gv, f) for gv, f in mod.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint)
    _, rule, knobs = schedule_with_knobs(func, features_of(host_target()), consts.get(gv.name_hint, frozenset()))
    options = dict(knobs.options)
    if "rt" in options:
        options["rt"] = tuple(dict.fromkeys((knobs.taken["rt"], min(options["rt"]), max(options["rt"]))))
    choices = neighbours(knobs.taken, options)
    assert rule == "conv2d" and choices, knobs.options
    if case[5] == 1:
        assert {"pack_input": True} in [{k: v} for c in choices for k, v in c.items() if k == "pack_input"]
    want = ort_run(model, feeds)[0]
    for choice in choices:
        got = build(model, shapes, choice=choice)(feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(choice))

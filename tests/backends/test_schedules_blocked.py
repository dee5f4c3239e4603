"""The blocked channel layout (NCHW[b]c): which models take it, numerics against ONNX Runtime through
the whole compile pipeline, Winograd on blocked data, the weights relaid out at compile time, and
every decision of the blocked conv rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.compile import compile_model
from graphopt.backends.constants import fold_layout_of_constants, relayout_numpy
from graphopt.backends.schedules import blocked, last_report
from graphopt.backends.schedules.testing import ort_run


def _model(nodes, inits, shape, opset=17):
    graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv(rng, inits, name, x, out, o, c, k, stride=1, pad=0, group=1):
    w = (rng.standard_normal((o, c // group, k, k)) / np.sqrt(k * k * c // group)).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}_w"),
              numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), f"{name}_b")]
    return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], pads=[pad] * 4,
                            strides=[stride] * 2, group=group)


def resnet_like(rng, group: int = 1):
    """A stem on 3 channels, a residual bottleneck (with a 64-channel 3x3 that Winograd takes), a
    max pool, a fire-style concat of a 1x1 and a 3x3, a strided conv, global pooling and a Gemm.
    ``group``: the groups of one 3x3 conv (64: depthwise)."""
    inits: list = []
    n = [
        _conv(rng, inits, "stem", "x", "s", 64, 3, 3, stride=2, pad=1), helper.make_node("Relu", ["s"], ["s1"]),
        _conv(rng, inits, "a", "s1", "a0", 64, 64, 1), helper.make_node("Relu", ["a0"], ["a1"]),
        _conv(rng, inits, "b", "a1", "b0", 64, 64, 3, pad=1, group=group),
        helper.make_node("Relu", ["b0"], ["b1"]),
        _conv(rng, inits, "c", "b1", "c0", 64, 64, 1), helper.make_node("Add", ["c0", "s1"], ["r"]),
        helper.make_node("Relu", ["r"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
        _conv(rng, inits, "e1", "p", "e1o", 32, 64, 1), _conv(rng, inits, "e3", "p", "e3o", 32, 64, 3, pad=1),
        helper.make_node("Concat", ["e1o", "e3o"], ["cat"], axis=1), helper.make_node("Relu", ["cat"], ["cat1"]),
        _conv(rng, inits, "d", "cat1", "d0", 48, 64, 3, stride=2, pad=1),
        helper.make_node("GlobalAveragePool", ["d0"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
    ]
    inits.append(numpy_helper.from_array(rng.standard_normal((48, 10)).astype(np.float32), "fc"))
    n.append(helper.make_node("MatMul", ["f", "fc"], ["y"]))
    return _model(n, inits, [2, 3, 33, 31])


def _compile(model):
    return compile_model(ir.serde.deserialize_model(model))


def test_conv_chain_runs_blocked_and_matches_ort():
    rng = np.random.default_rng(0)
    model = resnet_like(rng)
    x = rng.standard_normal((2, 3, 33, 31)).astype(np.float32)
    got = _compile(model)(x=x)["y"]
    rules = last_report()
    assert list(rules.values()).count("conv2d_blocked") >= 5, rules
    assert "winograd" in rules.values(), rules  # the 64->64 3x3 on 17x16, on blocked data
    assert any("nchwc" in name for name in rules), rules
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_stem_writes_the_blocked_layout_and_the_pool_follows():
    """The stem reads its NCHW input in place, 3 channels as one block, and writes NCHW16c: the max pool after it
    runs blocked, its pad folded into the window (no pad block left), and nothing converts between."""
    from graphopt.backends.lowering import lower

    rng = np.random.default_rng(4)
    inits: list = []
    nodes = [_conv(rng, inits, "stem", "x", "s", 32, 3, 3, stride=2, pad=1), helper.make_node("Relu", ["s"], ["s1"]),
             helper.make_node("MaxPool", ["s1"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             _conv(rng, inits, "a", "p", "a0", 32, 32, 1), _conv(rng, inits, "b", "a0", "y", 32, 32, 1)]
    model = _model(nodes, inits, [1, 3, 30, 26])
    mod = blocked.to_blocked_layout(lower(ir.from_proto(model)).mod, 16, min_convs=1)
    text = mod["main"].script()
    assert 'data_layout="NCHW", kernel_layout="OIHW3i16o", out_layout="NCHW16c"' in text
    assert "R.layout_transform(x" not in text  # the input is not converted
    assert 'layout="NCHW16c", out_layout="NCHW16c"' in text  # the max pool
    x = rng.standard_normal((1, 3, 30, 26)).astype(np.float32)
    compiled = compile_model(ir.serde.deserialize_model(model))
    got = compiled(x=x)["y"]
    rules = last_report()
    assert [r for n, r in rules.items() if "pool" in n] == ["pool"], rules
    assert "conv2d_blocked" in rules.values() and "conv2d" not in rules.values(), rules  # the stem (1x1s: AMX)
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_depthwise_conv_runs_blocked():
    rng = np.random.default_rng(1)
    model = resnet_like(rng, group=64)
    x = rng.standard_normal((2, 3, 33, 31)).astype(np.float32)
    got = _compile(model)(x=x)["y"]
    assert any("depthwise_nchwc" in name for name in last_report()), last_report()
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_model_with_a_grouped_conv_stays_nchw(monkeypatch):
    monkeypatch.setattr(blocked, "SMALL_ELEMENTS", 1024)  # this test's maps count as large
    rng = np.random.default_rng(1)
    model = resnet_like(rng, group=4)
    x = rng.standard_normal((2, 3, 33, 31)).astype(np.float32)
    got = _compile(model)(x=x)["y"]
    assert "conv2d_blocked" not in last_report().values()
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_squeeze_excitation_with_odd_channels_keeps_the_model_blocked():
    """PP-OCRv4's SE blocks: a mean over the map, then convs on 1x1 maps whose channels (32->4->32) are
    not multiples of the block; those convert in no time, the convs around them stay blocked, and the
    4->32 conv (fewer input channels than a block, like an image stem) writes the blocked layout itself.
    (16 input and 32 output channels: multiples of every block, 4 on NEON to 16 on AVX-512.)"""
    rng = np.random.default_rng(6)
    inits: list = []
    nodes = [
        _conv(rng, inits, "a", "x", "a0", 32, 16, 3, pad=1), helper.make_node("Relu", ["a0"], ["a1"]),
        helper.make_node("GlobalAveragePool", ["a1"], ["g"]),
        _conv(rng, inits, "s", "g", "s0", 4, 32, 1), helper.make_node("Relu", ["s0"], ["s1"]),
        _conv(rng, inits, "e", "s1", "e0", 32, 4, 1), helper.make_node("HardSigmoid", ["e0"], ["e1"]),
        helper.make_node("Mul", ["a1", "e1"], ["m"]), helper.make_node("HardSwish", ["m"], ["h"]),
        _conv(rng, inits, "d", "h", "y", 32, 32, 3, pad=1, group=32),
    ]
    model = _model(nodes, inits, [1, 16, 20, 24])
    x = rng.standard_normal((1, 16, 20, 24)).astype(np.float32)
    got = _compile(model)(x=x)["y"]
    rules = last_report()
    assert list(rules.values()).count("conv2d_blocked") == 3, rules
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-4)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_BLOCKED", "0")
    _compile(resnet_like(np.random.default_rng(2)))
    assert "conv2d_blocked" not in last_report().values()


def test_why_not_names_the_reason():
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, 12, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((16, 12, 3, 3), "float32"))
    assert "multiples of 8" in blocked.why_not(relax.op.nn.conv2d(x, w), 8)
    assert blocked.why_not(relax.op.nn.conv2d(x, w), 4) is None
    wd = relax.Var("wd", relax.TensorType((12, 1, 3, 3), "float32"))
    assert blocked.why_not(relax.op.nn.conv2d(x, wd, groups=12), 4) is None
    wg = relax.Var("wg", relax.TensorType((12, 4, 3, 3), "float32"))
    assert "grouped" in blocked.why_not(relax.op.nn.conv2d(x, wg, groups=3), 4)


@pytest.mark.parametrize("shape,fn", [
    ((64, 32, 3, 3), lambda a, b, c, d: (a // 8, b // 8, c, d, b % 8, a % 8)),
    ((1, 4, 5, 7, 8), lambda a, b, c, d, e: (a, b * 8 + e, c, d)),
    ((2, 16, 3, 3), lambda a, b, c, d: (a, b // 4, c, d, b % 4)),
])
def test_weights_are_relaid_out_in_numpy_like_tvm(shape, fn):
    im = tvm.tirx.IndexMap.from_func(fn)
    value = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(relayout_numpy(im, value), im.map_tensor(tvm.runtime.tensor(value)).numpy())


def test_relayout_of_a_constant_folds_at_compile_time():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((16, 8, 1, 1), "float32"))
    w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8, 1, 1)
    with bb.function("main", [x]):
        with bb.dataflow():
            blocked_map = lambda a, b, c, d: (a // 8, b // 8, c, d, b % 8, a % 8)  # noqa: E731
            lt = bb.emit(relax.op.layout_transform(relax.const(w), blocked_map))
            out = bb.emit_output(relax.op.add(lt, lt))
        bb.emit_func_output(out)
    folded = fold_layout_of_constants(bb.get())
    assert "layout_transform" not in folded.script()


KNOB_CASES = [
    (16, 13, 11, 32, 3, 1, 1, False),   # odd sizes, padded 3x3
    (32, 7, 7, 64, 1, 1, 0, False),     # pointwise on 7x7
    (16, 15, 16, 16, 3, 2, 1, False),   # strided
    (16, 13, 14, 16, 3, 1, 1, True),    # depthwise
    (16, 15, 15, 16, 5, 2, 2, True),    # depthwise 5x5, strided
]


@pytest.mark.parametrize("case", KNOB_CASES, ids=[f"blocked{i}" for i in range(len(KNOB_CASES))])
def test_every_decision_of_the_blocked_rule_matches_numpy(case):
    """Every schedule one decision away from the default (what the tuning search may pick), against a
    float64 reference of the same blocked conv."""
    from tvm import relax

    from graphopt.backends.schedules import features_of, schedule_with_knobs
    from graphopt.backends.schedules.testing import host_target
    from graphopt.backends.tuning.search import neighbours

    c, h, w_, o, k, s, p, depthwise = case
    feats = features_of(host_target())
    b = feats.lanes(32)
    rng = np.random.default_rng(4)
    data = rng.standard_normal((1, c // b, h, w_, b)).astype(np.float32)
    wshape = (c // b, 1, k, k, 1, b) if depthwise else (o // b, c // b, k, k, b, b)
    weight = rng.standard_normal(wshape).astype(np.float32)
    compute = blocked.depthwise_nchwc if depthwise else blocked.conv2d_nchwc
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(data.shape, "float32"))
    wv = relax.Var("w", relax.TensorType(weight.shape, "float32"))
    with bb.function("main", [xv, wv]):
        out = bb.emit_te(compute, xv, wv, (s, s), (p, p, p, p), (1, 1), primfunc_name_hint="conv")
        bb.emit_func_output(out)
    func = next(f for _, f in bb.get().functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    _, rule, knobs = schedule_with_knobs(func, feats)
    assert rule == "conv2d_blocked"
    xp = np.pad(data.astype(np.float64), [(0, 0), (0, 0), (p, p), (p, p), (0, 0)])
    oh, ow = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
    want = np.zeros((1, o // b, oh, ow, b))
    for ry in range(k):
        for rx in range(k):
            patch = xp[:, :, ry:ry + s * oh:s, rx:rx + s * ow:s, :]  # [1, C/b, oh, ow, b]
            if depthwise:
                want += patch * weight[None, :, 0, ry, rx, 0][:, :, None, None, :]
            else:
                want += np.einsum("nciyx,ocij->noyxj", patch.transpose(0, 1, 4, 2, 3),
                                  weight[:, :, ry, rx].astype(np.float64))
    options = dict(knobs.options)
    options["rt"] = tuple(dict.fromkeys((knobs.taken["rt"], min(options["rt"]), max(options["rt"]))))
    for choice in [knobs.taken, *neighbours(knobs.taken, options)]:
        sched, _, _ = schedule_with_knobs(func, feats, choice=choice)
        lib = tvm.tirx.build(tvm.IRModule({"main": sched.with_attr("global_symbol", "main")}), target=feats.target)
        got = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
        lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(weight), got)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4, err_msg=str(choice))


def test_one_element_constants_become_per_channel_so_the_layout_flows_through():
    """HardSwish's ``+ [3]`` and ``/ [6]``: Relax cannot relayout a [1] constant, a [1, C, 1, 1] one it can."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.const(np.array([3.0], np.float32))))
            out = bb.emit_output(relax.op.divide(y, relax.const(np.float32(6.0))))
        bb.emit_func_output(out)
    mod = blocked.per_channel_constants(bb.get())
    consts = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: consts.append(e) if isinstance(e, tvm.ir.expr.GenericConst) else None)
    assert [tuple(c.value.shape) for c in consts] == [(1, 16, 1, 1)] * 2
    xv = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(relax.transform.LegalizeOps()(mod), target="llvm"), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), (xv + 3) / 6, rtol=1e-6)

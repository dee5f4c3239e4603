"""Convolutions on AMX tiles: the bfloat16 split, the weight packing (emulated in numpy, so they are
checked on any machine), which conv chains the Relax rewrite takes, code generation for an AMX
target, and numerics against ONNX Runtime through the whole compile where the CPU has AMX-BF16."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import api
from graphopt.backends.compile import compile_model, fused_module
from graphopt.backends.schedules import amx_conv, amx_kernel
from graphopt.backends.schedules.testing import ort_run
from graphopt.backends.bundle.loader import cpu_has_amx
from graphopt.backends.targets import get_target

needs_amx = pytest.mark.skipif(not cpu_has_amx(), reason="needs a CPU with AMX-BF16 (and a kernel that grants it)")


def amx_spec():
    """The x86 preset with AMX on, whatever this host has: enough to rewrite and generate code."""
    spec = get_target("x86")
    config = {**spec.config, "mattr": ["+amx-tile", "+amx-bf16"]}
    return dataclasses.replace(spec, config=config, features={**spec.features, "amx": True})


def from_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_bf16_split_reconstructs_float32():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(10000) * 10.0 ** rng.integers(-20, 20, 10000)).astype(np.float32)
    hi, lo = amx_kernel.bf16_split(v)
    hi_f, lo_f = from_bits(hi), from_bits(lo)
    assert np.all(np.abs(v - hi_f) <= np.abs(v) * 2.0 ** -8)  # round to nearest: half a bf16 ulp
    rel = np.abs(v.astype(np.float64) - hi_f - lo_f) / np.abs(v)
    assert rel.max() <= 2.0 ** -16


def test_bf16_split_ties_to_even():
    v = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)  # halfway between two bfloat16
    assert list(from_bits(amx_kernel.bf16_split(v)[0])) == [1.0, 1 + 2.0 ** -6]


def emulate(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """The kernel's arithmetic in numpy (float64 sums): the split input rows, the packed weight
    tiles read as ``tdpbf16ps`` reads them, the three products, and the grid back to NCHW."""
    o, c, k, _ = w.shape
    _, _, h, wd = x.shape
    g = amx_kernel.geometry(h, wd, k, stride, pad)
    hi, lo = amx_kernel.bf16_split(x)
    ps = stride if k > 1 else 1  # phase grids: tap (ky, kx) reads phase (ky % ps, kx % ps)
    rows = np.zeros((2, ps * ps, c, g["rows"]))
    for i, part in enumerate((hi, lo)):
        if k == 1:
            rows[i, 0, :, :g["oh"] * g["ow"]] = from_bits(part)[0][:, ::stride, ::stride].reshape(c, -1)
            continue
        padded = np.zeros((c, g["gh"] * ps, g["gw"] * ps))
        padded[:, pad:pad + h, pad:pad + wd] = from_bits(part)[0]
        for ph in range(ps * ps):
            rows[i, ph, :, :g["gh"] * g["gw"]] = padded[:, ph // ps::ps, ph % ps::ps].reshape(c, -1)
    packed = amx_kernel.pack_weight(w)  # [O/16, taps, C/32, 2, 16 (pairs), 16 (out), 2]
    wf = from_bits(packed).astype(np.float64)
    # back to [2, O, C, taps]: tile row kp, column n, pair p is channel 2·kp + p of output n
    ob, taps, kc, _, kp, n, p = wf.shape
    wt = wf.transpose(3, 0, 5, 2, 4, 6, 1).reshape(2, ob * n, kc * kp * p, taps)
    q = g["qt"] * 16
    out = np.zeros((o, q))
    for t in range(taps):
        ky, kx = divmod(t, k)
        shift = (ky // ps) * g["gw"] + kx // ps
        a = rows[:, (ky % ps) * ps + kx % ps, :, shift:shift + q]
        out += wt[0, :, :, t] @ a[0] + wt[1, :, :, t] @ a[0] + wt[0, :, :, t] @ a[1]
    return out[:, :g["oh"] * g["gw"]].reshape(o, g["oh"], g["gw"])[:, :, :g["ow"]][None]


def conv_ref(x, w, stride, pad):
    o, c, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (xp.shape[2] - k) // stride + 1
    ow = (xp.shape[3] - k) // stride + 1
    out = np.zeros((1, o, oh, ow))
    for ky in range(k):
        for kx in range(k):
            patch = xp[0, :, ky:ky + stride * (oh - 1) + 1:stride, kx:kx + stride * (ow - 1) + 1:stride]
            out[0] += np.einsum("chw,oc->ohw", patch, w[:, :, ky, kx].astype(np.float64))
    return out


@pytest.mark.parametrize("c,o,h,w,k,stride,pad", [
    (32, 32, 5, 7, 3, 1, 1),  # a grid row of 9: tiles straddle rows
    (64, 32, 6, 6, 1, 2, 0),  # strided 1x1: the split gathers every other position
    (32, 64, 4, 4, 5, 1, 2),
    (32, 32, 7, 6, 3, 2, 1),  # stride 2: four phase grids (odd height: the last phase row is padding)
])
def test_packing_and_split_emulated(c, o, h, w, k, stride, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    got, want = emulate(x, wt, stride, pad), conv_ref(x, wt, stride, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def bottleneck_model(rng, c=64, hw=14, mid=32, out=128):
    """A ResNet bottleneck with a projection shortcut, then a strided 1x1 and a 3x3 of 48 channels
    (not a multiple of 32: left to the other rules)."""
    specs = [("c1", "x", mid, c, 1, 1), ("c2", "r1", mid, mid, 3, 1), ("c3", "r2", out, mid, 1, 1),
             ("sc", "x", out, c, 1, 1), ("c4", "r4", 64, out, 1, 2), ("c5", "r5", 48, 64, 3, 1)]
    after = {"c1": [("Relu", ["c1y"], "r1")], "c2": [("Relu", ["c2y"], "r2")],
             "sc": [("Add", ["c3y", "scy"], "s3"), ("Relu", ["s3"], "r4")], "c4": [("Relu", ["c4y"], "r5")],
             "c5": [("Relu", ["c5y"], "y")]}
    nodes, inits = [], []
    for name, src, oc, ic, k, s in specs:
        inits += [numpy_helper.from_array((rng.standard_normal((oc, ic, k, k)) / np.sqrt(ic * k * k)).astype(np.float32), f"{name}w"),
                  numpy_helper.from_array((rng.standard_normal(oc) * 0.1).astype(np.float32), f"{name}b")]
        nodes.append(helper.make_node("Conv", [src, f"{name}w", f"{name}b"], [f"{name}y"], kernel_shape=[k, k],
                                      strides=[s, s], pads=[k // 2] * 4))
        nodes += [helper.make_node(op, ins, [o]) for op, ins, o in after.get(name, [])]
    h2 = (hw + 1) // 2
    graph = helper.make_graph(nodes, "bottleneck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48, h2, h2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def kernel_calls(mod) -> list[str]:
    text = mod["main"].script(show_meta=False)
    return [line for line in text.splitlines() if "amx_conv2d" in line]


def test_rewrite_takes_chains_with_their_epilogues(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(bottleneck_model(np.random.default_rng(2)), path)
    mod = fused_module(api.load(path), amx_spec())
    calls = kernel_calls(mod)
    assert len(calls) == 5, calls  # c1, c2, the shortcut, c3 (adding the shortcut), c4 strided; not c5 (48 channels)
    text = mod["main"].script(show_meta=False)
    assert "R.add(" not in text and "R.maximum(" not in text  # bias, residual and relu went into kernels
    args = [re.search(r"call_tir\(amx_conv2d\d*, \((.*?)\), out_ty", c).group(1).split(", ") for c in calls]
    residual = [a for a in args if len(a) == 4]  # (x, weight, bias, residual)
    assert len(residual) == 1, calls


def test_no_rewrite_without_amx_or_when_off(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(bottleneck_model(np.random.default_rng(2)), path)
    model = api.load(path)
    plain = dataclasses.replace(get_target("x86"), features={**get_target("x86").features, "amx": False})
    assert not kernel_calls(fused_module(model, plain))
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert not kernel_calls(fused_module(model, amx_spec()))


def blocked_conv(channels, out, k=3, hw=8, **kw):
    x = tvm.relax.Var("x", tvm.relax.TensorType((1, channels // 16, hw, hw, 16), "float32"))
    w = tvm.relax.const(np.zeros((out // 16, channels // 16, k, k, 16, 16), "float32"))
    args = dict(data_layout="NCHW16c", kernel_layout="OIHW16i16o", out_layout="NCHW16c", padding=[k // 2] * 4)
    args.update(kw)
    return tvm.relax.op.nn.conv2d(x, w, **args), w


def test_why_not_reasons():
    call, w = blocked_conv(64, 64)
    assert amx_conv.why_not(call, w) is None
    assert amx_conv.why_not(call, None) == "weight is not a constant"
    assert "multiples of 32" in amx_conv.why_not(*blocked_conv(48, 64))
    assert amx_conv.why_not(*blocked_conv(64, 64, strides=[2, 2])) is None
    assert "stride 3" in amx_conv.why_not(*blocked_conv(64, 64, strides=[3, 3]))
    assert "padded 1x1" in amx_conv.why_not(*blocked_conv(64, 64, k=1, padding=[1, 1, 1, 1]))
    assert "dilated" in amx_conv.why_not(*blocked_conv(64, 64, dilation=[2, 2]))
    big, w = blocked_conv(64, 64, hw=28)  # a 3x3 with 784 outputs: left to Winograd
    assert "28x28 outputs" in amx_conv.why_not(big, w)
    assert amx_conv.why_not(big, w, cost_model=False) is None
    assert amx_conv.why_not(*blocked_conv(64, 256, k=1, hw=56, padding=[0] * 4), cost_model=False) is None
    x = tvm.relax.Var("x", tvm.relax.TensorType((1, 64, 8, 8), "float32"))
    w = tvm.relax.const(np.zeros((64, 64, 3, 3), "float32"))
    assert "layout" in amx_conv.why_not(tvm.relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1]), w)


def test_kernel_code_generates_tile_instructions():
    func = amx_kernel.amx_conv_func(32, 6, 6, 32, 3, 1, 1, epilogue=amx_kernel.Epilogue.bias(True, True), threads=2)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=amx_spec().target)
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    for instr in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored"):
        assert instr in asm


@needs_amx
def test_bottleneck_matches_ort(tmp_path):
    rng = np.random.default_rng(3)
    model = bottleneck_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compiled = compile_model(api.load(path), target="x86")
    x = rng.standard_normal((1, 64, 14, 14)).astype(np.float32)
    got, want = compiled(x=x)["y"], ort_run(model, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_amx
@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("c,o,hw,k,stride,residual", [
    (64, 64, 56, 3, 1, False),  # ResNet-50's first 3x3 (two K blocks)
    (256, 64, 13, 1, 1, True),  # a grid that is no whole number of tiles, with a residual
    (512, 128, 14, 1, 2, False),  # a strided 1x1 with four K blocks
    (128, 64, 15, 3, 2, True),  # a strided 3x3 over an odd size: phase grids
    (512, 64, 27, 1, 1, True),  # banded: three bands a thread, the second thread's last one short
])
def test_kernel_matches_float64(c, o, hw, k, stride, residual, banded):
    """The kernel against a float64 conv, with one shared split pass and with a split per band."""
    check_kernel(c, o, hw, k, stride, residual, banded, threads=2)


@needs_amx
@pytest.mark.parametrize("banded", [False, True])
def test_kernel_items_taken_by_other_threads(banded):
    """Compiled for 5 threads, run by a pool of fewer: the first threads to run take the items of the
    ranges whose threads have not started (walking them from their ends); no item may be left out,
    run after run."""
    for _ in range(2):
        check_kernel(512, 64, 27, 1, 1, True, banded, threads=5)


def check_kernel(c, o, hw, k, stride, residual, banded, threads):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    pad = k // 2
    want = conv_ref(x, w, stride, pad) + bias[None, :, None, None]
    oh = want.shape[2]
    res = rng.standard_normal((1, o, oh, oh)).astype(np.float32)
    if residual:
        want = want + res
    want = np.maximum(want, 0)
    func = amx_kernel.amx_conv_func(c, hw, hw, o, k, stride, pad, epilogue=amx_kernel.Epilogue.bias(residual, True),
                                    threads=threads, banded=banded)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("x86").target)
    blk = lambda a: np.ascontiguousarray(a.reshape(1, a.shape[1] // 16, 16, *a.shape[2:]).transpose(0, 1, 3, 4, 2))  # noqa: E731
    args = [blk(x), amx_kernel.pack_weight(w), bias.reshape(1, o // 16, 16)] + ([blk(res)] if residual else [])
    out = tvm.runtime.empty((1, o // 16, oh, oh, 16), "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    got = out.numpy().transpose(0, 1, 4, 2, 3).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def hardswish_model(rng, c=64, hw=20, shared_tap=False):
    """Three 1x1 convs, each followed by bias and a hardswish written out as PaddleOCR exports it
    (y · clip(y + 3, 0, 6) / 6, then a per-channel scale and shift). ``shared_tap``: the second
    conv's ``y + 3`` is also a model output, so its chain ends at the bias (``y`` is used past it)."""
    nodes, inits = [], [numpy_helper.from_array(np.array(v, np.float32), n)
                        for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    src = "x"
    for i in range(3):
        inits += [numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array((1 + 0.1 * rng.standard_normal((1, c, 1, 1))).astype(np.float32), f"s{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal((1, c, 1, 1))).astype(np.float32), f"t{i}")]
        nodes += [helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"y{i}"], kernel_shape=[1, 1]),
                  helper.make_node("Add", [f"y{i}", "three"], [f"p{i}"]),
                  helper.make_node("Clip", [f"p{i}", "zero", "six"], [f"c{i}"]),
                  helper.make_node("Mul", [f"y{i}", f"c{i}"], [f"m{i}"]),
                  helper.make_node("Div", [f"m{i}", "six"], [f"h{i}"]),
                  helper.make_node("Mul", [f"s{i}", f"h{i}"], [f"g{i}"]),
                  helper.make_node("Add", [f"g{i}", f"t{i}"], [f"a{i}"])]
        src = f"a{i}"
    outputs = [helper.make_tensor_value_info("a2", TensorProto.FLOAT, [1, c, hw, hw])]
    if shared_tap:
        outputs.append(helper.make_tensor_value_info("p1", TensorProto.FLOAT, [1, c, hw, hw]))
    graph = helper.make_graph(nodes, "hardswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shared_tap", [False, True])
def test_rewrite_takes_elementwise_epilogues(tmp_path, shared_tap):
    """Bias, hardswish, scale and shift go into the kernels (the convs' 20x20 grids run banded); a
    value with a use outside the chain ends it."""
    path = tmp_path / "m.onnx"
    onnx.save(hardswish_model(np.random.default_rng(5), shared_tap=shared_tap), path)
    mod = fused_module(api.load(path), amx_spec())
    assert len(kernel_calls(mod)) == 3
    calls = re.findall(r"call_tir\((\w+),", mod["main"].script(show_meta=False))
    left = [c for c in calls if any(op in c for op in ("add", "maximum", "minimum", "multiply", "divide"))]
    if shared_tap:  # y + 3 is an output, y is used past it: the second chain ends at the bias
        assert left == ["add", "fused_maximum_minimum_multiply_divide_multiply1_add"], calls
    else:
        assert not left, calls


@needs_amx
@pytest.mark.parametrize("shared_tap", [False, True])
def test_elementwise_epilogues_match_ort(tmp_path, shared_tap):
    rng = np.random.default_rng(6)
    model = hardswish_model(rng, shared_tap=shared_tap)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compiled = compile_model(api.load(path), target="x86")
    x = rng.standard_normal((1, 64, 20, 20)).astype(np.float32)
    got, want = compiled(x=x), ort_run(model, {"x": x})
    for name, ref in zip(("a2", "p1"), want):
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

"""Integer code for QDQ models: QDQ groups fused into QConv/QGemm, compiled, and checked against ONNX
Runtime running the same QDQ model (which executes QDQ Conv as integer QLinearConv)."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from graphopt.backends.compile import _optimize, compile_model
from graphopt.backends.lowering.qdq_fuse import fuse_qdq


class _Reader:
    """Calibration data for ``quantize_static``: ``n`` random inputs."""

    def __init__(self, name, shape, n=6, seed=1):
        rng = np.random.default_rng(seed)
        self._data = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._data, None)


def quantize(float_path, q_path, name, shape, activation="QUInt8"):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(float_path), str(q_path), _Reader(name, shape), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8)
    return q_path


# (in, out, kernel, stride, pad, groups, activation after the conv)
NET = [(3, 16, 3, 2, 1, 1, "Relu"), (16, 24, 1, 1, 0, 1, "Relu"), (24, 24, 3, 1, 1, 24, None),
       (24, 24, 3, 1, 1, 1, None), (24, 40, 1, 1, 0, 1, None), (40, 13, 5, 2, 2, 1, "Relu"), (13, 33, 3, 1, 0, 1, None)]


def convnet(path, hw=13, gemm=False, seed=0, net=NET):
    """Convs with odd channel counts, strides, paddings, a depthwise conv, a residual Add, a Gemm."""
    rng = np.random.default_rng(seed)
    inits, nodes, y = [], [], "x"
    for i, (cin, cout, k, s, p, g, act) in enumerate(net):
        w = (rng.standard_normal((cout, cin // g, k, k)) / np.sqrt(cin // g * k * k)).astype(np.float32)
        inits += [nh.from_array(w, f"w{i}"), nh.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"b{i}")]
        strides = list(s) if isinstance(s, tuple) else [s, s]
        nodes.append(h.make_node("Conv", [y, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k, k], strides=strides,
                                 pads=[p] * 4, group=g))
        y = f"c{i}"
        if act:
            nodes.append(h.make_node(act, [y], [y + "a"]))
            y += "a"
        if i == 3:
            nodes.append(h.make_node("Add", [y, "c1a"], ["res"]))
            y = "res"
    if gemm:
        nodes.append(h.make_node("Flatten", [y], ["flat"]))
        n_in = 33 * (((hw + 1) // 2 + 1) // 2 - 2) ** 2
        inits += [nh.from_array((rng.standard_normal((10, n_in)) * 0.05).astype(np.float32), "gw"),
                  nh.from_array(np.zeros(10, np.float32) + 0.1, "gb")]
        nodes.append(h.make_node("Gemm", ["flat", "gw", "gb"], ["gemm"], transB=1))
        y = "gemm"
    graph = h.make_graph(nodes, "net", [h.make_tensor_value_info("x", TP.FLOAT, [1, net[0][0], hw, hw])],
                         [h.make_tensor_value_info(y, TP.FLOAT, None)], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), str(path))
    return path


def _ort(path, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _output_scale(q_path) -> float:
    """The scale of the DequantizeLinear that produces the model's output (one quantum)."""
    model = onnx.load(str(q_path))
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(next(nh.to_array(t) for t in model.graph.initializer if t.name == node.input[1]))


def _quanta(q_path, shape, compiled, seeds=(5, 6)):
    worst = 0.0
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        ref = _ort(q_path, {"x": x})[0]
        got = compiled(x)[compiled.output_names[0]]
        worst = max(worst, float(np.abs(ref - got).max()) / _output_scale(q_path))
    return worst


def _fused_ops(q_path):
    model, _ = _optimize(ir.load(str(q_path)), 2)
    fuse_qdq(model)
    return collections.Counter(n.op_type for n in model.graph)


@pytest.fixture(scope="module")
def qnet(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    return quantize(convnet(d / "f.onnx", gemm=True), d / "q.onnx", "x", (1, 3, 13, 13))


def test_every_qdq_conv_and_gemm_becomes_an_integer_op(qnet):
    ops = _fused_ops(qnet)
    assert ops["QConv"] == len(NET) and ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Gemm"] == 0 and ops["Relu"] == 0
    # the activations between fused ops stay quantized: no DequantizeLinear feeds a QConv's input
    model, _ = _optimize(ir.load(str(qnet)), 2)
    fuse_qdq(model)
    for node in model.graph:
        if node.op_type == "QConv":
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "DequantizeLinear"
            assert node.inputs[1].const_value.dtype == ir.DataType.INT8


def test_integer_net_matches_ort_on_the_qdq_model(qnet):
    compiled = compile_model(ir.load(str(qnet)), target="x86")
    assert _quanta(qnet, (1, 3, 13, 13), compiled) <= 1.0


def test_int8_activations_and_clip(tmp_path):
    """int8 (not uint8) activations, and a Clip(0, 6) between a Conv and its QuantizeLinear."""
    path = convnet(tmp_path / "f.onnx")
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Clip"
            node.input.extend(["lo", "hi"])
    model.graph.initializer.extend([nh.from_array(np.float32(0), "lo"), nh.from_array(np.float32(0.5), "hi")])
    onnx.save(model, str(path))
    q = quantize(path, tmp_path / "q.onnx", "x", (1, 3, 13, 13), activation="QInt8")
    ops = _fused_ops(q)
    assert ops["QConv"] == len(NET) and ops["Conv"] == 0
    compiled = compile_model(ir.load(str(q)), target="x86")
    assert _quanta(q, (1, 3, 13, 13), compiled) <= 1.0


def test_unmatched_groups_stay_float(tmp_path):
    """Asymmetric uint8 weights are not the int8 form: the conv stays float, and still matches."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = convnet(tmp_path / "f.onnx")
    q = tmp_path / "q.onnx"
    quantize_static(str(path), str(q), _Reader("x", (1, 3, 13, 13)), quant_format=QuantFormat.QDQ,
                    per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    ops = _fused_ops(q)
    assert ops["QConv"] == 0 and ops["Conv"] == len(NET)


@pytest.mark.slow
def test_rapidocr_cls_int8_matches_ort(tmp_path):
    from graphopt.front import api
    from graphopt.passes.opset_upgrade import try_upgrade

    model = api.optimize(api.load("rapidocr:cls", input_shapes=["x:1,3,48,192"])).model  # shapes inferred
    assert try_upgrade(model, 13)
    ir.save(model, tmp_path / "f.onnx")
    q = quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", "x", (1, 3, 48, 192))
    ops = _fused_ops(q)
    assert ops["QConv"] >= 50 and ops["Conv"] == 0
    compiled = compile_model(ir.load(str(q)), target="x86")
    x = np.random.default_rng(3).standard_normal((1, 3, 48, 192)).astype(np.float32)
    ref, got = _ort(q, {"x": x})[0], compiled(x)[compiled.output_names[0]]
    assert np.abs(ref - got).max() <= 1.0 / 255 + 1e-6  # one quantum of the softmax's uint8 output


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
def test_int8_bundle_cross_compiles_for_aarch64_dotprod(qnet, tmp_path):
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
    compile_model(ir.load(str(qnet)), target=target, output=tmp_path / "bundle")
    lib = next((tmp_path / "bundle").glob("*.so"))
    assert b"\xb7\x00" == lib.read_bytes()[18:20]  # ELF e_machine: EM_AARCH64


def _reference_qconv(x, w, corr, mult, k, s, p, zx, zy):
    """numpy: the padded (with zx) uint8 input times int8 weights in int64, then the requantization
    (``k`` and ``p`` ints or (vertical, horizontal) pairs)."""
    (kh, kw), (ph, pw) = ((k, k) if isinstance(k, int) else k), ((p, p) if isinstance(p, int) else p)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=zx)
    oh, ow = (xp.shape[2] - kh) // s + 1, (xp.shape[3] - kw) // s + 1
    acc = np.zeros((w.shape[0], oh, ow), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[0, :, ky:ky + s * oh:s, kx:kx + s * ow:s]
            acc += np.einsum("chw,oc->ohw", patch, w[:, :, ky, kx].astype(np.int64))
    v = (acc + corr[:, None, None]).astype(np.float32) * mult[:, None, None]
    return np.clip(np.round(v) + zy, 0, 255).astype(np.uint8)[None]


@pytest.mark.skipif(not __import__("graphopt.backends.bundle.loader", fromlist=["x"]).cpu_has_amx(),
                    reason="needs a CPU with AMX")
@pytest.mark.parametrize("c,h,w,o,k,s,p,layouts", [
    (64, 14, 14, 64, 3, 1, 1, "NCHW-NCHW"), (24, 13, 11, 40, 3, 2, 1, "NCHW-NCHW"), (16, 9, 9, 13, 1, 1, 0, "NCHW-NCHW"),
    (72, 15, 15, 33, 1, 2, 0, "NCHW-NCHW"), (40, 13, 13, 96, 5, 2, 2, "NCHW-NCHW"), (64, 14, 14, 64, 3, 1, 1, "NHWC-NHWC"),
    (72, 13, 11, 40, 3, 2, 1, "NHWC-NCHW"), (24, 9, 9, 33, 1, 1, 0, "NCHW-NHWC"), (130, 7, 7, 48, 1, 1, 0, "NHWC-NHWC")])
def test_amx_int8_kernel_exact(c, h, w, o, k, s, p, layouts):
    """Odd channel counts (padded to 64 in, 32 out; a partial block of 16 outputs takes the scalar
    requantization), strides, paddings, NCHW or NHWC input and output: exact against numpy."""
    import tvm

    from graphopt.backends.schedules.amx_int8 import pack_weight, padded_channels, qconv_func
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    _, op_ = padded_channels(c, o)
    corr, mult = np.zeros(op_, np.int32), np.zeros(op_, np.float32)
    corr[:o], mult[:o] = rng.integers(-5000, 5000, o), rng.uniform(1e-5, 3e-4, o)
    in_layout, out_layout = layouts.split("-")
    f = qconv_func(c, h, w, o, k, s, p, zx=7, zy=100, qmin=0, qmax=255, out_dtype="uint8", threads=2,
                   in_layout=in_layout, out_layout=out_layout)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=get_target("x86").target)
    ref = _reference_qconv(x, wt, corr[:o], mult[:o], k, s, p, 7, 100)
    nhwc = (0, 2, 3, 1)
    out = tvm.runtime.tensor(np.zeros(ref.transpose(nhwc).shape if out_layout == "NHWC" else ref.shape, np.uint8))
    x_in = np.ascontiguousarray(x.transpose(nhwc)) if in_layout == "NHWC" else x
    lib["main"](*[tvm.runtime.tensor(a) for a in (x_in, pack_weight(wt), corr, mult)], out)
    np.testing.assert_array_equal(out.numpy(), ref.transpose(nhwc) if out_layout == "NHWC" else ref)


@pytest.mark.skipif(not __import__("graphopt.backends.bundle.loader", fromlist=["x"]).cpu_has_amx(),
                    reason="needs a CPU with AMX")
@pytest.mark.parametrize("c,h,w,o,k,s,p", [(3, 23, 19, 64, 7, 2, 3), (13, 9, 9, 33, 3, 1, 0), (3, 12, 40, 16, 3, 2, 1),
                                           (48, 1, 40, 20, (1, 3), 1, (0, 1))])
def test_amx_int8_im2col_exact(c, h, w, o, k, s, p):
    """Few input channels or a 1x3 kernel (PP-OCRv4 rec's neck): the window as channels (im2col, zero
    point outside the input), then the kernel as a 1x1 conv: exact against numpy."""
    import tvm

    from graphopt.backends.schedules.amx_int8 import pack_weight, padded_channels, qconv_func
    from graphopt.backends.schedules.int8_im2col import im2col_func, im2col_weight, output_size
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, c, h, w), dtype=np.uint8)
    (kh, kw), (ph, pw) = ((k, k) if isinstance(k, int) else k), ((p, p) if isinstance(p, int) else p)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    window, (oh, ow) = kh * kw * c, output_size(h, w, k, s, p)
    kk, op_ = padded_channels(window, o)  # rows padded to 64 bytes (zeros, under zero weights)
    corr, mult = np.zeros(op_, np.int32), np.zeros(op_, np.float32)
    corr[:o], mult[:o] = rng.integers(-5000, 5000, o), rng.uniform(1e-5, 3e-4, o)
    target = get_target("x86").target
    build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)  # noqa: E731
    cols = tvm.runtime.tensor(np.zeros((1, oh, ow, kk), np.uint8))
    zp = tvm.runtime.tensor(np.full(1, 9, np.uint8))
    build(im2col_func(c, h, w, k, s, p, threads=2, width=kk))["main"](tvm.runtime.tensor(x), zp, cols)
    assert not cols.numpy()[..., window:].any()
    wide = np.zeros((o, kk, 1, 1), np.int8)
    wide[:, :window] = im2col_weight(wt)
    conv = build(qconv_func(kk, oh, ow, o, 1, 1, 0, zx=9, zy=100, qmin=0, qmax=255, out_dtype="uint8", threads=2,
                            in_layout="NHWC"))
    out = tvm.runtime.tensor(np.zeros((1, o, oh, ow), np.uint8))
    conv["main"](cols, *[tvm.runtime.tensor(a) for a in (pack_weight(wide), corr, mult)], out)
    np.testing.assert_array_equal(out.numpy(), _reference_qconv(x, wt, corr[:o], mult[:o], (kh, kw), s, (ph, pw), 9, 100))


def test_qdq_convs_run_on_amx_when_the_host_has_it(qnet):
    from graphopt.backends.compile import _bind_params, _front_end, _relax_passes, _Stages
    from graphopt.backends.schedules import int8_conv
    from graphopt.backends.targets import get_target

    spec = get_target("x86")
    lowered, _ = _front_end(ir.load(str(qnet)), _Stages(), 2)
    mod, _ = _bind_params(lowered, True)
    mod = _relax_passes(mod, spec, winograd=True)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    kernel = getattr(int8_conv.kernel_for(spec), "name", "none")  # amx here; vnni on a host without AMX
    served = sum(n.startswith(f"{kernel}_qconv2d") for n in names)
    # one group: all but the depthwise conv 2 (0 and 6, with 3 and 13 input channels, through im2col)
    assert served == (6 if int8_conv.available(spec) else 0)
    assert sum(n.startswith(f"{kernel}_qgemm") for n in names) == (1 if served else 0)  # the Gemm: a 1x1 conv of rows
    if served:  # conv 3's output reaches conv 4 through the residual add (elementwise): NHWC between them
        layouts = collections.Counter(str(f.attrs["graphopt.layouts"]) for gv, f in mod.functions_items()
                                      if gv.name_hint.startswith(f"{kernel}_qconv2d"))
        assert layouts["NHWC-NHWC"] + layouts["NCHW-NHWC"] >= 1 and layouts["NHWC-NHWC"] + layouts["NHWC-NCHW"] >= 1


@pytest.mark.slow
def test_nchw_and_nhwc_plans_agree(qnet, monkeypatch):
    """The same QDQ net with every int8 tensor NCHW, and with the NHWC plan: identical outputs."""
    x = np.random.default_rng(9).standard_normal((1, 3, 13, 13)).astype(np.float32)
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("GRAPHOPT_INT8_NHWC", flag)
        compiled = compile_model(ir.load(str(qnet)), target="x86")
        outs.append(compiled(x)[compiled.output_names[0]])
    np.testing.assert_array_equal(outs[0], outs[1])


def _residual_block(path, shape):
    """Two quantized tensors, added, requantized, Relu, requantized (a ResNet residual in QDQ form)."""
    q = [("a", 0.05, 128), ("b", 0.07, 120), ("s", 0.09, 128), ("r", 0.045, 0)]
    inits = [t for n, s, z in q for t in (nh.from_array(np.float32(s), f"s_{n}"), nh.from_array(np.uint8(z), f"z_{n}"))]

    def qdq(x, n):
        return [h.make_node("QuantizeLinear", [x, f"s_{n}", f"z_{n}"], [f"{n}_q"]),
                h.make_node("DequantizeLinear", [f"{n}_q", f"s_{n}", f"z_{n}"], [f"{n}_d"])]

    nodes = qdq("a", "a") + qdq("b", "b") + [h.make_node("Add", ["a_d", "b_d"], ["sum"])] + qdq("sum", "s") + [
        h.make_node("Relu", ["s_d"], ["relu"])] + qdq("relu", "r")
    graph = h.make_graph(nodes, "res", [h.make_tensor_value_info(n, TP.FLOAT, shape) for n in "ab"],
                         [h.make_tensor_value_info("r_d", TP.FLOAT, shape)], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("shape", [(1, 48, 14, 14), (1, 16, 13, 56)])
def test_qdq_glue_is_one_vector_loop(tmp_path, shape):
    """The dequantize-add-quantize-relu-quantize chain is one vectorized loop (14-wide rows: vectors
    over fused rows), exact against ONNX Runtime."""
    from graphopt.backends.compile import fused_module
    from graphopt.backends.schedules import apply_default_schedules
    from graphopt.backends.targets import get_target

    path = _residual_block(tmp_path / "r.onnx", shape)
    mod = apply_default_schedules(fused_module(ir.load(str(path)), "x86"), get_target("x86"))
    funcs = [f for gv, f in mod.functions_items() if gv.name_hint != "main" and hasattr(f, "body")]
    assert len(funcs) == 1
    text = funcs[0].script()
    assert text.count("T.sblock(") - text.count('T.sblock("root")') == 1 and "T.vectorized" in text
    compiled = compile_model(ir.load(str(path)), target="x86")
    rng = np.random.default_rng(0)
    feeds = {n: (rng.standard_normal(shape) * 4).astype(np.float32) for n in "ab"}
    got = compiled(feeds["a"], feeds["b"])["r_d"]
    np.testing.assert_allclose(got, _ort(path, feeds)[0], rtol=0, atol=0.045 * 1.001)


# pointwise, depthwise 3x3, residual, depthwise 5x5 stride 2 (16 channels a vector), pointwise: PP-OCR's pattern
DW_NET = [(16, 32, 1, 1, 0, 1, "Relu"), (32, 32, 3, 1, 1, 32, "Relu"), (32, 48, 1, 1, 0, 1, None),
          (48, 32, 1, 1, 0, 1, None), (32, 32, 5, 2, 2, 32, "Relu"), (32, 32, 1, 1, 0, 1, None),
          (32, 32, 3, (2, 1), 1, 32, None), (32, 16, 1, 1, 0, 1, None)]


def test_depthwise_convs_run_nhwc_and_match_ort(tmp_path):
    from graphopt.backends.compile import fused_module
    from graphopt.backends.schedules import int8_conv
    from graphopt.backends.targets import get_target

    q = quantize(convnet(tmp_path / "f.onnx", hw=11, net=DW_NET), tmp_path / "q.onnx", "x", (1, 16, 11, 11))
    compiled = compile_model(ir.load(str(q)), target="x86")
    worst = 0.0
    for seed in (5, 6):
        x = np.random.default_rng(seed).standard_normal((1, 16, 11, 11)).astype(np.float32)
        worst = max(worst, float(np.abs(_ort(q, {"x": x})[0] - compiled(x)[compiled.output_names[0]]).max()))
    assert worst <= _output_scale(q) * 1.001
    if int8_conv.available(get_target("x86")):
        mod = fused_module(ir.load(str(q)), "x86")
        kernel = int8_conv.kernel_for(get_target("x86")).name
        layouts = {gv.name_hint: str(f.attrs["graphopt.layouts"]) for gv, f in mod.functions_items()
                   if gv.name_hint.startswith(("dw_qconv2d", f"{kernel}_qconv2d"))}
        assert sum(n.startswith("dw_") for n in layouts) == 3
        assert list(layouts.values()).count("NHWC-NHWC") >= 3  # pointwise -> depthwise -> pointwise in NHWC


@pytest.mark.parametrize("c,h,w,k,s,p,layouts", [(32, 9, 11, 3, 1, 1, "NHWC-NHWC"), (48, 13, 12, 5, 2, 2, "NCHW-NHWC"),
                                                 (16, 7, 5, 3, 2, 0, "NHWC-NCHW"), (32, 12, 10, 5, (2, 1), 2, "NHWC-NHWC")])
def test_depthwise_kernel_exact(c, h, w, k, s, p, layouts):
    """Windows leaving the input read the zero point; strides, layouts: exact against numpy."""
    import tvm

    from graphopt.backends.schedules.int8_dwconv import dwconv_func, pack_weight
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (1, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (c, 1, k, k), dtype=np.int8)
    corr, mult = rng.integers(-5000, 5000, c).astype(np.int32), rng.uniform(1e-4, 1e-3, c).astype(np.float32)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=7)
    sy, sx = (s, s) if isinstance(s, int) else s
    oh, ow = (h + 2 * p - k) // sy + 1, (w + 2 * p - k) // sx + 1
    acc = sum(xp[0, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] * wt[:, 0, ky, kx].astype(np.int64)[:, None, None]
              for ky in range(k) for kx in range(k))
    ref = np.clip(np.round((acc + corr[:, None, None]).astype(np.float32) * mult[:, None, None]) + 100, 0, 255)
    ref = ref.astype(np.uint8)[None]
    in_layout, out_layout = layouts.split("-")
    nhwc = (0, 2, 3, 1)
    f = dwconv_func(c, h, w, k, s, p, zx=7, zy=100, qmin=0, qmax=255, out_dtype="uint8", threads=2,
                    in_layout=in_layout, out_layout=out_layout)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=get_target("x86").target)
    expected = ref.transpose(nhwc) if out_layout == "NHWC" else ref
    out = tvm.runtime.tensor(np.zeros(expected.shape, np.uint8))
    x_in = np.ascontiguousarray(x.transpose(nhwc)) if in_layout == "NHWC" else x
    lib["main"](*[tvm.runtime.tensor(a) for a in (x_in, pack_weight(wt), corr, mult)], out)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_int8_bundle_refuses_a_cpu_without_amx_int8(qnet, tmp_path, monkeypatch):
    """A bundle built with AMX-INT8 kernels loads only where the CPU has AMX-INT8: one line, not SIGILL."""
    import json

    from graphopt.backends.bundle import loader
    from graphopt.backends.bundle import BundleError, load_bundle

    compile_model(ir.load(str(qnet)), target="x86", output=tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["target"]["target"]["mattr"] = ["+amx-tile", "+amx-int8"]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(loader, "cpu_has_amx", lambda kind="bf16": kind != "int8")
    with pytest.raises(BundleError, match="AMX-INT8"):
        load_bundle(tmp_path / "b", verify=False)

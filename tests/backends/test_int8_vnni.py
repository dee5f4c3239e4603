"""Integer convs on x86 VNNI (vpdpbusd) for targets without AMX-INT8: the ``x86-vnni`` preset (Cascade
Lake's instruction set) compiles QDQ models onto ``int8_dot`` kernels; checked exact against numpy,
against ONNX Runtime on the QDQ model, and in the generated code. They run on any host with AVX-512
VNNI (this project's machines have it; the kernel tests are skipped elsewhere)."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess

import numpy as np
import onnx_ir as ir
import pytest
from graphopt.backends.bundle import loader
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import int8_conv
from graphopt.backends.schedules.int8_dot import DOTS, qconv_func
from graphopt.backends.targets import get_target
from test_int8 import (
    DW_NET,
    _ort,
    _output_scale,
    _quanta,
    _reference_qconv,
    convnet,
    quantize,
)

HAS = {"vnni": "avx512_vnni" in loader.cpu_flags(), "avxvnni": "avx_vnni" in loader.cpu_flags()}
TARGETS = {"vnni": "x86-vnni", "avxvnni": "llvm -mcpu=alderlake"}


@pytest.fixture(scope="module")
def qnet(tmp_path_factory):
    """The QDQ net of test_int8 and its x86-vnni bundle."""
    d = tmp_path_factory.mktemp("vnni")
    q = quantize(convnet(d / "f.onnx", gemm=True), d / "q.onnx", "x", (1, 3, 13, 13))
    compile_model(ir.load(str(q)), target="x86-vnni", output=d / "b")
    return q, d / "b"


def _build(func, target):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target(target).target)


@pytest.mark.parametrize("kind,c,h,w,o,k,s,p,layouts", [
    ("vnni", 64, 14, 14, 64, 3, 1, 1, "NCHW-NCHW"), ("vnni", 24, 13, 11, 40, 3, 2, 1, "NHWC-NCHW"),
    ("vnni", 13, 9, 9, 33, 3, 1, 0, "NHWC-NHWC"),
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("vnni", 16, 9, 9, 13, 1, 1, 0, "NCHW-NHWC"), ("vnni", 72, 15, 15, 33, 1, 2, 0, "NHWC-NHWC"),
        ("vnni", 40, 13, 13, 96, 5, 2, 2, "NCHW-NCHW")]],
    ("avxvnni", 24, 13, 11, 40, 3, 2, 1, "NHWC-NHWC")])
def test_dot_kernel_exact(kind, c, h, w, o, k, s, p, layouts):
    """Odd channel counts (padded to 4 in, to whole register tiles out), strides, paddings (the zero
    point), NCHW/NHWC: exact against numpy; the products are vpdpbusd (the tensorized intrinsic)."""
    if not HAS[kind]:
        pytest.skip(f"needs a CPU with {kind}")
    dot = DOTS[kind]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    corr, mult = rng.integers(-5000, 5000, o).astype(np.int32), rng.uniform(1e-5, 3e-4, o).astype(np.float32)
    in_layout, out_layout = layouts.split("-")
    lib = _build(qconv_func(dot, c, h, w, o, k, s, p, zx=7, zy=100, qmin=0, qmax=255, out_dtype="uint8", threads=2,
                            in_layout=in_layout, out_layout=out_layout), TARGETS[kind])
    asm = lib.mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= 4 and "tdpbusd" not in asm
    assert ("%zmm" in asm) == (kind == "vnni")  # AVX-VNNI: 256-bit ymm only
    import tvm

    nhwc = (0, 2, 3, 1)
    ref = _reference_qconv(x, wt, corr, mult, k, s, p, 7, 100)
    expected = ref.transpose(nhwc) if out_layout == "NHWC" else ref
    out = tvm.runtime.tensor(np.zeros(expected.shape, np.uint8))
    x_in = np.ascontiguousarray(x.transpose(nhwc)) if in_layout == "NHWC" else x
    lib["main"](*[tvm.runtime.tensor(a) for a in (x_in, *dot.constants(wt, corr, mult))], out)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_kernel_choice_per_target(monkeypatch):
    """AMX-INT8 where the target has it, VNNI on x86-vnni (and on a raw Cascade Lake / Zen 4 target),
    AVX-VNNI on Alder Lake, sdot on aarch64-dotprod, generic code elsewhere or with GRAPHOPT_INT8_DOT=0."""
    names = {t: getattr(int8_conv.kernel_for(get_target(t)), "name", None) for t in
             ("x86-vnni", "llvm -mcpu=znver4", "llvm -mcpu=alderlake", "aarch64-dotprod", "aarch64",
              "llvm -mcpu=haswell")}
    assert names == {"x86-vnni": "vnni", "llvm -mcpu=znver4": "vnni", "llvm -mcpu=alderlake": "avxvnni",
                     "aarch64-dotprod": "sdot", "aarch64": None, "llvm -mcpu=haswell": None}
    spec = get_target("x86-vnni")
    assert spec.config["mcpu"] == "cascadelake" and "mattr" not in spec.config and "amx" not in spec.features
    host = get_target("x86")
    assert int8_conv.kernel_for(host).name == ("amx" if host.features.get("amx") else host.features["int8_dot"])
    monkeypatch.setenv("GRAPHOPT_INT8_DOT", "0")
    assert int8_conv.kernel_for(spec) is None and not int8_conv.available(get_target("aarch64-dotprod"))


@pytest.mark.skipif(not HAS["vnni"] or shutil.which("objdump") is None, reason="needs AVX-512 VNNI and objdump")
def test_qdq_net_on_vnni_matches_ort(qnet):
    """Every group-1 QConv and the QGemm on the VNNI kernel (none on AMX), outputs within one quantum
    of ONNX Runtime on the QDQ model (exact here)."""
    from graphopt.backends.bundle import load_bundle

    q, bundle = qnet
    products = _count_per_function(bundle / "lib.so", "vpdpbusd")
    kernels = collections.Counter(n.removesuffix("_compute_").rstrip("0123456789") for n in products)
    assert kernels == {"vnni_qconv2d": 6, "vnni_qgemm": 1}  # all but the 24-channel depthwise conv
    assert not _count_per_function(bundle / "lib.so", "tdpbusd")
    assert _quanta(q, (1, 3, 13, 13), load_bundle(bundle)) <= 1.0


def _count_per_function(lib, mnemonic: str) -> dict[str, int]:
    """``{function: occurrences of mnemonic}`` in the x86 disassembly of ``lib`` (functions with any)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    counts, name = collections.Counter(), None
    for line in text.splitlines():
        if line.endswith(">:") and " <" in line:
            name = line.split(" <", 1)[1][:-2]
        elif name and f"\t{mnemonic} " in line:
            counts[name] += 1
    return dict(counts)


@pytest.mark.skipif(not HAS["vnni"] or shutil.which("objdump") is None, reason="needs AVX-512 VNNI and objdump")
def test_depthwise_pattern_on_vnni_matches_ort(tmp_path):
    """PP-OCR's pointwise/depthwise pattern: pointwise convs on vpdpbusd, depthwise on the vector kernel,
    within one quantum of ORT."""
    from graphopt.backends.bundle import load_bundle

    q = quantize(convnet(tmp_path / "f.onnx", hw=11, net=DW_NET), tmp_path / "q.onnx", "x", (1, 16, 11, 11))
    compile_model(ir.load(str(q)), target="x86-vnni", output=tmp_path / "b")
    products = _count_per_function(tmp_path / "b" / "lib.so", "vpdpbusd")
    assert sum(n.startswith("vnni_qconv2d") for n in products) == 5  # the 1x1 convs (3 depthwise)
    compiled = load_bundle(tmp_path / "b")
    x = np.random.default_rng(5).standard_normal((1, 16, 11, 11)).astype(np.float32)
    got = compiled(x)[compiled.output_names[0]]
    assert np.abs(_ort(q, {"x": x})[0] - got).max() <= _output_scale(q) * 1.001


def test_vnni_bundle_refused_on_a_cpu_without_vnni(qnet, tmp_path, monkeypatch):
    """A bundle for x86-vnni records its int8 dot product; a CPU without AVX-512 VNNI refuses it with
    one line (not SIGILL)."""
    from graphopt.backends.bundle import BundleError, load_bundle

    bundle = qnet[1]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["features"]["int8_dot"] == "vnni"
    monkeypatch.setattr(loader, "cpu_flags", lambda: {"fpu", "avx2", "avx512f"})
    with pytest.raises(BundleError, match="AVX-512 VNNI") as e:
        load_bundle(bundle, verify=False)
    assert len(str(e.value).splitlines()) == 1

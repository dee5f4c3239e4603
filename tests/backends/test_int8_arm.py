"""Integer convs on Arm sdot (``--target aarch64-dotprod``): the int8 kernels of ``int8_dot`` tensorized
with TVM's ``dot_4x4_i8i8s32_sdot``, activations stored as ``x - 128`` (int8) with ``128·Σw`` folded
into the bias correction at compile time. Build-only checks read the disassembly; one bundle runs
under qemu (``graphopt run``'s emulation) and is compared with ONNX Runtime and the x86 bundle."""

from __future__ import annotations

import platform
import shutil

import numpy as np
import onnx_ir as ir
import pytest
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import int8_conv
from graphopt.backends.schedules.int8_dot import DOTS, qconv_func
from graphopt.backends.targets import get_target, neon
from test_int8 import _ort, _output_scale, convnet, quantize

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which(neon.OBJDUMP) is None,
                                reason="needs gcc-aarch64-linux-gnu and binutils-aarch64-linux-gnu (.ci/run installs them)")


@pytest.fixture(scope="module")
def qnet(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdot")
    return quantize(convnet(d / "f.onnx", gemm=True), d / "q.onnx", "x", (1, 3, 13, 13))


def test_constants_fold_the_activation_shift():
    """``Σ (x - 128)·w + corr'`` equals ``Σ x·w + corr``: corr' = corr + 128·Σw per output channel; the
    weight packed [O/4, taps, C/4, 4, 4] with zeros past O and C."""
    dot = DOTS["sdot"]
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (6, 5, 3, 3), dtype=np.int8)
    x = rng.integers(0, 256, (5, 3, 3)).astype(np.int64)
    corr = rng.integers(-900, 900, 6).astype(np.int32)
    wp, corr2, _ = dot.constants(w, corr, np.ones(6, np.float32))
    assert wp.shape == (2, 9, 2, 4, 4) and corr2.shape == (8,) and not corr2[6:].any()
    plain = np.einsum("chw,ochw->o", x, w.astype(np.int64)) + corr
    shifted = np.einsum("chw,ochw->o", x - 128, w.astype(np.int64)) + corr2[:6]
    np.testing.assert_array_equal(plain, shifted)
    assert wp[1, 4, 1, 1, 0] == w[5, 4, 1, 1] and not wp[1, :, :, 2:].any() and not wp[:, :, 1, :, 1:].any()


@pytest.mark.parametrize("c,h,w,o,k,s,p", [(24, 13, 11, 40, 3, 2, 1), (72, 15, 15, 33, 1, 2, 0)])
def test_sdot_kernel_disassembly(c, h, w, o, k, s, p):
    """The kernel's products are sdot (the tensorized intrinsic), a register tile of them unrolled."""
    import tvm

    f = qconv_func(DOTS["sdot"], c, h, w, o, k, s, p, zx=7, zy=100, qmin=0, qmax=255, out_dtype="uint8", threads=4,
                   in_layout="NHWC", out_layout="NHWC")
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=get_target("aarch64-dotprod").target)
    asm = lib.mod.inspect_source("asm")
    assert asm.count("sdot\t") >= 8 and "udot" not in asm


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates aarch64 on an x86-64 host")
def test_int8_bundle_on_sdot_runs_under_qemu_and_matches(qnet, tmp_path):
    """The QDQ net for aarch64-dotprod: its QConv/QGemm kernels use sdot (objdump), and under qemu its
    outputs are within one quantum of ONNX Runtime on the QDQ model."""
    from graphopt.backends.targets.emulated_bundle import run_bundle

    spec = get_target("aarch64-dotprod")
    assert int8_conv.kernel_for(spec).name == "sdot"
    compile_model(ir.load(str(qnet)), target=spec, output=tmp_path / "arm")
    rows = neon.kernel_report(str(tmp_path / "arm" / "lib.so"))
    with_dot = sorted(r["kernel"].rstrip("0123456789") for r in rows if r["dot"])
    assert with_dot == ["sdot_qconv2d"] * 6 + ["sdot_qgemm"], rows  # all but the 24-channel depthwise conv
    x = np.random.default_rng(5).standard_normal((1, 3, 13, 13)).astype(np.float32)
    got = run_bundle(str(tmp_path / "arm"), {"x": x})
    got = got[next(iter(got))]
    scale = _output_scale(qnet)
    assert np.abs(got - _ort(qnet, {"x": x})[0]).max() <= scale * 1.001
    assert np.ptp(got) > 10 * scale  # an output that tells inputs apart


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates aarch64 on an x86-64 host")
def test_rapidocr_rec_int8_on_sdot_under_qemu(tmp_path):
    """PP-OCRv4 rec quantized (QDQ), compiled for aarch64-dotprod: its integer kernels use sdot, and under
    qemu its character probabilities are within one quantum (1/255) of the x86 int8 bundle's."""
    from graphopt.backends.targets.emulated_bundle import run_bundle
    from graphopt.passes.opset_upgrade import try_upgrade

    from graphopt.front import api

    model = api.optimize(api.load("rapidocr:rec", input_shapes=["x:1,3,48,320"])).model
    assert try_upgrade(model, 13)
    ir.save(model, tmp_path / "f.onnx")
    q = quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", "x", (1, 3, 48, 320))
    compile_model(ir.load(str(q)), target="aarch64-dotprod", output=tmp_path / "arm")
    rows = neon.kernel_report(str(tmp_path / "arm" / "lib.so"))
    assert sum(r["kernel"].startswith("sdot_q") and r["dot"] > 0 for r in rows) >= 30
    x = np.random.default_rng(3).standard_normal((1, 3, 48, 320)).astype(np.float32)
    got = run_bundle(str(tmp_path / "arm"), {"x": x})
    got = got[next(iter(got))]
    x86 = compile_model(ir.load(str(q)), target="x86")
    want = x86(x)[x86.output_names[0]]
    assert np.abs(got - want).max() <= 1.0 / 255 + 1e-6
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99

"""aarch64 bundles executed under qemu on this x86 host, their loader's refusals there, the aarch64
presets, ``graphopt targets`` and ``graphopt package``.

Outputs computed under qemu are compared with ONNX Runtime on x86. The first emulated run prepares
the aarch64 environment (~/.cache/graphopt/aarch64-env-*, about 30 s from the package caches); each
qemu process then spends about 10 s importing TVM, so each test starts at most one.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.front import api
from graphopt.backends.bundle import loader
from graphopt.backends.targets import emulate, get_target, neon
from graphopt.front.cli import main
from graphopt.core.errors import UnsupportedError

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates aarch64 on an x86-64 host")


def _tools_present() -> None:
    """qemu and the cross toolchain are installed by .ci/run: their absence is a failure, not a skip."""
    for tool in (emulate.QEMU, "aarch64-linux-gnu-gcc", neon.OBJDUMP):
        assert shutil.which(tool), f"{tool} missing: apt-get install qemu-user-static gcc-aarch64-linux-gnu"


def _net(path) -> str:
    """Conv 3x3 + ReLU, a second conv, global pooling, Gemm, Softmax: outputs the conv map and the scores."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3
    wg = rng.standard_normal((10, 16)).astype(np.float32)
    init = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in
            [("w1", w1), ("b1", rng.standard_normal(16).astype(np.float32)), ("w2", w2), ("wg", wg),
             ("bg", rng.standard_normal(10).astype(np.float32))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["fmap"]),
             helper.make_node("GlobalAveragePool", ["fmap"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["scores"], axis=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 20, 20])],
                              [helper.make_tensor_value_info("fmap", TensorProto.FLOAT, [1, 16, 20, 20]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _ort(model: str, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The net, its input, and bundles for aarch64, aarch64-dotprod and x86."""
    _tools_present()
    d = tmp_path_factory.mktemp("arm")
    model = _net(d / "net.onnx")
    x = np.random.default_rng(1).standard_normal((1, 8, 20, 20)).astype(np.float32)
    np.savez(d / "in.npz", x=x)
    bundles = {t: d / t for t in ("aarch64", "aarch64-dotprod", "x86")}
    for target, path in bundles.items():
        api.compile(model, target=target, output=path, opt_level=2)
    return model, d, bundles, {"x": x}


def test_run_under_qemu_matches_ort(built, tmp_path, capsys):
    """graphopt run on an aarch64 bundle: its own loader.py under qemu; outputs match ORT on x86."""
    model, d, bundles, feeds = built
    digest = loader.manifest_digest(str(bundles["aarch64"]))
    out = tmp_path / "out.npz"
    assert main(["run", str(bundles["aarch64"]), "--inputs", str(d / "in.npz"), "-o", str(out),
                 "--expect-digest", digest]) == 0
    assert "under qemu" in capsys.readouterr().err
    got = np.load(out)
    want = _ort(model, feeds)
    for name in ("fmap", "scores"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5)
    assert np.ptp(want["scores"]) > 0.05 and np.ptp(want["fmap"]) > 1  # outputs that tell models apart


def test_bad_bundles_are_refused_on_the_host_before_qemu(built, tmp_path, capsys, monkeypatch):
    """Tampered and truncated aarch64 bundles, a wrong digest, wrong inputs: exit 2 and one line, at once."""
    _, d, bundles, _ = built
    monkeypatch.setattr(emulate, "prepare", lambda *a, **k: pytest.fail("qemu must not start"))
    tampered, truncated = tmp_path / "tampered", tmp_path / "truncated"
    shutil.copytree(bundles["aarch64"], tampered)
    shutil.copytree(bundles["aarch64"], truncated)
    lib = bytearray((tampered / "lib.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (tampered / "lib.so").write_bytes(bytes(lib))
    (truncated / "lib.so").write_bytes((bundles["aarch64"] / "lib.so").read_bytes()[:4096])
    out = str(tmp_path / "o.npz")
    cases = [([str(tampered)], "lib.so does not match its sha256"),
             ([str(truncated)], "lib.so does not match its sha256"),
             ([str(truncated), "--no-verify"], "truncated or corrupted ELF library"),
             ([str(bundles["aarch64"]), "--expect-digest", "sha256:" + "0" * 64], "differs from the expected")]
    np.savez(tmp_path / "bad_in.npz", x=np.zeros((1, 8, 20, 21), np.float32))
    cases.append(([str(bundles["aarch64"]), "--inputs", str(tmp_path / "bad_in.npz")], "expected (1, 8, 20, 20)"))
    for argv, expected in cases:
        inputs = [] if "--inputs" in argv else ["--inputs", str(d / "in.npz")]
        assert main(["run", *argv, *inputs, "-o", out]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.npz").exists()


_PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("loader", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    result = {}
    for path in sys.argv[2:]:
        try:
            loader.load(path)
            result[path] = "loaded"
        except loader.BundleError as e:
            result[path] = "refused: " + str(e)
    print(json.dumps(result))
""")


def test_standalone_loader_under_qemu_refuses_foreign_tampered_and_missing_features(built, tmp_path):
    """On an emulated Cortex-A72 (NEON, no dotprod, no fp16): the bundle's loader loads the aarch64 bundle
    and refuses an x86 bundle, a dotprod bundle, a tampered and a truncated one, each with one line."""
    _, _, bundles, _ = built
    tampered, truncated = tmp_path / "tampered", tmp_path / "truncated"
    for copy in (tampered, truncated):
        shutil.copytree(bundles["aarch64"], copy)
    (tampered / "loader.py").write_text((tampered / "loader.py").read_text() + "\n# edited\n")
    (truncated / "lib.so").write_bytes((truncated / "lib.so").read_bytes()[:-1000])
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    paths = [bundles["aarch64"], bundles["x86"], bundles["aarch64-dotprod"], tampered, truncated]
    env = emulate.prepare()
    proc = env.run([str(probe), str(bundles["aarch64"] / "loader.py"), *map(str, paths)], cpu="cortex-a72",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result[str(bundles["aarch64"])] == "loaded"
    assert "built for x86_64; this machine is aarch64" in result[str(bundles["x86"])]
    assert "+dotprod, +fullfp16 and this CPU lacks them" in result[str(bundles["aarch64-dotprod"])]
    assert "loader.py does not match its sha256" in result[str(tampered)]
    assert "lib.so does not match its sha256" in result[str(truncated)]


def test_aarch64_bundle_refused_natively_and_qemu_missing_named(built, tmp_path, capsys, monkeypatch):
    """The reverse direction: an aarch64 bundle loaded natively on x86 is refused by the loader; without
    qemu, graphopt run names the Debian package."""
    _, d, bundles, _ = built
    with pytest.raises(loader.BundleError, match="built for aarch64-linux-gnu; this machine is x86_64"):
        loader.load(str(bundles["aarch64"]))
    real = shutil.which
    monkeypatch.setattr(emulate.shutil, "which", lambda t: None if t == emulate.QEMU else real(t))
    assert main(["run", str(bundles["aarch64"]), "--inputs", str(d / "in.npz"), "-o", str(tmp_path / "o.npz")]) == 2
    assert "apt-get install qemu-user-static" in capsys.readouterr().err
    with pytest.raises(UnsupportedError, match="qemu-user-static"):
        emulate.check_tools()


def test_presets_targets_command_and_raw_targets(built, tmp_path, capsys):
    model = built[0]
    arm, dot = get_target("aarch64"), get_target("aarch64-dotprod")
    assert arm.config["mcpu"] == "cortex-a72" and arm.config["mattr"] == ["+neon"]
    assert dot.config["mcpu"] == "cortex-a76" and {"+dotprod", "+fullfp16"} <= set(dot.config["mattr"])
    assert bool(dot.target.attrs["feature.has_dotprod"]) and not bool(arm.target.attrs["feature.has_dotprod"])
    raw = get_target("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a55 -mattr=+neon,+dotprod -num-cores=8")
    assert raw.config == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
                          "mattr": ["+neon", "+dotprod"], "num-cores": 8}
    assert raw.cross_compiler == "aarch64-linux-gnu-gcc" and raw.features["arch"] == "aarch64"
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86", "aarch64", "aarch64-dotprod", "cuda", "Cortex-A72", "Cortex-A76", "under qemu"):
        assert name in out
    assert main(["targets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:4] == ["x86", "aarch64", "cuda", "aarch64-dotprod"]
    assert main(["compile", model, "-o", str(tmp_path / "b"), "--target", "raspberrypi"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'raspberrypi'" in err and "aarch64-dotprod" in err and len(err.splitlines()) == 1
    assert main(["compile", model, "-o", str(tmp_path / "b"), "--target", "llvm mcpu"]) == 2
    assert "'mcpu' is not -key=value" in capsys.readouterr().err


def test_neon_counts_from_a_listing():
    listing = textwrap.dedent("""\
        0000000000001000 <conv_compute_>:
            1000:\tldp\tq26, q24, [x17, #-32]
            1004:\tfmla\tv22.4s, v26.4s, v27.s[0]
            1008:\tsdot\tv1.4s, v2.16b, v3.16b
            100c:\tfmla\tv0.8h, v1.8h, v2.8h
            1010:\tadd\tx1, x1, #0x4
        0000000000002000 <__tvm_ffi_conv>:
            2000:\tret
        """)
    counts = neon.count(listing)
    assert counts["conv_compute_"] == {"instructions": 5, "neon": 4, "vector_fma": 2, "dot": 1, "fp16": 1}
    assert counts["__tvm_ffi_conv"]["instructions"] == 1


def test_package_is_one_file_the_loader_runs(built, tmp_path, capsys):
    """graphopt package: the bundle's files under one folder, deterministic; the unpacked x86 bundle runs
    with its own loader.py (the device-side CLI) and matches ORT; a foreign file is not overwritten."""
    model, d, bundles, feeds = built
    pkg = tmp_path / "net.tar.gz"
    assert main(["package", str(bundles["x86"]), "-o", str(pkg)]) == 0
    first = pkg.read_bytes()
    assert main(["package", str(bundles["x86"]), "-o", str(pkg)]) == 0  # its own package: replaced, same bytes
    assert pkg.read_bytes() == first
    with tarfile.open(pkg) as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert names == ["net", "net/lib.so", "net/loader.py", "net/manifest.json"]
    unpacked = tmp_path / "unpacked" / "net"
    proc = subprocess.run([sys.executable, str(unpacked / "loader.py"), str(unpacked), "--inputs", str(d / "in.npz"),
                           "-o", str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["scores"], _ort(model, feeds)["scores"], rtol=1e-3)
    capsys.readouterr()
    other = tmp_path / "notes.tar.gz"
    other.write_text("mine")
    assert main(["package", str(bundles["x86"]), "-o", str(other)]) == 2
    assert "not a graphopt package" in capsys.readouterr().err and other.read_text() == "mine"
    tampered = tmp_path / "tampered"
    shutil.copytree(bundles["aarch64"], tampered)
    (tampered / "loader.py").write_text("print('hi')\n")
    assert main(["package", str(tampered), "-o", str(tmp_path / "t.tar.gz")]) == 2
    assert "loader.py does not match its sha256" in capsys.readouterr().err
    assert not (tmp_path / "t.tar.gz").exists()


def _squeezenet_with_features(path) -> str:
    """light:squeezenet also returning its last conv map: its generated weights make the softmax output
    uniform (1/1000 everywhere), which would match anything; the map (1000x13x13) does not."""
    from graphopt.models import resolve

    m = onnx.load(str(resolve("light:squeezenet")))
    last_conv = [n for n in m.graph.node if n.op_type == "Conv"][-1].output[0]
    m.graph.output.append(helper.make_tensor_value_info(last_conv, TensorProto.FLOAT, [1, 1000, 13, 13]))
    onnx.save(m, path)
    return last_conv


@pytest.mark.slow
def test_squeezenet_packaged_runs_under_qemu_and_matches_ort(tmp_path):
    """light:squeezenet for aarch64, packaged, unpacked and run by its own loader.py under qemu (the
    device-side CLI), against ORT on x86."""
    _tools_present()
    from graphopt.models import reference_data

    model = tmp_path / "squeezenet.onnx"
    feature = _squeezenet_with_features(model)
    api.compile(str(model), target="aarch64", output=tmp_path / "b", opt_level=2)
    assert main(["package", str(tmp_path / "b"), "-o", str(tmp_path / "sq.tar.gz")]) == 0
    with tarfile.open(tmp_path / "sq.tar.gz") as tar:
        tar.extractall(tmp_path / "device", filter="data")
    feeds, _ = reference_data("light:squeezenet")
    np.savez(tmp_path / "in.npz", **feeds)
    unpacked = tmp_path / "device" / "sq"
    proc = emulate.prepare().run([str(unpacked / "loader.py"), str(unpacked), "--inputs", str(tmp_path / "in.npz"),
                                  "-o", str(tmp_path / "out.npz")], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = np.load(tmp_path / "out.npz"), _ort(str(model), feeds)
    assert np.ptp(want[feature]) > 0.1 * np.abs(want[feature]).max()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_rapidocr_rec_under_qemu_matches_ort(tmp_path):
    _tools_present()
    from graphopt import models
    from graphopt.backends.targets.emulated_bundle import run_bundle

    spec = "rapidocr:rec"
    api.compile(spec, target="aarch64", output=tmp_path / "rec", opt_level=2,
                input_shapes=models.default_input_shapes(spec))
    feeds = models.random_inputs(spec)
    got = run_bundle(str(tmp_path / "rec"), feeds, timeout=1800)
    want = _ort(str(models.resolve(spec)), feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_int8_qdq_model_runs_under_qemu(built, tmp_path):
    """The static int8 (QDQ) form of the net, compiled for aarch64-dotprod, matches ORT on the QDQ model."""
    from graphopt.backends.targets.emulated_bundle import run_bundle

    model, _, _, feeds = built
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(2).standard_normal((8, 1, 8, 20, 20)).astype(np.float32))
    qdq = tmp_path / "net_int8.onnx"
    assert main(["optimize", model, "--quantize", "int8", "--calibration", str(calibration), "-o", str(qdq)]) == 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(qdq).graph.node)
    api.compile(str(qdq), target="aarch64-dotprod", output=tmp_path / "q", opt_level=2)
    got, want = run_bundle(str(tmp_path / "q"), feeds), _ort(str(qdq), feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_bench_aarch64_reports_qemu_times_and_neon_without_a_ratio(built, tmp_path, capsys):
    model, _, bundles, _ = built
    report = tmp_path / "bench.json"
    assert main(["bench", model, "--target", "aarch64", "--repeat", "2", "--warmup", "0", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "not device timings" in out and "ORT ms" not in out and "ratio" not in out.split("note:")[0]
    (row,) = json.loads(report.read_text())
    assert row["emulated"] and row["target"] == "aarch64" and row["qemu"]["median_ms"] > 0
    convs = [k for k in row["kernels"] if "conv2d" in k["kernel"]]
    assert convs and all(k["neon"] > 0 and k["vector_fma"] > 0 for k in convs)
    assert main(["bench", str(bundles["aarch64"]), str(bundles["x86"])]) == 2
    assert "bench it apart" in capsys.readouterr().err
    assert main(["bench", str(bundles["aarch64"]), "--profile"]) == 2
    assert "--profile is not available" in capsys.readouterr().err

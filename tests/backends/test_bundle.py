"""Bundles: export, manifest and hashes, the standalone loader in a fresh process, `graphopt run`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from compile_nets import conv_net, ort_run, two_input_net

from graphopt.front import api
from graphopt.backends.bundle import BundleError, load_bundle
from graphopt.backends.compile import compile_model
from graphopt.front.cli import main
from graphopt.core.errors import UsageError

RTOL, ATOL = 1e-3, 1e-4


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    model = two_input_net(d / "two.onnx")
    bundle = d / "two.bundle"
    assert main(["compile", model, "-o", str(bundle), "-O1"]) == 0
    rng = np.random.default_rng(5)
    feeds = {"a": rng.standard_normal((2, 64)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}
    np.savez(d / "in.npz", **feeds)
    return d, model, bundle, feeds


def test_bundle_files_and_manifest(built):
    d, model, bundle, _ = built
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["lib.so", "loader.py", "manifest.json"]  # small weights are embedded
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "graphopt-bundle"
    import onnx
    import tvm

    assert m["versions"]["tvm"] == tvm.__version__ and m["versions"]["onnx"] == onnx.__version__
    assert m["target"]["name"] == "x86" and m["target"]["target"]["kind"] == "llvm"
    assert [(r["name"], r["shape"], r["dtype"]) for r in m["inputs"]] == [("a", [2, 64], "float32"), ("b", [40], "float32")]
    assert [r["name"] for r in m["outputs"]] == ["y", "z"]
    assert m["source"]["sha256"] == _sha(d / "two.onnx")
    assert m["params"]["embedded"] is True
    assert set(m["files"]) == {"lib.so", "loader.py"}
    for name, digest in m["files"].items():
        assert _sha(bundle / name) == digest
    assert isinstance(m["passes"], list) and m["opt_level"] == 1


def test_load_bundle_matches_onnxruntime(built):
    _, model, bundle, feeds = built
    mod = api.load_bundle(bundle)
    out = mod(**feeds)
    for name, exp in zip(["y", "z"], ort_run(model, feeds)):
        np.testing.assert_allclose(out[name], exp, rtol=RTOL, atol=ATOL)
    assert mod.output_names == ["y", "z"]
    assert mod.input_info["b"] == ((40,), "float32")


def test_params_npz_when_not_embedded(tmp_path):
    model = conv_net(tmp_path / "conv.onnx")
    c = compile_model(api.load(model), opt_level=1, embed_params=False, source_path=model)
    bundle = c.save(tmp_path / "conv.bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["params"]["file"] == "params.npz" and not m["params"]["embedded"]
    assert "params.npz" in m["files"]
    with np.load(bundle / "params.npz") as data:
        assert sorted(data.files) == sorted(m["params"]["keys"])
    x = np.random.default_rng(6).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(load_bundle(bundle)(x)["y"], ort_run(model, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_modified_file_is_detected(built, tmp_path):
    import shutil

    _, _, bundle, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "lib.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="lib.so does not match its sha256"):
        load_bundle(copy)
    (copy / "lib.so").unlink()
    with pytest.raises(BundleError, match="lib.so listed in the manifest is missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_standalone_loader_in_a_fresh_process(built, tmp_path):
    d, model, bundle, feeds = built
    out = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, str(bundle / "loader.py"), str(bundle), "--inputs", str(d / "in.npz"),
                        "-o", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    with np.load(out) as data:
        assert data.files == ["y", "z"]
        np.testing.assert_allclose(data["y"], ort_run(model, feeds)[0], rtol=RTOL, atol=ATOL)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('loader', {str(bundle / 'loader.py')!r})\n"
        "loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)\n"
        f"rc = loader.main([{str(bundle)!r}, '--inputs', {str(d / 'in.npz')!r}, '-o', {str(tmp_path / 'o2.npz')!r}])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('graphopt', 'onnx', 'onnx_ir', 'onnxruntime'))\n"
        "print('RC', rc, 'IMPORTED', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "RC 0 IMPORTED []" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=feeds["a"], b=feeds["b"].astype(np.float64))
    r = subprocess.run([sys.executable, str(bundle / "loader.py"), str(bundle), "--inputs", str(bad), "-o", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "input 'b': dtype float64, expected float32" in r.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {"a": f["a"], "c": f["b"]}, "unknown input 'c'"),
        (lambda f: {"a": f["a"]}, "missing input 'b'"),
        (lambda f: {"a": f["a"].astype(np.float16), "b": f["b"]}, "input 'a': dtype float16, expected float32"),
        (lambda f: {"a": f["a"][:1], "b": f["b"]}, r"input 'a': shape \(1, 64\), expected \(2, 64\)"),
    ],
)
def test_graphopt_run_mismatches_exit_2(built, tmp_path, capsys, change, message):
    import re

    d, _, bundle, feeds = built
    bad = tmp_path / "bad.npz"
    np.savez(bad, **change(feeds))
    assert main(["run", str(bundle), "--inputs", str(bad), "-o", str(tmp_path / "o.npz")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o.npz").exists()


def test_graphopt_run_writes_outputs_in_order(built, tmp_path, capsys):
    d, model, bundle, feeds = built
    out = tmp_path / "o.npz"
    assert main(["run", str(bundle), "--inputs", str(d / "in.npz"), "-o", str(out)]) == 0
    with np.load(out) as data:
        assert data.files == ["y", "z"]
        np.testing.assert_allclose(data["z"], ort_run(model, feeds)[1], rtol=RTOL, atol=ATOL)
    assert "y: float32 [2, 40]" in capsys.readouterr().out


def test_export_is_atomic_and_refuses_foreign_directories(built, tmp_path):
    _, model, bundle, _ = built
    c = compile_model(api.load(model), opt_level=0)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"not a bundle graphopt wrote \(it holds keep.txt\)"):
        c.save(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    target = tmp_path / "b"
    c.save(target)
    first = json.loads((target / "manifest.json").read_text())["created"]
    c.save(target)  # replacing a bundle is allowed
    assert json.loads((target / "manifest.json").read_text())["created"] >= first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.skipif(__import__("shutil").which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the cross compiler: apt-get install gcc-aarch64-linux-gnu")
def test_amx_bundle_refuses_a_cpu_without_amx(built, tmp_path, monkeypatch):
    """A bundle whose target carries AMX fails to load with a clear error where AMX is missing
    (its instructions would otherwise kill the process)."""
    import json
    import shutil

    from graphopt.backends.bundle import loader

    _, _, bundle, feeds = built
    copy = tmp_path / "amx.bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["target"]["mattr"] = ["+amx-tile", "+amx-bf16"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(loader, "cpu_has_amx", lambda: False)
    with pytest.raises(BundleError, match="AMX-BF16 .* GRAPHOPT_AMX=0"):
        load_bundle(copy, verify=False)
    monkeypatch.setattr(loader, "cpu_has_amx", lambda: True)
    assert load_bundle(copy, verify=False)(**feeds)


def test_aarch64_bundle_is_an_arm_library(built, tmp_path):
    import platform

    _, model, _, _ = built
    bundle = tmp_path / "arm"
    api.compile(model, target="aarch64", opt_level=1, output=bundle)
    header = (bundle / "lib.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["target"]["target"]["mtriple"] == "aarch64-linux-gnu"
    if platform.machine() != "aarch64":
        with pytest.raises(BundleError, match="built for aarch64-linux-gnu"):
            load_bundle(bundle)


def test_cuda_bundle_exports_without_a_gpu(built, tmp_path):
    import tvm

    _, model, _, feeds = built
    bundle = tmp_path / "gpu"
    api.compile(model, target="cuda", opt_level=1, output=bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["target"]["target"]["kind"] == "cuda" and m["target"]["host"]["kind"] == "llvm"
    if tvm.cuda(0).exist:
        out = load_bundle(bundle)(**feeds)
        np.testing.assert_allclose(out["y"], ort_run(model, feeds)[0], rtol=RTOL, atol=ATOL)
    else:
        with pytest.raises(BundleError, match="no CUDA GPU"):
            load_bundle(bundle)

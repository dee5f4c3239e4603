"""CUDA bundles built on a machine without a GPU: presets, GPU schedules, generated code, the device check.

No GPU is needed: the CUDA source TVM generates is compiled to PTX with nvcc for each preset's arch,
and graphopt's window schedule is checked on the CPU (its thread loops made serial: each thread
computes its own output, so the serial program is the same computation) against ONNX Runtime.
The catalog models for every preset are ``slow``.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.front import api
from graphopt.backends import targets
from graphopt.backends.schedules.gpu_rules import apply_gpu_schedules, gpu_rules, last_gpu_report
from graphopt.backends.targets import CUDA_ARCHS, cuda_check, get_target
from graphopt.front.cli import main
from graphopt.core.errors import UsageError

PRESETS = [f"cuda-{arch.replace('_', '')}" for arch in CUDA_ARCHS]
CATALOG = ["light:squeezenet", "light:resnet50", "rapidocr:det", "rapidocr:rec", "rapidocr:cls"]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def _net(path):
    """conv 3x3 -> depthwise 3x3 + bias + relu -> max pool 3x3/2 -> global average pool -> gemm -> softmax."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel())

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "cuda_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [init("w1", 16, 3, 3, 3), init("b1", 16), init("w2", 16, 1, 3, 3), init("b2", 16),
         init("w3", 10, 16), init("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return _net(tmp_path_factory.mktemp("cuda") / "net.onnx")


def _ort(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_presets_name_their_arch_and_the_local_gpu_wins(monkeypatch):
    for name, arch in zip(PRESETS, CUDA_ARCHS):
        spec = get_target(name)
        assert spec.config["arch"] == arch and spec.target.kind.name == "cuda" and spec.host["kind"] == "llvm"
        assert "fp16" in spec.features["tensor_cores"] and spec.features["arch_from"] == f"preset {arch}"
        assert str(spec.target.attrs["arch"]) == arch
    monkeypatch.setattr(targets, "local_gpu_arch", lambda: None)
    spec = get_target("cuda")
    assert spec.config["arch"] == "sm_80" and "no GPU" in spec.features["arch_from"] and spec.name == "cuda-sm80"
    monkeypatch.setattr(targets, "local_gpu_arch", lambda: ("sm_89", "NVIDIA L4"))
    spec = get_target("cuda")
    assert spec.config["arch"] == "sm_89" and spec.features["arch_from"] == "nvidia-smi: NVIDIA L4 (sm_89)"
    assert spec.name == "cuda-sm89"


def test_targets_lists_every_cuda_preset(capsys):
    assert main(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, (gpus, _) in zip(PRESETS, CUDA_ARCHS.values()):
        assert rows[name]["target"]["arch"] == "sm_" + name[len("cuda-sm"):] and gpus in rows[name]["assumes"]


@pytest.mark.parametrize("target, words", [
    ("cuda-sm99", "unknown target 'cuda-sm99'"),
    ('{"preset": "cuda", "arch": "sm_52"}', "CUDA arch 'sm_52'"),
    ("cuda -arch=ampere", "not of the form sm_XY"),
])
def test_bad_cuda_targets_exit_2_with_one_line(net, tmp_path, capsys, target, words):
    out = tmp_path / "b"
    assert main(["compile", net, "-o", str(out), "--target", target]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_arch_check_names_what_nvcc_builds(monkeypatch):
    monkeypatch.setattr(targets, "nvcc_archs", lambda: ("sm_75", "sm_80"))
    with pytest.raises(UsageError, match=r"'sm_90' cannot be built by this nvcc \(it builds sm_75, sm_80\)"):
        targets.check_cuda_arch("sm_90")
    monkeypatch.setattr(targets, "nvcc_archs", lambda: None)
    assert targets.check_cuda_arch("sm_90a") == "sm_90a"
    with pytest.raises(UsageError, match="sm_75 and later"):
        targets.check_cuda_arch("sm_70")


def test_window_rule_takes_windows_and_leaves_convs_and_broadcasts():
    """Depthwise convs and row sums qualify; a conv (its input reused across output channels) and a
    reduction whose epilogue broadcasts it (x - sum: one reduction per element) do not."""
    from tvm import te, topi

    from graphopt.backends.schedules.gpu_window import WindowReduction

    target = get_target("cuda-sm80").target
    x = te.placeholder((1, 8, 10, 10), name="x")
    w, w2 = te.placeholder((8, 1, 3, 3), name="w"), te.placeholder((4, 8, 3, 3), name="w2")
    k = te.reduce_axis((0, 10), name="k")
    row = te.compute((1, 8, 10), lambda n, c, h: te.sum(x[n, c, h, k], axis=k), name="row")
    centered = te.compute((1, 8, 10, 10), lambda n, c, h, i: x[n, c, h, i] - row[n, c, h], name="centered")
    cases = {"depthwise": ([x, w, topi.nn.depthwise_conv2d_nchw(x, w, 1, 1, 1)], True),
             "row sum": ([x, row], True),
             "conv": ([x, w2, topi.nn.conv2d_nchw(x, w2, 1, 1, 1)], False),
             "x - row sum": ([x, centered], False)}
    for name, (tensors, taken) in cases.items():
        sch = WindowReduction().apply(te.create_prim_func(tensors), target)
        assert (sch is not None) == taken, name
        if sch is not None:
            assert "threadIdx.x" in sch.mod["main"].script()


@needs_nvcc
def test_small_net_builds_for_every_preset_and_its_ptx_targets_the_arch(net, tmp_path):
    for name in PRESETS:
        compiled = api.compile(net, target=name)
        report = last_gpu_report()
        assert set(report.values()) <= {rule for rule, _ in gpu_rules()}
        assert {"window", "dlight.Matmul"} <= set(report.values())
        (source,) = cuda_check.cuda_sources(compiled.executable)
        arch = compiled.target.config["arch"]
        ptx = cuda_check.compile_ptx(source, arch, tmp_path).read_text()
        assert re.search(rf"^\.target {arch}\b", ptx, re.M), f"{name}: PTX is not for {arch}"
        assert ptx.count(".entry ") == len(report)  # one kernel per fused function


@needs_nvcc
def test_squeezenet_bundle_for_sm80(tmp_path):
    """The catalog's small model: convs on dlight's Matmul, max pools on the window rule, dlight's
    Fallback only for data movement; the bundle names the arch and the PTX is for it."""
    compiled = api.compile("light:squeezenet", target="cuda-sm80", output=tmp_path / "b")
    report = last_gpu_report()
    for name, rule in report.items():
        if "conv2d" in name:
            assert rule == "dlight.Matmul", (name, rule)
        if "pool" in name:
            assert rule == "window", (name, rule)
        if rule == "dlight.Fallback":
            assert name.startswith(("concatenate", "reshape")), name
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["target"]["target"]["arch"] == "sm_80"
    (source,) = cuda_check.cuda_sources(compiled.executable)
    ptx = cuda_check.compile_ptx(source, "sm_80", tmp_path).read_text()
    assert re.search(r"^\.target sm_80\b", ptx, re.M) and ptx.count(".entry ") == len(report)


def _serial(func):
    """``func`` with its thread-bound loops made serial (through its TVMScript): runnable on the CPU."""
    import tvm

    text = re.sub(r'T\.thread_binding\(([^,]+), thread="[^"]+"\)', r"T.serial(\1)", func.script())
    return tvm.script.from_source(text)


def test_window_schedule_matches_onnxruntime_on_the_cpu(net):
    """The GPU schedule of the depthwise conv, the max pool and the mean, run on the CPU threads made serial;
    the functions other rules scheduled (shared memory between threads) run unscheduled."""
    import tvm
    from tvm import relax, tirx

    from graphopt.backends.compile import _build, fused_module

    gpu = get_target("cuda-sm80")
    mod = fused_module(api.load(net), gpu)
    report: dict = {}
    with gpu.target:
        scheduled = apply_gpu_schedules(mod, gpu.target, report=report)
    window = [name for name, rule in report.items() if rule == "window"]
    assert len(window) >= 3, report  # depthwise conv + relu, max pool, global average pool
    cpu_mod = mod.clone()
    for gv, func in scheduled.functions_items():
        if isinstance(func, tirx.PrimFunc) and gv.name_hint in window:
            assert "threadIdx.x" in func.script()
            serial = _serial(func).with_attr("tirx.is_scheduled", True)
            cpu_mod.update_func(cpu_mod.get_global_var(gv.name_hint), serial)
    executable = _build(cpu_mod, get_target("x86"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(1).standard_normal((1, 3, 20, 20)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = _ort(net, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_device_check_without_a_gpu_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(targets, "local_gpu_arch", lambda: None)
    assert cuda_check.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no NVIDIA GPU" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_device_check_steps_on_the_cpu(net, tmp_path, monkeypatch):
    """The check's own steps (compile, save, load, compare with ORT, time, report) on the x86 target."""
    monkeypatch.setattr(cuda_check, "why_no_gpu", lambda: None)
    monkeypatch.setattr(cuda_check, "jit_compiler", lambda: "nvcc")
    monkeypatch.setattr(cuda_check, "TARGET", "x86")
    monkeypatch.setattr(cuda_check, "_environment", lambda: {"gpu": ("sm_80", "test"), "jit": "nvcc"})
    out = tmp_path / "out"
    assert cuda_check.main([str(out), "--models", net, "--repeat", "3"]) == 0
    (result,) = json.loads((out / "cuda_check.json").read_text())["results"]
    assert result["match"] and result["max_abs"] < 1e-4 and result["graphopt"]["median_ms"] > 0
    assert (out / "bundles" / "net" / "manifest.json").is_file()
    assert "| " + net + " |" in (out / "cuda_check.md").read_text()


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("spec", CATALOG)
def test_catalog_model_builds_for_every_preset(spec, tmp_path):
    """Every catalog model, every preset: a bundle is written, no function is left to no rule, and the
    CUDA source compiles to PTX for the preset's arch."""
    for name in PRESETS:
        compiled = api.compile(spec, target=name, input_shapes=api.input_shapes_for(spec), output=tmp_path / name)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["target"]["target"]["arch"] == compiled.target.config["arch"]
        report = last_gpu_report()
        assert report and set(report.values()) <= {rule for rule, _ in gpu_rules()}
        (source,) = cuda_check.cuda_sources(compiled.executable)
        arch = compiled.target.config["arch"]
        ptx = cuda_check.compile_ptx(source, arch, tmp_path).read_text()
        assert re.search(rf"^\.target {arch}\b", ptx, re.M)

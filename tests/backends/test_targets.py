"""Target presets: what each one is, how bad names are reported, cross compilers."""

from __future__ import annotations

import os
import platform

import pytest

from graphopt.backends.targets import PRESETS, get_target
from graphopt.core.errors import UnsupportedError, UsageError


def test_x86_preset_describes_this_host():
    from tvm.target import codegen

    spec = get_target("x86")
    assert spec.kind == "llvm"
    assert spec.config["mcpu"] == str(codegen.llvm_get_system_cpu())
    assert spec.config["num-cores"] == len(os.sched_getaffinity(0))
    assert spec.features["cores"] == spec.config["num-cores"]
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    if flags:  # the host's real SIMD width: a rule planned for a wider one spills or faults
        assert spec.features["vector_bits"] == (512 if "avx512f" in flags else 256 if "avx" in flags else 128)
    assert spec.features.get("l1d", 0) > 0
    assert spec.target.kind.name == "llvm"
    assert spec.can_run_here() == (platform.machine() == "x86_64")
    assert spec.export_function() is None


@pytest.mark.parametrize("mcpu, bits", [("skylake-avx512", 512), ("znver4", 512), ("znver3", 256),
                                        ("haswell", 256), ("x86-64", 128)])
def test_vector_width_follows_the_cpu_features(mcpu, bits):
    """TVM's own llvm_get_vector_width says 512 for all of these; the schedules need the real width."""
    assert get_target({"preset": "x86", "mcpu": mcpu}).features["vector_bits"] == bits


def test_aarch64_preset_cross_compiles(monkeypatch):
    spec = get_target("aarch64")
    assert spec.config["mtriple"] == "aarch64-linux-gnu"
    assert "+neon" in spec.config["mattr"]
    assert spec.features["vector_bits"] == 128
    assert "arm_cpu" in list(spec.target.keys)
    if platform.machine() != "aarch64":
        assert not spec.can_run_here()
        assert "aarch64" in spec.why_not_runnable()
    import graphopt.backends.targets as targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(UnsupportedError, match="apt-get install gcc-aarch64-linux-gnu"):
        spec.export_function()


def test_cuda_preset_has_a_host():
    spec = get_target("cuda")
    t = spec.target
    assert t.kind.name == "cuda"
    assert t.host is not None and t.host.kind.name == "llvm"
    assert spec.is_gpu
    assert str(t.attrs["arch"]) == "sm_80"


def test_unknown_name_lists_presets():
    with pytest.raises(UsageError) as e:
        get_target("arm64")
    for name in PRESETS:
        assert name in str(e.value)


def test_json_target_and_overrides():
    spec = get_target('{"preset": "x86", "mcpu": "skylake-avx512"}')
    assert spec.config["mcpu"] == "skylake-avx512"
    assert spec.config["num-cores"] == get_target("x86").config["num-cores"]
    raw = get_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert raw.kind == "llvm" and raw.features["vector_bits"] == 128
    with pytest.raises(UsageError, match="nope"):
        get_target('{"kind": "nope"}')
    with pytest.raises(UsageError, match="JSON"):
        get_target("{not json")
    with pytest.raises(UsageError, match="kind"):
        get_target({"mcpu": "znver4"})


def test_to_json_round_trips():
    spec = get_target("aarch64")
    again = get_target({"preset": "aarch64"})
    assert again.to_json() == spec.to_json()

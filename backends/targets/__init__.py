"""Target presets (x86, aarch64, cuda) and what graphopt needs to know about each one.

``get_target("x86")`` returns a :class:`TargetSpec`: the TVM target, the features the schedules
look at (vector width, cores, cache sizes), how to export a shared library for it (the cross
compiler for aarch64) and whether code built for it can run on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.core.errors import UnsupportedError, UsageError

AARCH64_GCC = "aarch64-linux-gnu-gcc"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A compilation target: the TVM target plus the facts the compiler and schedules need."""

    name: str
    config: dict[str, Any]  # the TVM target as a dict (what ``tvm.target.Target`` takes)
    host: dict[str, Any] | None = None  # host target for device targets (cuda)
    features: dict[str, Any] = dataclasses.field(default_factory=dict)
    cross_compiler: str | None = None  # gcc driver to link the exported library with

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm", "vulkan", "metal", "opencl")

    @property
    def target(self):
        """The ``tvm.target.Target`` (built on each access; TVM targets are cheap)."""
        import tvm

        return tvm.target.Target(self.config, host=self.host) if self.host else tvm.target.Target(self.config)

    def device(self):
        import tvm

        return tvm.cuda(0) if self.kind == "cuda" else tvm.cpu(0)

    def can_run_here(self) -> bool:
        """Whether a library built for this target can be loaded and run on this machine."""
        if self.kind == "cuda":
            import tvm

            return bool(tvm.cuda(0).exist)
        triple = str(self.config.get("mtriple", ""))
        return not triple or triple.split("-")[0] == platform.machine()

    def why_not_runnable(self) -> str:
        if self.kind == "cuda":
            return "no CUDA GPU is visible on this machine"
        return f"code for {self.config.get('mtriple')} cannot run on this {platform.machine()} host"

    def export_function(self) -> Callable | None:
        """``fcompile`` for ``export_library``: the cross compiler, or None for the host's compiler.

        Raises UnsupportedError naming the missing tool and how to install it.
        """
        if self.cross_compiler is None:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise UnsupportedError(
                f"target {self.name}: cross compiler '{self.cross_compiler}' not found "
                f"(install it: apt-get install gcc-aarch64-linux-gnu)"
            )
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.config,
            "host": self.host,
            "features": self.features,
            "cross_compiler": self.cross_compiler,
        }


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cache_sizes() -> dict[str, int]:
    """L1d/L2/L3 sizes in bytes from sysfs (absent entries are left out)."""
    sizes: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        number = text.rstrip("KMG")
        if number.isdigit():
            sizes[f"l{level}" + ("d" if level == "1" else "")] = int(number) * mult
    return sizes


def _host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _vector_bits(config: dict[str, Any]) -> int:
    from graphopt.backends.schedules.features import llvm_vector_bits

    return llvm_vector_bits(config)


def _x86() -> TargetSpec:
    cores = _host_cores()
    config = {"kind": "llvm", "mcpu": _host_cpu(), "num-cores": cores}
    from graphopt.backends.bundle.loader import cpu_has_amx

    amx = cpu_has_amx()
    if amx:  # LLVM may not know the CPU (this one's AMX machine reports itself as rocketlake)
        config["mattr"] = ["+amx-tile", "+amx-bf16", "+amx-int8"]  # int8: QDQ convs (schedules/amx_int8.py)
    features = {"arch": "x86_64", "cores": cores, "vector_bits": _vector_bits(config), **_cache_sizes(),
                "int8_dot": _int8_dot(config)}
    if amx:
        features["amx"] = True
    return TargetSpec("x86", config, features=features)


def _int8_dot(config: dict[str, Any]) -> str | None:
    """The int8 dot product (VNNI, AVX-VNNI, Arm sdot) an llvm target has: its integer convs use it
    where there is no AMX-INT8 (schedules/int8_dot.py), and the loader checks the CPU has it."""
    from graphopt.backends.schedules.features import int8_dot_kind

    return int8_dot_kind(config)


def _x86_vnni() -> TargetSpec:
    """Any x86-64 CPU with AVX-512 VNNI (Cascade Lake's instruction set: Intel Xeon since 2019, AMD
    Zen 4/5); integer convs on vpdpbusd (no AMX), this host's cores."""
    cores = _host_cores()
    config = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": cores}
    features = {"arch": "x86_64", "cores": cores, "vector_bits": 512, **_cache_sizes(), "int8_dot": "vnni"}
    return TargetSpec("x86-vnni", config, features=features)


def _arm(name: str, mcpu: str, mattr: list[str], l1d_kb: int, l2_kb: int) -> TargetSpec:
    config = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr}
    # NEON is 128 bits; cache sizes are the named core's (per core L1d, L2), not measured.
    features = {"arch": "aarch64", "cores": 4, "vector_bits": 128, "l1d": l1d_kb * 1024, "l2": l2_kb * 1024,
                "int8_dot": _int8_dot(config)}
    return TargetSpec(name, config, features=features, cross_compiler=AARCH64_GCC)


def _aarch64() -> TargetSpec:
    return _arm("aarch64", "cortex-a72", ["+neon"], 32, 1024)


def _aarch64_dotprod() -> TargetSpec:
    return _arm("aarch64-dotprod", "cortex-a76", ["+neon", "+dotprod", "+fullfp16"], 64, 512)


# CUDA presets: compute capability -> (GPUs it names, tensor-core input types). Every one of them
# has fp16 tensor cores; sm_80 and later add tf32 and bf16.
CUDA_ARCHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sm_75": ("Turing: T4, RTX 20xx", ("fp16",)),
    "sm_80": ("Ampere: A100, A30", ("fp16", "bf16", "tf32")),
    "sm_86": ("Ampere: A10, A40, RTX 30xx", ("fp16", "bf16", "tf32")),
    "sm_89": ("Ada: L4, L40, RTX 40xx", ("fp16", "bf16", "tf32")),
    "sm_90": ("Hopper: H100, H200", ("fp16", "bf16", "tf32")),
}
CUDA_DEFAULT_ARCH = "sm_80"
_SHARED_MEMORY = 48 * 1024  # static shared memory per block, the same on every arch listed


@functools.lru_cache(maxsize=1)
def local_gpu_arch() -> tuple[str, str] | None:
    """(``sm_XY``, GPU name) of the first GPU ``nvidia-smi`` reports, or None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    cap, _, name = first.partition(",")
    major, dot, minor = cap.strip().partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        return None
    return f"sm_{major}{minor}", name.strip()


@functools.lru_cache(maxsize=1)
def nvcc_archs() -> tuple[str, ...] | None:
    """The ``sm_XY`` archs this machine's nvcc builds (``nvcc --list-gpu-arch``), None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = tuple("sm_" + w.split("_", 1)[1] for w in out.split() if w.startswith("compute_"))
    return archs or None


def check_cuda_arch(arch: Any) -> str:
    """``arch`` if code can be built for it here, else UsageError (one line: what nvcc builds)."""
    text = str(arch)
    m = re.fullmatch(r"sm_(\d+)[af]?", text)
    if m is None:
        raise UsageError(f"CUDA arch '{text}' is not of the form sm_XY (e.g. {', '.join(CUDA_ARCHS)})")
    built = nvcc_archs()
    base = f"sm_{m.group(1)}"
    if built is not None and base not in built:
        raise UsageError(f"CUDA arch '{text}' cannot be built by this nvcc (it builds {', '.join(built)})")
    if built is None and int(m.group(1)) < 75:
        raise UsageError(f"CUDA arch '{text}' is older than graphopt supports (sm_75 and later)")
    return text


def _cuda_spec(name: str, arch: str, chosen: str) -> TargetSpec:
    config = {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32,
              "max_shared_memory_per_block": _SHARED_MEMORY}
    host = {"kind": "llvm", "mcpu": _host_cpu()}
    gpus, tensor_cores = CUDA_ARCHS.get(arch.rstrip("af"), ("", ("fp16",)))
    features = {"arch": arch, "warp_size": 32, "max_threads_per_block": 1024, "shared_memory": _SHARED_MEMORY,
                "tensor_cores": list(tensor_cores), "gpus": gpus, "arch_from": chosen}
    return TargetSpec(name, config, host=host, features=features)


def _cuda() -> TargetSpec:
    """The local GPU's arch (``nvidia-smi``) when there is one, else sm_80; ``arch_from`` says which and
    the spec is named for the arch (``cuda-sm89``), so compile's summary line shows the choice."""
    local = local_gpu_arch()
    if local is None:
        arch, why = CUDA_DEFAULT_ARCH, f"default {CUDA_DEFAULT_ARCH}: no GPU reported by nvidia-smi"
    else:
        arch, why = check_cuda_arch(local[0]), f"nvidia-smi: {local[1]} ({local[0]})"
    return _cuda_spec(f"cuda-{arch.replace('_', '')}", arch, why)


def _cuda_preset(arch: str) -> Callable[[], TargetSpec]:
    return lambda: _cuda_spec(f"cuda-{arch.replace('_', '')}", check_cuda_arch(arch), f"preset {arch}")


PRESETS: dict[str, Callable[[], TargetSpec]] = {
    "x86": _x86, "aarch64": _aarch64, "cuda": _cuda, "aarch64-dotprod": _aarch64_dotprod, "x86-vnni": _x86_vnni,
    **{f"cuda-{arch.replace('_', '')}": _cuda_preset(arch) for arch in CUDA_ARCHS},
}

# What each preset assumes about the machine that runs the bundle (``graphopt targets``).
ASSUMES: dict[str, str] = {
    "x86": "this host's CPU (LLVM's name for it, its cores and caches; AMX when present)",
    "x86-vnni": "any x86-64 CPU with AVX-512 VNNI (Cascade Lake's instruction set: Xeon since 2019, AMD Zen 4); "
                "int8 convs on vpdpbusd, no AMX; this host's cores",
    "aarch64": "64-bit Arm with NEON (Cortex-A72: Raspberry Pi 4); 4 cores; aarch64-linux-gnu-gcc to link",
    "aarch64-dotprod": "Arm v8.2 with NEON, sdot/udot and fp16 arithmetic (Cortex-A76: Raspberry Pi 5, "
                       "Jetson Orin CPU); 4 cores; aarch64-linux-gnu-gcc to link",
    "cuda": "this machine's NVIDIA GPU (its compute capability from nvidia-smi), sm_80 when none is visible",
    **{f"cuda-{arch.replace('_', '')}": f"an NVIDIA GPU of compute capability {arch[3:-1]}.{arch[-1]} ({gpus}); "
       f"tensor cores: {'/'.join(tc)}" for arch, (gpus, tc) in CUDA_ARCHS.items()},
}


def get_target(name_or_json: str | dict | TargetSpec) -> TargetSpec:
    """A preset name (``x86``, ``aarch64``, ``cuda``), a TVM target dict, or its JSON text.

    A dict/JSON may carry ``"preset"`` to start from a preset and override fields, e.g.
    ``{"preset": "x86", "mcpu": "skylake-avx512"}``. Unknown names raise UsageError listing presets.
    """
    if isinstance(name_or_json, TargetSpec):
        return name_or_json
    if isinstance(name_or_json, str):
        text = name_or_json.strip()
        if not text.startswith("{"):
            if text not in PRESETS and text.split(" ", 1)[0] in RAW_KINDS:
                return _from_dict(parse_raw(text))
            if text not in PRESETS:
                raise UsageError(f"unknown target '{text}' (presets: {', '.join(PRESETS)}; or a TVM target "
                                 "such as 'llvm -mtriple=aarch64-linux-gnu -mattr=+neon' or a JSON target dict)")
            return PRESETS[text]()
        try:
            name_or_json = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"target JSON is not valid: {e}") from None
    if not isinstance(name_or_json, dict):
        raise UsageError(f"target must be a preset name or a dict, got {type(name_or_json).__name__}")
    return _from_dict(dict(name_or_json))


RAW_KINDS = ("llvm", "cuda", "c")
_LIST_KEYS = ("mattr", "keys", "libs")


def parse_raw(text: str) -> dict[str, Any]:
    """A TVM target in its command-line form, ``llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod``,
    as the dict TVM 0.27 takes (it no longer parses the string itself)."""
    kind, *options = text.split()
    config: dict[str, Any] = {"kind": kind}
    for option in options:
        key, sep, value = option.lstrip("-").partition("=")
        if not option.startswith("-") or not sep or not key or not value:
            raise UsageError(f"target '{text}': '{option}' is not -key=value")
        config[key] = value.split(",") if key in _LIST_KEYS else int(value) if value.isdigit() else value
    return config


def _from_dict(d: dict[str, Any]) -> TargetSpec:
    preset = d.pop("preset", None)
    if preset is not None:
        base = get_target(str(preset))
        config = {**base.config, **d}
        spec = dataclasses.replace(base, name=f"{base.name}-custom" if d else base.name, config=config)
        if d and spec.kind == "llvm":
            spec = dataclasses.replace(spec, features={**spec.features, "vector_bits": _vector_bits(config),
                                                       "int8_dot": _int8_dot(config)})
    else:
        if "kind" not in d:
            raise UsageError(f"target dict needs 'kind' or 'preset' (presets: {', '.join(PRESETS)})")
        host = {"kind": "llvm"} if d["kind"] == "cuda" else None
        cross = AARCH64_GCC if str(d.get("mtriple", "")).startswith("aarch64") and platform.machine() != "aarch64" else None
        arch = {"arch": str(d["mtriple"]).split("-")[0]} if d.get("mtriple") else {}
        spec = TargetSpec(f"custom-{d['kind']}", d, host=host, features=arch, cross_compiler=cross)
    if spec.kind == "cuda":
        arch = check_cuda_arch(spec.config.get("arch", CUDA_DEFAULT_ARCH))
        spec = dataclasses.replace(spec, features={**spec.features, "arch": arch})
    try:
        spec.target  # noqa: B018 - validate now, with a clear message
    except Exception as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"invalid target {json.dumps(spec.config)}: {first}") from None
    if spec.kind == "llvm" and "vector_bits" not in spec.features:
        spec = dataclasses.replace(spec, features={**spec.features, "vector_bits": _vector_bits(spec.config),
                                                   "int8_dot": _int8_dot(spec.config)})
    return spec


__all__ = ["ASSUMES", "CUDA_ARCHS", "PRESETS", "TargetSpec", "check_cuda_arch", "get_target", "local_gpu_arch",
           "parse_raw"]

"""The device check for CUDA bundles, prepared to run in one go on a machine with an NVIDIA GPU.

``python3 -m graphopt.backends.targets.cuda_check OUTDIR [--models ...] [--repeat N]``

For each catalog model: compile for the local GPU (preset ``cuda``: its arch from ``nvidia-smi``),
save the bundle, load it back as a device would (hashes checked), run it on the model's inputs and
compare every output with ONNX Runtime on the CPU; then time the bundle against ONNX Runtime's CUDA
provider (``onnxruntime-gpu``; inputs and outputs bound on the GPU on both sides) in the same run,
taking turns. Writes ``OUTDIR/cuda_check.json`` and ``OUTDIR/cuda_check.md`` (one row per model).
Without a GPU it exits 2 saying so; a model that fails is recorded with its error and the others go on
(exit 1 if any failed or mismatched).

TVM 0.27 puts CUDA C source in the bundle and compiles it when the bundle is loaded, through NVRTC
(the ``cuda-bindings`` package) or ``nvcc``; ``jit_compiler()`` picks the one present. The helpers
``cuda_sources`` and ``compile_ptx`` let a machine without a GPU check that the source builds for a
preset's arch (tests/backends/test_cuda_build.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("light:squeezenet", "light:resnet50", "rapidocr:det", "rapidocr:rec", "rapidocr:cls")
TARGET = "cuda"  # the preset the check compiles for (tests run the same steps on "x86")
RTOL, ATOL = 1e-3, 1e-3  # float32 on the GPU: other summation orders and fused multiply-adds than ORT's CPU


def why_no_gpu() -> str | None:
    """None when a CUDA GPU can run bundles here, else the reason in one line."""
    from graphopt.backends.targets import local_gpu_arch

    if local_gpu_arch() is None:
        return "no NVIDIA GPU here (nvidia-smi is missing or reports none)"
    import tvm

    if not tvm.cuda(0).exist:
        return "nvidia-smi reports a GPU but TVM's CUDA runtime cannot open it (driver or libcuda missing)"
    return None


def jit_compiler() -> str | None:
    """How TVM will compile a bundle's CUDA source on load: "nvrtc", "nvcc" (set for this process), or None."""
    if os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc" and shutil.which("nvcc"):
        return "nvcc"
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        return "nvrtc"
    if shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
        return "nvcc"
    return None


def cuda_sources(executable) -> list[str]:
    """The CUDA C source of every CUDA module a compiled executable carries."""
    def walk(module):
        yield module
        for child in module.imports:
            yield from walk(child)

    root = executable.mod if hasattr(executable, "mod") else executable
    return [m.inspect_source() for m in walk(root) if m.kind == "cuda"]


def compile_ptx(source: str, arch: str, directory: str | os.PathLike) -> Path:
    """``nvcc -ptx -arch=ARCH``: the PTX of ``source`` for ``arch`` (RuntimeError with nvcc's last line)."""
    d = Path(directory)
    cu, ptx = d / "kernels.cu", d / f"kernels_{arch}.ptx"
    cu.write_text(source)
    r = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", "-O3", "-w", "-o", str(ptx), str(cu)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"nvcc -arch={arch} failed: {lines[-1] if lines else r.returncode}")
    return ptx


def _ort_cpu(path: str, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _ort_cuda_timer(path: str, feeds: dict):
    """A timer ``run(n) -> [seconds]`` for ORT's CUDA provider (I/O bound on the GPU), or None without it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return None
    binding = sess.io_binding()
    names = {i.name for i in sess.get_inputs()}
    for name, value in feeds.items():
        if name in names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            times.append(time.perf_counter() - t)
        return times

    return run


def _compare(outputs: dict[str, np.ndarray], expected: list[np.ndarray]) -> dict[str, Any]:
    worst_abs, worst_rel, ok = 0.0, 0.0, len(outputs) == len(expected)
    for got, exp in zip(outputs.values(), expected):
        got, exp = np.asarray(got, dtype=np.float64), np.asarray(exp, dtype=np.float64)
        if got.shape != exp.shape:
            return {"match": False, "max_abs": None, "max_rel": None, "note": f"shape {got.shape} != {exp.shape}"}
        diff = np.abs(got - exp)
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(exp) + 1e-12)).max(initial=0.0)))
        ok = ok and bool(np.allclose(got, exp, rtol=RTOL, atol=ATOL))
    return {"match": ok, "max_abs": worst_abs, "max_rel": worst_rel}


def check_model(spec: str, outdir: Path, repeat: int) -> dict[str, Any]:
    from graphopt import models
    from graphopt.backends.bundle import load_bundle
    from graphopt.backends.bundle.timing import runner_timer
    from graphopt.backends.compile import compile_model
    from graphopt.backends.schedules.gpu_rules import last_gpu_report, rule_counts
    from graphopt.core import io
    from graphopt.core.shapes import specialize
    from graphopt.core.timing import interleaved, stats_ms

    shapes = None if Path(spec).is_file() else models.default_input_shapes(spec)
    path = str(models.model_path(spec))
    bundle_dir = outdir / "bundles" / Path(spec.replace(":", "_")).stem
    t = time.perf_counter()
    model = io.load(path)
    if shapes:
        specialize(model, shapes)
    compiled = compile_model(model, target=TARGET, output=bundle_dir, source_path=path)
    arch = compiled.target.config.get("arch", compiled.target.kind)
    result: dict[str, Any] = {"model": spec, "target": compiled.target.name, "arch": arch,
                              "compile_s": round(time.perf_counter() - t, 2),
                              "rules": rule_counts(last_gpu_report()) if compiled.target.is_gpu else {}}
    bundle = load_bundle(bundle_dir)
    feeds = models.random_inputs(path, input_shapes=shapes)
    result.update(_compare(bundle(**feeds), _ort_cpu(path, feeds)))
    timers = {"graphopt": runner_timer(bundle.runner, feeds)}
    ort_cuda = _ort_cuda_timer(path, feeds)
    if ort_cuda is not None:
        timers["ort_cuda"] = ort_cuda
    times = interleaved(timers, repeat, warmup=10)
    result["graphopt"] = stats_ms(times["graphopt"])
    result["ort_cuda"] = stats_ms(times["ort_cuda"]) if "ort_cuda" in times else None
    result["ratio"] = (round(result["graphopt"]["median_ms"] / result["ort_cuda"]["median_ms"], 3)
                       if result["ort_cuda"] else None)
    return result


def markdown(results: list[dict[str, Any]], header: str) -> str:
    rows = [header, "", "| model | arch | matches ORT CPU | max abs diff | graphopt ms (median) | ORT CUDA ms (median) "
            "| ratio | rules |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | | error: {r['error']} | | | | | |")
            continue
        ort = f"{r['ort_cuda']['median_ms']:.3f}" if r["ort_cuda"] else "no CUDA provider"
        rules = ", ".join(f"{k} {v}" for k, v in r["rules"].items())
        rows.append(f"| {r['model']} | {r['arch']} | {'yes' if r['match'] else 'NO'} | {r['max_abs']:.2e} | "
                    f"{r['graphopt']['median_ms']:.3f} | {ort} | {r['ratio'] if r['ratio'] is not None else '-'} "
                    f"| {rules} |")
    return "\n".join(rows) + "\n"


def _environment() -> dict[str, Any]:
    from graphopt.backends.targets import local_gpu_arch

    info: dict[str, Any] = {"gpu": local_gpu_arch(), "jit": jit_compiler()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m graphopt.backends.targets.cuda_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("outdir", help="folder for the bundles, cuda_check.json and cuda_check.md")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--repeat", type=int, default=100, help="timed runs per side")
    args = p.parse_args(argv)
    reason = why_no_gpu()
    if reason is not None:
        print(f"cuda_check: {reason}; nothing was run", file=sys.stderr)
        return 2
    if jit_compiler() is None:
        print("cuda_check: TVM compiles CUDA bundles on load and needs nvcc or the cuda-bindings package "
              "(pip install cuda-bindings); neither is here", file=sys.stderr)
        return 2
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    results = []
    for spec in args.models:
        print(f"cuda_check: {spec} ...", file=sys.stderr, flush=True)
        try:
            results.append(check_model(spec, outdir, args.repeat))
        except Exception as e:  # noqa: BLE001 - record the failure, check the other models
            line = next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
            results.append({"model": spec, "error": f"{type(e).__name__}: {line[:300]}"})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    (outdir / "cuda_check.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    header = (f"GPU {env['gpu'][1]} ({env['gpu'][0]}), CUDA source compiled by {env['jit']}, "
              f"onnxruntime {env.get('onnxruntime')}")
    (outdir / "cuda_check.md").write_text(markdown(results, header))
    print(markdown(results, header))
    return 0 if all("error" not in r and r["match"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

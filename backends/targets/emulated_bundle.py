"""Run and time an aarch64 bundle on an x86 host: the bundle's own loader.py under qemu.

The host checks the bundle first with the same loader code (manifest, pinned digest, every file's
sha256, the library's ELF headers), so a bad bundle is refused in a moment, without starting qemu;
then the bundle's standalone loader runs in the aarch64 environment (``emulate.prepare``) and checks
it all again there, the CPU architecture and features included. Inputs and outputs travel as .npz.
One qemu process serves one command: importing TVM under qemu alone takes about 10 s.
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from pathlib import Path

import numpy as np

from graphopt.backends.bundle import loader as _loader
from graphopt.backends.targets import emulate
from graphopt.core.errors import GraphoptError

BENCH_SCRIPT = Path(__file__).with_name("aarch64_bench.py")
NOTE = ("qemu timings: aarch64 code translated to x86 code by qemu on this host; they are not device "
        "timings and no ratio against ONNX Runtime is given")


class EmulatedBundleError(GraphoptError):
    """The bundle was refused (by the host check or by its loader under qemu) or failed there."""


def check_on_host(bundle: str, *, verify: bool = True, digest: str | None = None) -> dict:
    """The bundle's manifest after the loader's checks that need no TVM (a BundleError otherwise)."""
    try:
        manifest = _loader.read_manifest(os.fspath(bundle), digest)
        _loader.verify_files(os.fspath(bundle), manifest, hashes=verify)
        _loader.check_elf(_loader.bundle_file(os.fspath(bundle), manifest["library"], "library"))
    except _loader.BundleError as e:
        raise EmulatedBundleError(str(e)) from None
    return manifest


def check_inputs(manifest: dict, inputs: dict[str, np.ndarray]) -> None:
    """The loader's input checks (names, dtypes, shapes), on the host, before qemu starts."""
    rows = [(r["name"], tuple(r["shape"]), r["dtype"]) for r in manifest["inputs"]]
    view = types.SimpleNamespace(inputs=rows, input_names=[n for n, _, _ in rows])
    try:
        _loader.Runner.check_inputs(view, (), inputs)
    except _loader.InputError as e:
        raise EmulatedBundleError(str(e)) from None


def is_emulated(bundle: str) -> bool:
    """Whether ``bundle`` is a bundle directory whose library runs here only under qemu."""
    path = Path(bundle) / _loader.MANIFEST
    try:
        manifest = json.loads(path.read_bytes()[: _loader.MAX_MANIFEST_BYTES].decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # the loader names what is wrong with it
        return False
    return isinstance(manifest, dict) and emulate.needs_emulation(emulate.bundle_arch(manifest))


def _save_inputs(path: Path, inputs: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **inputs)


def _refusal(proc, what: str) -> GraphoptError:
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    if proc.returncode == 2:  # the loader's own refusal: one line 'loader: error: ...'
        return EmulatedBundleError(f"under qemu: {last.removeprefix('loader: error: ')}")
    return emulate.EmulationError(f"{what} under qemu failed (exit code {proc.returncode}): {last}")


def run_bundle(bundle: str, inputs: dict[str, np.ndarray], *, verify: bool = True, digest: str | None = None,
               cpu: str | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
    """Run ``bundle``'s loader.py under qemu on ``inputs``; returns its outputs by name."""
    check_inputs(check_on_host(bundle, verify=verify, digest=digest), inputs)
    env = emulate.prepare()
    bundle = os.path.abspath(bundle)
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as tmp:
        src, out = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        _save_inputs(src, inputs)
        argv = [os.path.join(bundle, "loader.py"), bundle, "--inputs", str(src), "-o", str(out)]
        argv += [] if verify else ["--no-verify"]
        argv += ["--expect-digest", digest] if digest else []
        proc = env.run(argv, cpu=cpu, timeout=timeout)
        if proc.returncode != 0:
            raise _refusal(proc, "the bundle's loader")
        with np.load(out, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def bench_bundle(bundle: str, inputs: dict[str, np.ndarray] | None = None, *, repeat: int = 10, warmup: int = 1,
                 verify: bool = True, digest: str | None = None, cpu: str | None = None,
                 threads: int | None = None, timeout: float | None = None) -> dict:
    """Time ``bundle`` under qemu (its loader, in one aarch64 process): ``{"runs_ms": [...], ...}``.

    ``inputs`` default to seeded random arrays of the declared shapes. The times are emulation times.
    """
    manifest = check_on_host(bundle, verify=verify, digest=digest)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = {r["name"]: (rng.standard_normal(r["shape"]) if "float" in r["dtype"] else
                              np.zeros(r["shape"])).astype(r["dtype"]) for r in manifest["inputs"]}
    check_inputs(manifest, inputs)
    env = emulate.prepare()
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as tmp:
        src, report = Path(tmp) / "inputs.npz", Path(tmp) / "report.json"
        _save_inputs(src, inputs)
        argv = [str(BENCH_SCRIPT), os.path.abspath(bundle), str(src), str(report), str(repeat), str(warmup),
                "1" if verify else "0", digest or ""]
        proc = env.run(argv, cpu=cpu, timeout=timeout, threads=threads)
        if proc.returncode != 0:
            raise _refusal(proc, "timing the bundle")
        result = json.loads(report.read_text())
    result["note"] = NOTE
    return result


__all__ = ["NOTE", "EmulatedBundleError", "bench_bundle", "check_on_host", "is_emulated", "run_bundle"]

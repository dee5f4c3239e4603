"""Standalone loader for a graphopt bundle: needs only TVM's runtime, numpy and the standard library.

A copy of this file is written into every bundle, so a deployment can run it without graphopt::

    python3 BUNDLE/loader.py BUNDLE --inputs in.npz -o out.npz

From Python::

    import loader
    model = loader.load("BUNDLE")          # checks the sha256 of every file against manifest.json
    outputs = model(x=np.zeros((1, 3, 224, 224), np.float32))   # dict: output name -> array

Exit codes of the command: 0 success, 2 a bad bundle or bad inputs (one line saying which), 1 other errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "graphopt-bundle"
FORMAT_VERSION = 1


class BundleError(Exception):
    """The bundle is missing a file, was modified, or was built for another machine."""


class InputError(ValueError):
    """The inputs do not match the model: the message names the input and what was expected."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(a: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    return a if a.flags.c_contiguous else a.copy(order="C")


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def physical_cores() -> int:
    """CPU cores (not hardware threads) this process may run on, from Linux's topology files."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                package = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                cores.add((package, f.read().strip()))
        except OSError:  # no topology (not Linux, a container hiding /sys): count the CPU
            cores.add(("cpu", c))
    return max(1, len(cores))


def use_physical_cores() -> None:
    """Run TVM's thread pool on every physical core, unless ``TVM_NUM_THREADS`` says otherwise.

    TVM's default is half the logical CPUs on x86, assuming two hyper-threads per core: on a VM whose
    vCPUs are whole cores (2 vCPUs, no SMT) that is one thread, and every parallel kernel runs serial.
    Takes effect when the pool starts (the first parallel kernel of the process).
    """
    if not os.environ.get("TVM_NUM_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


class Runner:
    """A compiled model on a device: ``runner(*arrays, **named_arrays) -> {output name: array}``.

    ``inputs``/``outputs`` are ``[(name, shape, dtype)]``; ``params`` are the weights passed after
    the data inputs (empty when they are embedded in the library).
    """

    def __init__(self, module, inputs, outputs, params, device) -> None:
        import tvm
        from tvm import relax

        use_physical_cores()
        self.inputs = [(n, tuple(s), str(d)) for n, s, d in inputs]
        self.outputs = [(n, None if s is None else tuple(s), str(d)) for n, s, d in outputs]
        self.device = device
        self.vm = relax.VirtualMachine(module, device)
        self._params = [tvm.runtime.tensor(_contiguous(np.asarray(p)), device) for p in params]

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _, _ in self.outputs]

    def check_inputs(self, args=(), kwargs=None) -> list[np.ndarray]:
        """The inputs in order, checked against the names, dtypes and shapes the model was built for."""
        kwargs = dict(kwargs or {})
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"got {len(args)} positional inputs, the model takes {len(names)} ({', '.join(names)})")
        given = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise InputError(f"unknown input '{name}' (the model's inputs: {', '.join(names)})")
            if name in given:
                raise InputError(f"input '{name}' given twice (positionally and by name)")
            given[name] = value
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"missing input '{missing[0]}' (the model's inputs: {', '.join(names)})")
        arrays = []
        for name, shape, dtype in self.inputs:
            a = np.asarray(given[name])
            if a.dtype.name != dtype:
                raise InputError(f"input '{name}': dtype {a.dtype.name}, expected {dtype}")
            if tuple(a.shape) != tuple(shape):
                raise InputError(f"input '{name}': shape {_shape_text(a.shape)}, expected {_shape_text(shape)}")
            arrays.append(_contiguous(a))
        return arrays

    def __call__(self, *args, **kwargs) -> dict:
        import tvm

        arrays = self.check_inputs(args, kwargs)
        tensors = [tvm.runtime.tensor(a, self.device) for a in arrays]
        result = self.vm["main"](*tensors, *self._params)
        values = [result] if hasattr(result, "numpy") else list(result)
        if len(values) != len(self.outputs):
            raise BundleError(f"the model returned {len(values)} outputs, the manifest lists {len(self.outputs)}")
        return {name: v.numpy() for (name, _, _), v in zip(self.outputs, values)}


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise BundleError(f"{directory}: not a bundle directory")
    if not os.path.isfile(path):
        raise BundleError(f"{directory}: no {MANIFEST} (not a graphopt bundle)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a graphopt bundle manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')} is newer than this loader ({FORMAT_VERSION})")
    return manifest


def verify_files(directory: str, manifest: dict) -> None:
    for name, digest in manifest.get("files", {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise BundleError(f"{directory}: file {name} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise BundleError(f"{directory}: file {name} does not match its sha256 in the manifest (modified or corrupted)")


def _device(manifest: dict):
    import tvm

    target = manifest.get("target", {}).get("target", {})
    if target.get("kind") == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BundleError("bundle was built for CUDA but no CUDA GPU is visible")
        return dev
    triple = str(target.get("mtriple", ""))
    if triple and triple.split("-")[0] != platform.machine():
        raise BundleError(f"bundle was built for {triple}; this machine is {platform.machine()}")
    if "+amx-bf16" in list(target.get("mattr", [])) and not cpu_has_amx():
        raise BundleError("bundle was built for a CPU with AMX-BF16 tiles (its convs use them) and this CPU "
                          "or kernel has none; compile it again with GRAPHOPT_AMX=0")
    return tvm.cpu(0)


# Linux hands out the AMX tile state on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def cpu_has_amx() -> bool:
    """AMX-BF16 in /proc/cpuinfo and the tile state granted by Linux (arch_prctl ARCH_REQ_XCOMP_PERM)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if "amx_tile" not in flags or "amx_bf16" not in flags:
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def load(directory: str, *, verify: bool = True) -> Runner:
    """Load a bundle directory (checking every file's sha256 unless ``verify=False``)."""
    import tvm

    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    device = _device(manifest)
    lib = tvm.runtime.load_module(os.path.join(directory, manifest.get("library", "lib.so")))
    pinfo = manifest.get("params", {})
    params = []
    if pinfo.get("file"):
        with np.load(os.path.join(directory, pinfo["file"]), allow_pickle=False) as data:
            params = [data[k] for k in pinfo["keys"]]
    io = lambda rows: [(r["name"], r["shape"], r["dtype"]) for r in rows]  # noqa: E731
    runner = Runner(lib, io(manifest["inputs"]), io(manifest["outputs"]), params, device)
    runner.manifest = manifest
    return runner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run a graphopt bundle on inputs from an .npz file.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input (by name)")
    p.add_argument("-o", "--output", required=True, help=".npz to write the outputs to")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    args = p.parse_args(argv)
    try:
        runner = load(args.bundle, verify=not args.no_verify)
        with np.load(args.inputs, allow_pickle=False) as data:
            inputs = {k: data[k] for k in data.files}
        outputs = runner(**inputs)
        tmp = args.output + ".tmp.npz"
        np.savez(tmp, **outputs)
        os.replace(tmp, args.output)
    except (BundleError, InputError, OSError) as e:
        print(f"loader: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

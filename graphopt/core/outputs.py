"""The one policy for paths graphopt writes to, checked by every command BEFORE any work.

``check_output_file(path, option, protected=...)`` refuses, with a :class:`UsageError` whose one-line
message names the option and the path:

* a symbolic link (even a dangling one): graphopt does not write through links, and an atomic
  rename would replace the link itself;
* anything that exists and is not a regular file: a directory, a character or block device, a FIFO,
  a socket (an atomic rename would replace a device node such as ``/dev/null`` with a file);
* a path whose parent directory is missing, is not a directory, or cannot be written (read-only
  directory or file system, checked with the effective user's rights);
* a path that is the same file as one of ``protected`` (the input model, its external-data files,
  an ``--inputs`` file): compared by ``st_dev``/``st_ino``, so hard links and other spellings of the
  same file are caught too.

``check_output_dir`` applies the same rules to an output directory (``--dump-ir``, ``--check-dir``): it
may exist as a real directory, or be new under a writable parent. ``model_files`` lists every file an
ONNX model reads (the model and its external-data files), to pass as ``protected``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from graphopt.core.errors import UsageError

# st_mode test -> what the message calls it
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _lstat(path: Path, option: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # new path (or a file in the way: _check_parent says)
        return None
    except (OSError, ValueError) as e:  # name too long, a NUL byte, no permission to look
        raise UsageError(f"{option} {path!s}: cannot be used as an output path: "
                         f"{getattr(e, 'strerror', None) or e}") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths exist and are the same file (same device and inode, links followed)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _check_parent(path: Path, option: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: directory {parent} does not exist") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{option} {path}: directory {parent} cannot be reached: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UsageError(f"{option} {path}: directory {parent} is not writable")


def _check_protected(path: Path, option: str, protected: Iterable[str | os.PathLike]) -> None:
    for p in protected:
        if same_file(path, p):
            raise UsageError(f"{option} {path}: is the same file as the input {p}; "
                             "refusing to overwrite an input (choose another output path)")


def check_output_file(path: str | os.PathLike, option: str, *,
                      protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse (UsageError naming ``option`` and ``path``) a path graphopt must not write a file to."""
    out = Path(path)
    st = _lstat(out, option)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{option} {out}: is a symbolic link; graphopt does not write through links")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {out}: is {_kind(st.st_mode)}, not a regular file; "
                         "graphopt writes only regular files or new paths")
    _check_parent(out, option)
    _check_protected(out, option, protected)
    return out


def check_output_dir(path: str | os.PathLike, option: str, *,
                     protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output directory that is a link or a non-directory, or a new one under a missing or
    read-only parent; an existing real directory must itself be writable."""
    out = Path(path)
    st = _lstat(out, option)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{option} {out}: is a symbolic link; graphopt does not write through links")
    if st is None:
        _check_parent(out, option)
    elif not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {out}: is {_kind(st.st_mode)}, expected a directory")
    elif not os.access(out, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UsageError(f"{option} {out}: directory is not writable")
    _check_protected(out, option, protected)
    return out


def check_distinct(paths: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two output options naming the same path (``{option: path}``; None entries are skipped)."""
    seen: dict[str, str] = {}
    for option, p in paths.items():
        if p is None:
            continue
        key = os.path.abspath(p)
        if key in seen:
            raise UsageError(f"{option} {p}: same path as {seen[key]}; give each output its own path")
        seen[key] = f"{option} {p}"


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX model reads: the model file and every external-data file it names.

    A file that does not parse yields just itself (loading it reports the problem)."""
    import onnx

    p = Path(path)
    files = [p]
    if not p.is_file():
        return files
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: io.load names the problem
        return files
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for t in (*g.initializer, *(s.values for s in g.sparse_initializer)):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in t.external_data if e.key == "location"), None)
                if loc and (p.parent / loc) not in files:
                    files.append(p.parent / loc)
        for node in g.node:
            for a in node.attribute:
                graphs.extend([a.g] if a.HasField("g") else [])
                graphs.extend(a.graphs)
    return files


def files_read_by(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files the commands' positional inputs read: a model file and its external data, or every
    file of a bundle directory (a bundled model's name, which is not a path, reads nothing local)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.extend(model_files(p))
    return files


def check_output_files(options: dict[str, str | os.PathLike | None], *,
                       protected: Iterable[str | os.PathLike] = ()) -> None:
    """``check_output_file`` for every ``{option: path}`` given (None: option not used), after
    refusing two options that name the same path."""
    protected = list(protected)
    check_distinct(options)
    for option, path in options.items():
        if path is not None:
            check_output_file(path, option, protected=protected)

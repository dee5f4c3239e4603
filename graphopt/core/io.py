"""Reading and writing ONNX models through onnx_ir.

* Loading never materializes external weights: onnx_ir memory-maps them lazily, so a model
  with several GB of external data costs one copy of the weights at most.
* Saving is atomic: everything is written into a temporary directory beside the target and
  moved into place with ``os.replace`` (external data first, the model file last), so an
  interrupted save never leaves a half-written ``-o`` file, and the input file is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir

from graphopt.core.errors import GraphoptError, ModelLoadError, UsageError

# protobuf cannot serialize a message of 2 GiB or more: above this, weights go to external data.
_PROTO_LIMIT = 2**31 - 2**26


def load(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load an ONNX file into an ``onnx_ir.Model``; external data stays on disk until used.

    Raises :class:`ModelLoadError` naming the file for a missing, truncated or invalid model.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{p}: not a valid ONNX file (truncated or not a protobuf model): {_first_line(e)}") from None
    if not proto.HasField("graph") or (not proto.opset_import and not proto.graph.node):
        raise ModelLoadError(f"{p}: not a valid ONNX file (no graph or opset_import)")
    _check_external_data(proto, p)
    bad_text = _invalid_utf8(proto, "model")
    if bad_text:
        raise ModelLoadError(f"{p}: {bad_text} is not valid UTF-8 text (a damaged file?)")
    if check:
        _check(proto, p)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot be read into the IR: {_first_line(e)}") from None
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    return model


def _check(proto: onnx.ModelProto, p: Path) -> None:
    max_opset = onnx.defs.onnx_opset_version()
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > max_opset:
            raise ModelLoadError(
                f"{p}: unknown opset ai.onnx {imp.version} (this onnx knows up to {max_opset})"
            )
        if imp.domain in ("", "ai.onnx") and imp.version < 1:
            raise ModelLoadError(f"{p}: invalid opset version {imp.version}")
    problem = _order_problem(proto.graph)
    if problem:
        raise ModelLoadError(f"{p}: {problem}")
    try:
        # Checking the path (not the proto) copes with models over 2 GB and external data.
        onnx.checker.check_model(str(p))
    except Exception as e:  # ValidationError, and C++ errors surfacing as others
        raise ModelLoadError(f"{p}: fails onnx.checker: {_one_line(e)}") from None


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph under it (If/Loop/Scan bodies)."""
    todo = [graph]
    while todo:
        g = todo.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    todo.append(a.g)
                todo.extend(a.graphs)


def _check_external_data(proto: onnx.ModelProto, p: Path) -> None:
    """Every external tensor's file exists inside the model's directory and holds offset + length
    bytes (length defaults to what the tensor's dtype and dims need): name the file and the tensor."""
    for g in _graphs(proto.graph):
        for t in (*g.initializer, *(s.values for s in g.sparse_initializer)):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            where = f"{p}: tensor '{t.name}' external data '{loc}'"
            target = p.parent / loc
            if not loc or os.path.isabs(loc) or os.path.normpath(loc).split(os.sep)[0] == "..":
                raise ModelLoadError(f"{where}: the location must be a file name relative to the model's directory")
            if not target.is_file():
                raise ModelLoadError(f"{where}: no such file beside the model")
            try:
                offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            except ValueError:
                raise ModelLoadError(f"{where}: offset/length are not integers") from None
            if length < 0:
                length = _tensor_nbytes(t)
            _check_range(where, target, offset, length)


def _check_range(where: str, target: Path, offset: int, length: int | None) -> None:
    """Refuse external data whose file is missing or shorter than ``offset + length`` bytes."""
    try:
        size = target.stat().st_size
    except OSError:
        raise ModelLoadError(f"{where}: no such file beside the model") from None
    if offset < 0 or (length is not None and offset + length > size):
        raise ModelLoadError(f"{where}: needs bytes {offset}..{offset + (length or 0)} but the file "
                             f"has {size} (truncated or wrong offset/length)")


def check_external_tensors(model: ir.Model) -> None:
    """Every external weight of an in-memory model (built or loaded by other means than :func:`load`,
    or whose files changed since) can still be read: its file exists and holds the tensor's bytes.
    Raises :class:`ModelLoadError` naming the file and the tensor (reading a short file would fail later
    inside a pass, naming neither)."""
    for g in (model.graph, *model.graph.subgraphs()):
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                where = f"tensor '{v.name}' external data '{t.path}'"
                _check_range(where, Path(t.path), int(t.offset or 0), t.length if t.length is not None else t.nbytes)


def _invalid_utf8(msg, where: str) -> str | None:
    """The first string field (names, op types, attributes' strings excluded) that protobuf could
    only read as bytes: onnx_ir cannot write such a model back."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for field, value in msg.ListFields():
        repeated = field.is_repeated
        if field.type == F.TYPE_STRING:
            for i, v in enumerate(value if repeated else [value]):
                if isinstance(v, bytes):
                    return f"{where}.{field.name}" + (f"[{i}]" if repeated else "")
        elif field.type == F.TYPE_MESSAGE:
            for i, v in enumerate(value if repeated else [value]):
                found = _invalid_utf8(v, f"{where}.{field.name}" + (f"[{i}]" if repeated else ""))
                if found:
                    return found
    return None


def _tensor_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes a fixed-size tensor holds (None for strings and unknown dtypes)."""
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    if np_dtype.kind in "OUS":
        return None
    count = 1
    for d in t.dims:
        count *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    return (count * bits + 7) // 8 if bits else count * np_dtype.itemsize


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node '{node.name or f'#{index}'}' ({node.op_type})"


def _order_problem(graph: onnx.GraphProto) -> str | None:
    """Name the node behind a use-before-definition in the main graph: a value nothing defines
    (dangling value, missing initializer), a cycle, or merely an unsorted graph; None when sorted."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if not name or name in defined:
                continue
            if name not in producer:
                return (f"{_node_label(node, i)}: input '{name}' is never defined "
                        "(no graph input, initializer or node output has that name)")
            cycle = _cycle_nodes(graph, defined_outside=defined - set(producer))
            if cycle:
                names = " -> ".join(_node_label(graph.node[j], j) for j in cycle[:6])
                return f"graph has a cycle through {names}" + (" ..." if len(cycle) > 6 else "")
            j = producer[name]
            return (f"{_node_label(node, i)} uses '{name}' before {_node_label(graph.node[j], j)} "
                    "produces it (nodes are not topologically sorted)")
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            return f"graph output '{out.name}' is never defined (no graph input, initializer or node output)"
    return None


def _cycle_nodes(graph: onnx.GraphProto, defined_outside: set[str]) -> list[int]:
    """Indices of the nodes Kahn's algorithm cannot schedule (those on or behind a cycle)."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    deps = [{producer[x] for x in n.input if x in producer and x not in defined_outside} for n in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    while ready:
        j = ready.pop()
        for i in users.get(j, ()):
            remaining[i] -= 1
            if remaining[i] == 0:
                ready.append(i)
    return [i for i, r in enumerate(remaining) if r > 0]


def _one_line(e: BaseException) -> str:
    text = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
    return text or type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def weight_bytes(model: ir.Model) -> int:
    """Total bytes of the initializers of the main graph and its subgraphs."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for v in graph.initializers.values():
            if v.const_value is not None:
                total += v.const_value.nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in (model.graph, *model.graph.subgraphs())
        for v in g.initializers.values()
    )


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: str | None = None,
    size_threshold_bytes: int = 1024,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data`` is the file name (beside ``path``) for weights; it is chosen automatically
    (``<name>.data``) when the model already has external tensors or its weights pass 2 GB.
    Returns the path written.
    """
    out = Path(path)
    if out.exists() and out.is_dir():
        raise ModelLoadError(f"{out}: is a directory, expected a file path for the model")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise ModelLoadError(f"{out}: directory {parent} does not exist")
    if external_data is None and (has_external_data(model) or weight_bytes(model) > _PROTO_LIMIT):
        external_data = out.name + ".data"
    if external_data is not None:
        target = (parent / external_data).resolve()
        if target in _external_data_files(model):
            raise ModelLoadError(
                f"{out}: external data {external_data} is the file the model's weights are read from; "
                "choose another output name"
            )
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=parent))
    except OSError as e:
        raise GraphoptError(f"{out}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        tmp_model = tmpdir / out.name
        if external_data is not None:
            ir.save(model, tmp_model, external_data=external_data, size_threshold_bytes=size_threshold_bytes)
            data_tmp = tmpdir / external_data
            if data_tmp.exists():
                os.replace(data_tmp, parent / external_data)
        else:
            ir.save(model, tmp_model)
        os.replace(tmp_model, out)
    except OSError as e:  # disk full, permissions: the user's to fix; nothing half-written is left
        raise GraphoptError(f"{out}: cannot write the model: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _external_data_files(model: ir.Model) -> set[Path]:
    files = set()
    for g in (model.graph, *model.graph.subgraphs()):
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                files.add(Path(v.const_value.path).resolve())
    return files



def read_json_object(path: str | os.PathLike, option: str, expected: str) -> dict:
    """The JSON object in the file ``path`` that ``option`` names; a UsageError naming both when the file
    cannot be read, is not JSON, or is not an object (``expected``: what the object should hold)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{option} {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{option} {path}: expected {expected}")
    return data


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while the block runs, so that
    processes filling the same cache wait for each other. Without POSIX locks (not Linux or macOS) it
    does nothing: writers there rely on temp file + rename alone."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through ``write(f)`` into a temp file in the same directory, then rename it over
    ``path``, with the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes it private
    to the user). On any error or interrupt the temp file is removed and ``path`` is left as it was."""
    out = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=out.parent if str(out.parent) else ".")
    except OSError as e:
        raise GraphoptError(f"{out}: cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    except OSError as e:  # disk full, permissions, a directory in the way: the user's to fix
        raise GraphoptError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())

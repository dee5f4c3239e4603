"""The bundle's weights file: ``params.npz`` written so that the loader can memory-map every array.

The file is an ordinary uncompressed ``.npz`` (``numpy.load`` reads it), with two properties the
loader relies on (``loader.map_params``):

* every member is stored (no compression), so an array's bytes lie in the file as they lie in memory;
* every array's data starts at a multiple of ``ALIGN`` (64) bytes from the file's start: a padding
  record in the zip entry's extra field (as Android's zipalign does) moves the member's start so that
  the ``.npy`` header (numpy pads it to 64 bytes) ends on the boundary. A memory map starts on a page,
  so the mapped array is 64-byte aligned, which TVM requires of a tensor it takes without copying.

Arrays are written tensor by tensor in slices of ``CHUNK`` bytes from the array's own buffer (a
memory-mapped source weight is read, never copied whole); only an array that is not contiguous is
copied, one tensor at a time.

``map_external_params`` gives the compiler's weights the same form before that: a weight read
unchanged from the model's external data becomes a copy-on-write map of that file, which TVM can
take without a copy when the compiled module runs in the compiling process.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile

import numpy as np
import onnx_ir as ir

ALIGN = 64
CHUNK = 16 << 20
PAD_EXTRA_ID = 0xD935  # the extra-field id zipalign uses for padding
_LOCAL_HEADER = 30  # fixed part of a zip local file header
_ZIP64_EXTRA = 20  # the zip64 record every entry carries (written with force_zip64)


def npy_header(arr: np.ndarray) -> bytes:
    """The ``.npy`` header ``numpy.save`` writes for ``arr`` (magic, version, dict, padding to 64 bytes)."""
    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # a header over 64 KiB (a huge structured dtype) needs format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _padding(offset: int, name: bytes, header: bytes) -> bytes:
    """The extra field that puts the data of an entry whose local header starts at ``offset`` on ``ALIGN``."""
    fixed = offset + _LOCAL_HEADER + len(name) + 4 + _ZIP64_EXTRA + len(header)
    pad = -fixed % ALIGN
    return struct.pack("<HH", PAD_EXTRA_ID, pad) + b"\0" * pad


def _chunks(arr: np.ndarray):
    """The array's bytes in C order, ``CHUNK`` at a time, without copying a contiguous array."""
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:
        arr = arr.T  # the header says fortran_order: the bytes are the transpose's C order
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # one tensor's copy, freed before the next
    flat = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
    for start in range(0, len(flat), CHUNK):
        yield flat[start:start + CHUNK]


def write_params(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (key -> array) to ``path`` as an aligned, uncompressed ``.npz``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype.hasobject:
                raise ValueError(f"weight {key!r} has dtype {arr.dtype}, which a bundle cannot hold")
            header = npy_header(arr)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = len(header) + arr.nbytes
            info.external_attr = 0o644 << 16
            info.extra = _padding(zf.fp.tell(), info.filename.encode(), header)
            with zf.open(info, "w", force_zip64=True) as out:
                out.write(header)
                for chunk in _chunks(arr):
                    out.write(chunk)


def _external_tensors(model: ir.Model):
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def map_external_params(model: ir.Model, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` with each array that is an external tensor's data as onnx_ir read it (a read-only map,
    which TVM cannot take without a copy) replaced by a copy-on-write map of the same file bytes.

    The read-only maps' pages are then dropped from this process (``MADV_DONTNEED``: they are clean
    file pages, read again on use), so writing and running the weights touches one mapping, not two.
    """
    sources = {}
    for tensor in _external_tensors(model):
        if tensor.dtype.bitwidth % 8 or not tensor.nbytes:
            continue
        try:
            arr = tensor.numpy()  # maps the file if not yet mapped (no page is read)
        except Exception:  # noqa: BLE001 - an unreadable file: that weight keeps its array
            continue
        sources[(arr.ctypes.data, arr.nbytes)] = tensor
    out, mapped = {}, []
    for name, arr in params.items():
        tensor = sources.get((arr.ctypes.data, arr.nbytes)) if isinstance(arr, np.ndarray) else None
        if tensor is None or not arr.flags.c_contiguous or arr.flags.writeable:
            out[name] = arr
            continue
        out[name] = np.memmap(tensor.path, dtype=arr.dtype, mode="c", offset=int(tensor.offset or 0), shape=arr.shape)
        mapped.append(tensor)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)  # Linux and macOS
    for tensor in mapped:
        raw = getattr(tensor, "raw", None)
        if dontneed is not None and isinstance(raw, mmap.mmap) and not raw.closed:
            raw.madvise(dontneed)
    return out

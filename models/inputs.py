"""Inputs for real models: the light models' reference data, and realistic random inputs.

``random_inputs`` picks values by what an input usually carries: images in [-1, 1), audio in
[-0.5, 0.5), recurrent state small and centred, a sample rate of 16000, attention masks of ones,
token_type_ids zero, other integer ids small and non-negative. A catalogued model (named, or its
cached file, as ``graphopt bench`` passes it) uses its entry's ``values`` first: token ids within
its vocabulary, audio in [-1, 1], a branch flag. Dynamic dims take the given (or the catalogue's
default) shape, else 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import ShapeError


def _parse_shapes(specs: Sequence[str] | Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return {k: [int(d) for d in v] for k, v in specs.items()}
    out: dict[str, list[int]] = {}
    for s in specs:
        name, sep, dims = s.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise ShapeError(f"--input-shape {s!r}: expected NAME:D0,D1,... with integer dims") from None
    return out


def _graph_inputs(model) -> list[tuple[str, np.dtype, list[int | None]]]:
    """(name, numpy dtype, dims with None for dynamic) of the model's real inputs."""
    if isinstance(model, ir.Model):
        rows = []
        for v in model.graph.inputs:
            if v.const_value is not None or v.name in model.graph.initializers:
                continue
            dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
            dims = [] if v.shape is None else [d if isinstance(d, int) else None for d in v.shape]
            rows.append((v.name, dtype, dims))
        return rows
    proto: onnx.ModelProto = model
    inits = {t.name for t in proto.graph.initializer}
    rows = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        rows.append((vi.name, dtype, dims))
    return rows


def _hinted(kind: str, dtype: np.dtype, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """A value of a catalogue ``values`` kind (see ``ModelEntry.values``)."""
    if kind.startswith("ids:"):
        return rng.integers(0, int(kind[4:]), size=shape).astype(dtype)
    if kind in ("ones", "true"):
        return np.ones(shape, dtype=dtype)
    if kind in ("zeros", "false"):
        return np.zeros(shape, dtype=dtype)
    if kind == "audio":
        return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    raise ValueError(f"unknown input kind {kind!r}")


def _value(name: str, dtype: np.dtype, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    lname = name.lower().rsplit("/", 1)[-1]
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        if lname == "sr" and not shape:
            return np.array(16000, dtype=dtype)
        if lname.endswith("attention_mask"):
            return np.ones(shape, dtype=dtype)
        if lname == "token_type_ids":
            return np.zeros(shape, dtype=dtype)
        return rng.integers(0, 8, size=shape).astype(dtype)
    if not np.issubdtype(dtype, np.floating):
        return np.zeros(shape, dtype=dtype)
    if len(shape) == 4 and shape[1] in (1, 3):  # NCHW image, normalized
        x = rng.uniform(-1.0, 1.0, size=shape)
    elif lname in ("state", "h", "c", "h0", "c0") or "state" in lname or "hidden" in lname:
        x = 0.1 * rng.standard_normal(size=shape)
    elif lname in ("input", "audio", "wav", "waveform", "speech"):
        x = rng.uniform(-0.5, 0.5, size=shape)
    else:
        x = rng.standard_normal(size=shape)
    return x.astype(dtype)


def random_inputs(
    model,
    seed: int = 0,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Realistic random inputs for ``model`` (``ir.Model``, ``onnx.ModelProto``, a path or a spec).

    Dynamic dims come from ``input_shapes`` ("name:d0,d1,..."), else from the catalogue's default
    shapes when ``model`` is a spec such as ``rapidocr:rec``, else 1.
    """
    from graphopt.models import CATALOG, GENERATED, resolve

    hints: dict[str, str] = {}
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        entry = CATALOG.get(spec) or GENERATED.get(spec) or _entry_of_cached_file(Path(spec))
        if entry is not None:
            hints = dict(entry.values)
            if input_shapes is None:
                input_shapes = list(entry.input_shapes)
        path = resolve(spec) if spec in CATALOG or spec in GENERATED else Path(spec)
        model = onnx.load(str(path), load_external_data=False)
    fixed = _parse_shapes(input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, dims in _graph_inputs(model):
        shape = list(fixed.get(name, [1 if d is None else d for d in dims]))
        kind = hints.get(name)
        feeds[name] = _hinted(kind, dtype, shape, rng) if kind else _value(name, dtype, shape, rng)
    return feeds


def _entry_of_cached_file(path: Path):
    """The catalogue entry whose cached file ``path`` is (a model in graphopt's cache), else None."""
    from graphopt.models import CATALOG, GENERATED, cache_dir
    from graphopt.models.ort_format import converted_name

    try:
        if path.parent.resolve() == (cache_dir() / "generated").resolve():
            return next((e for e in GENERATED.values() if e.file_name == path.name), None)
        if path.parent.resolve() != cache_dir().resolve():
            return None
    except OSError:
        return None
    for entry in CATALOG.values():
        if entry.package is None:
            continue
        names = {entry.file_name}
        if entry.file_name.endswith(".ort"):
            names.add(converted_name(entry.file_name, entry.sha256))
        if path.name in names:
            return entry
    return None


def light_reference_data(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inputs and expected outputs onnx's backend test uses for a light model.

    Inputs are ``arange(n) / n`` in each input's shape (onnx's ``generate_dummy_data``); outputs are
    the ``light_<name>_output_<i>.pb`` files beside the model.
    """
    proto = onnx.load(str(path), load_external_data=False)
    inputs = {}
    for name, dtype, dims in _graph_inputs(proto):
        shape = [1 if d is None else d for d in dims]
        n = int(np.prod(shape))
        inputs[name] = (np.arange(n).reshape(shape) / n).astype(dtype)
    outputs = {}
    prefix = str(path)[: -len(".onnx")]
    for i, vi in enumerate(proto.graph.output):
        pb = Path(f"{prefix}_output_{i}.pb")
        tensor = onnx.TensorProto()
        tensor.ParseFromString(pb.read_bytes())
        outputs[vi.name] = onnx.numpy_helper.to_array(tensor)
    return inputs, outputs

"""What every metric shares: the ``Metric`` type, the model's image input, batching, progress, ORT runs.

A metric is called with ``run(feeds) -> {output name: array}``, the model under test, and returns a
score in [0, 1], higher is better. ``measure(run)`` returns the score with its details.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, ModelLoadError, ShapeError
from graphopt.core.progress import wrap

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Metric:
    """A score of a model under test, in [0, 1] (higher is better). ``metric(run) -> float``."""

    name = "metric"

    def __call__(self, run: Run) -> float:
        return float(self.measure(run)["score"])

    def measure(self, run: Run, *, progress: bool = False) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


def model_path(model: str | os.PathLike) -> Path:
    """A file path or a catalogue name (``rapidocr:rec``) as an existing file, else a GraphoptError."""
    from graphopt.models import model_path as resolve_model_path

    path = resolve_model_path(model)
    if not path.is_file():
        raise ModelLoadError(f"{model}: no such model file")
    return path


def load_proto(model: str | os.PathLike):
    import onnx

    path = model_path(model)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def image_input(proto, input_shapes: Sequence[str] | None, default_hw: tuple[int, int],
                metric: str) -> tuple[str, list[int]]:
    """(name, [N, 3, H, W]) of the model's one image input: ``input_shapes`` first, then the model's
    static dims, then ``default_hw`` and batch 1. Anything else is a ShapeError naming the metric."""
    from graphopt.core.shapes import parse_fixed_input_shapes

    inits = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise ShapeError(f"metric {metric}: needs a model with one image input, this one has "
                         f"{len(inputs)} ({', '.join(vi.name for vi in inputs)})")
    vi = inputs[0]
    fixed = parse_fixed_input_shapes(list(input_shapes or []), purpose="graphopt evaluate")
    unknown = sorted(set(fixed) - {vi.name})
    if unknown:
        raise ShapeError(f"--input-shape {unknown[0]}: the model has no input of that name (it has {vi.name})")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]
    shape = list(fixed.get(vi.name, dims))
    if len(shape) != 4:
        raise ShapeError(f"metric {metric}: input {vi.name} has rank {len(shape)}, expected an NCHW image")
    defaults = [1, 3, *default_hw]
    shape = [defaults[i] if d is None else int(d) for i, d in enumerate(shape)]
    if shape[1] != 3 or min(shape) < 1:
        raise ShapeError(f"metric {metric}: input {vi.name} has shape {shape}, expected [N, 3, H, W]")
    return vi.name, shape


def batches(samples: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch array, number of real samples in it); the last batch is padded by repeating its last sample."""
    for start in range(0, len(samples), batch):
        part = samples[start:start + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - n, axis=0)])
        yield np.ascontiguousarray(part), n


def first_output(outputs: dict[str, np.ndarray], metric: str) -> np.ndarray:
    if not outputs:
        raise GraphoptError(f"metric {metric}: the model under test returned no outputs")
    return np.asarray(next(iter(outputs.values())))


def with_progress(items: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """``items`` behind a bar on a terminal (``graphopt.core.progress``)."""
    return wrap(items, total=total, desc=desc, unit="batch", enabled=enabled)


def ort_runner(model: str | os.PathLike) -> Run:
    """``run(feeds) -> {output name: array}`` over ONNX Runtime on the CPU; its failures are GraphoptErrors."""
    import onnxruntime as ort

    path = model_path(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its failures are reported as one GraphoptError line, not its log
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT reports bad models as several exception types
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({_line(e)})") from None
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = sess.run(names, feeds)
        except Exception as e:  # noqa: BLE001
            shapes = ", ".join(f"{k}:{list(v.shape)}" for k, v in feeds.items())
            raise GraphoptError(f"{path}: ONNX Runtime failed on inputs {shapes} ({_line(e)})") from None
        return dict(zip(names, values))

    return run


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__

"""Output cosine against a reference model on the same real inputs.

Inputs, in order of preference: a .npz of real inputs (one array per input with a leading sample axis,
the calibration format), else rendered text: lines as PP-OCR's recognizer takes them for a model carrying
a ``character`` dictionary, pages normalized with ImageNet's mean and std for any other [N, 3, H, W]
image model. A model with other inputs needs the .npz. Score: the mean over samples and outputs of
``cos(output, reference output)`` on the flattened values, negative values counted as 0 (and rounding above 1 as 1).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, ShapeError, UsageError
from graphopt.compression.evaluate.base import Metric, Run, image_input, load_proto, ort_runner, with_progress

DEFAULT_SAMPLES = 16


def read_samples(path: str | os.PathLike, proto) -> list[dict[str, np.ndarray]]:
    """Feeds from a .npz with one array per model input, samples along axis 0."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"--data {path}: not a readable .npz file ({e})") from None
    inits = {t.name for t in proto.graph.initializer}
    names = [vi.name for vi in proto.graph.input if vi.name not in inits]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"--data {path}: no array for input {missing[0]} (it has {', '.join(arrays) or 'none'})")
    counts = {len(arrays[n]) if arrays[n].ndim else 0 for n in names}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(f"--data {path}: inputs {', '.join(names)} need the same number (>= 1) of samples "
                         "along axis 0")
    return [{n: np.ascontiguousarray(arrays[n][i]) for n in names} for i in range(counts.pop())]


def rendered_samples(proto, count: int, seed: int, input_shapes: Sequence[str] | None) -> list[dict[str, np.ndarray]]:
    """Rendered lines (a model with a ``character`` dictionary) or pages (any other image model)."""
    from graphopt.compression.evaluate import ocr_det, ocr_rec

    is_rec = any(p.key == "character" for p in proto.metadata_props)
    try:
        name, shape = image_input(proto, input_shapes, ocr_rec.DEFAULT_HW if is_rec else ocr_det.DEFAULT_HW,
                                  "cosine")
    except ShapeError as e:
        if str(e).startswith("--input-shape"):
            raise
        raise UsageError(f"{e}; give its real inputs with --data FILE.npz") from None
    n, _, h, w = shape
    if is_rec:
        charset = set(ocr_rec.character_list(proto))
        _, arrays = ocr_rec.line_samples(count * n, seed, charset, h, w)
    else:
        _, arrays = ocr_det.page_samples(count * n, seed, h, w)
    return [{name: arrays[i * n:(i + 1) * n]} for i in range(count)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays' flattened values; both zero agree (1.0), one zero does not (0.0)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        return 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


class CosineMetric(Metric):
    """Mean output cosine of the model under test against ``reference`` on the same inputs."""

    name = "cosine"

    def __init__(self, model: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                 samples: int | None = None, input_shapes: Sequence[str] | None = None,
                 data: str | os.PathLike | None = None, seed: int = 0) -> None:
        if reference is None:
            raise UsageError("metric cosine: needs a reference model (--reference ORIGINAL.onnx)")
        proto = load_proto(model)
        count = DEFAULT_SAMPLES if samples is None else int(samples)
        if count < 1:
            raise UsageError(f"metric cosine: --samples must be at least 1, got {count}")
        if data is not None:
            self.feeds = read_samples(data, proto)[:count]
        else:
            self.feeds = rendered_samples(proto, count, seed, input_shapes)
        self.reference = reference
        self._reference_run = ort_runner(reference)
        self._expected: list[dict[str, np.ndarray]] | None = None

    def measure(self, run: Run, *, progress: bool = False) -> dict[str, Any]:
        if self._expected is None:
            self._expected = [self._reference_run(f) for f in self.feeds]
        per_sample = []
        for feeds, expected in with_progress(zip(self.feeds, self._expected), total=len(self.feeds),
                                             desc=self.name, enabled=progress):
            got = run(feeds)
            if len(got) != len(expected):
                raise GraphoptError(f"metric cosine: the model under test has {len(got)} outputs, the "
                                    f"reference {self.reference} has {len(expected)}")
            pairs = zip(expected.values(), (got[k] for k in expected)) if set(got) == set(expected) \
                else zip(expected.values(), got.values())
            per_sample.append([min(1.0, max(0.0, cosine(b, a))) for b, a in pairs])
        values = np.asarray(per_sample, dtype=np.float64)
        return {"score": float(values.mean()), "samples": len(per_sample), "min": float(values.min()),
                "per_output": dict(zip(self._expected[0], values.mean(axis=0).tolist())),
                "per_sample": [float(v) for v in values.mean(axis=1)]}

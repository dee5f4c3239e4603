"""Evaluation with real labels: scores in [0, 1] (higher is better) that tests and accuracy budgets use.

    >>> from graphopt import evaluate
    >>> metric = evaluate.resolve_metric("ocr-rec", "rapidocr:rec")
    >>> metric(run)                       # run(feeds) -> {output name: array}: the model under test
    0.9987
    >>> evaluate.evaluate("q.onnx", "ocr-det", reference_path="rapidocr:det")["score"]
    >>> evaluate.write_calibration("ocr-rec", "calib.npz", 32, seed=0, input_shape="x:1,3,48,320")

Metrics (``METRICS``): ``ocr-rec`` (character accuracy of a PP-OCR recognizer on rendered text lines),
``ocr-det`` (box F1 of a DB text detector on rendered pages, against the known boxes, or against a
reference model's boxes when one is given), ``cosine`` (mean output cosine against a reference model on
the same real inputs), and a user's ``module:function`` (or ``file.py:function``, or a callable), called
as ``function(run)``. Text is drawn with Pillow and the DejaVu fonts; nothing is downloaded. Evaluation
sets and calibration sets come from separate random streams (``render.EVALUATION``/``CALIBRATION``).
"""

from __future__ import annotations

import importlib
import io as _io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphopt.core.errors import UsageError
from graphopt.compression.evaluate.base import Metric, Run, image_input, load_proto, ort_runner

__all__ = ["CALIBRATION_KINDS", "METRICS", "Metric", "evaluate", "resolve_metric", "write_calibration"]

# name -> (module, class, what it measures)
METRICS: dict[str, tuple[str, str, str]] = {
    "ocr-rec": ("graphopt.compression.evaluate.ocr_rec", "RecMetric",
                "character accuracy of a PP-OCR recognizer on rendered text lines (exact lines beside it)"),
    "ocr-det": ("graphopt.compression.evaluate.ocr_det", "DetMetric",
                "box F1 at IoU 0.5 of a DB text detector on rendered pages (against --reference's boxes if given)"),
    "cosine": ("graphopt.compression.evaluate.cosine", "CosineMetric",
               "mean output cosine against --reference on the same real inputs"),
}

# calibration kind -> module with DEFAULT_HW and sample_arrays(count, seed, height, width, *, purpose, proto)
CALIBRATION_KINDS: dict[str, str] = {
    "ocr-rec": "graphopt.compression.evaluate.ocr_rec",
    "ocr-det": "graphopt.compression.evaluate.ocr_det",
}


def _known() -> str:
    return ", ".join([*METRICS, "MODULE:FUNCTION"])


def resolve_metric(name_or_callable: str | Callable[[Run], float] | Metric, model_path: str | os.PathLike, *,
                   reference_path: str | os.PathLike | None = None, samples: int | None = None,
                   input_shapes: Sequence[str] | None = None, data: str | os.PathLike | None = None,
                   seed: int = 0) -> Metric:
    """The metric named ``name_or_callable`` for ``model_path`` (a file or a catalogue name).

    ``reference_path``: the original model (cosine needs it; ocr-det then scores against its boxes;
    ocr-rec reports its score beside). ``samples``: lines, pages or inputs to use. ``input_shapes``:
    ``["x:1,3,48,320"]`` fixes batch and image size. ``data``: a .npz of real inputs for cosine.
    """
    if isinstance(name_or_callable, Metric):
        return name_or_callable
    from graphopt.compression.evaluate.custom import CustomMetric, load_function

    if callable(name_or_callable):
        return CustomMetric(name_or_callable)
    name = str(name_or_callable)
    if name in METRICS:
        module, cls, _ = METRICS[name]
        kwargs: dict[str, Any] = {"reference": reference_path, "samples": samples, "input_shapes": input_shapes,
                                  "seed": seed}
        if data is not None:
            if name != "cosine":
                raise UsageError(f"--data: only the cosine metric reads inputs from a file, not {name}")
            kwargs["data"] = data
        return getattr(importlib.import_module(module), cls)(model_path, **kwargs)
    if ":" in name:
        return CustomMetric(load_function(name), name)
    raise UsageError(f"--metric {name}: unknown metric (known: {_known()})")


def evaluate(model_path: str | os.PathLike, metric: str | Callable[[Run], float] | Metric, *,
             reference_path: str | os.PathLike | None = None, samples: int | None = None,
             input_shapes: Sequence[str] | None = None, data: str | os.PathLike | None = None,
             seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Run ``model_path`` in ONNX Runtime under ``metric``: ``{"model", "metric", "score", ...details}``
    (ocr-rec: ``exact`` lines and ``per_sample`` texts; ocr-det: matched/predicted/expected boxes)."""
    m = resolve_metric(metric, model_path, reference_path=reference_path, samples=samples,
                       input_shapes=input_shapes, data=data, seed=seed)
    result = m.measure(ort_runner(model_path), progress=progress)
    return {"model": str(model_path), "metric": m.name, **result}


def write_calibration(kind: str, path: str | os.PathLike, count: int, *, seed: int = 0,
                      input_shape: str | None = None, model: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``count`` rendered samples of ``kind`` (ocr-rec lines, ocr-det pages) to a .npz: one array
    per input, ``[count, *input shape]`` (each sample one full feed). Drawn from the calibration stream,
    never the evaluation set's whatever the seed. ``input_shape`` ("x:1,3,48,320") or ``model`` gives the
    input's name and shape (else the kind's default); ``model`` also gives ocr-rec its dictionary."""
    from graphopt.core import io
    from graphopt.compression.evaluate import render

    if kind not in CALIBRATION_KINDS:
        raise UsageError(f"calibration kind {kind!r}: expected one of {', '.join(CALIBRATION_KINDS)}")
    if int(count) < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    module = importlib.import_module(CALIBRATION_KINDS[kind])
    proto = load_proto(model) if model is not None else None
    if proto is not None:
        name, shape = image_input(proto, [input_shape] if input_shape else None, module.DEFAULT_HW, kind)
    else:
        from graphopt.core.shapes import parse_fixed_input_shapes

        h, w = module.DEFAULT_HW
        ((name, shape),) = parse_fixed_input_shapes([input_shape or f"x:1,3,{h},{w}"],
                                                    purpose="graphopt evaluate").items()
        if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
            raise UsageError(f"--input-shape {input_shape}: {kind} calibration needs [N, 3, H, W]")
    n, _, h, w = shape
    arrays = module.sample_arrays(count * n, seed, h, w, purpose=render.CALIBRATION, proto=proto)
    arrays = arrays.reshape(count, n, 3, h, w)
    buf = _io.BytesIO()
    np.savez(buf, **{name: arrays})
    io.atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "input": name, "shape": list(arrays.shape), "kind": kind, "seed": seed}


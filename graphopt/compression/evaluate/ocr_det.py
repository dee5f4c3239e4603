"""Text detection (PP-OCR det, DB) on rendered pages: box F1 at IoU >= 0.5.

Pages are rendered at the input's H x W (so boxes need no rescaling) and preprocessed as PP-OCR does:
BGR channel order, ``(x/255 - mean) / std`` with ImageNet's mean and std in that order, CHW.
DB post-processing as PaddleOCR's ``DBPostProcess`` (fast score mode) with axis-aligned boxes:
the probability map thresholded at 0.3, 8-connected components, a component's box kept when the mean
probability inside it is >= 0.6 and its short side >= 3 px, then grown by the DB unclip distance
``area * 1.5 / perimeter`` on every side.

Score: F1 of the predicted boxes against the pages' known line boxes; with a reference model, F1
against the reference model's boxes on the same pages (the known-box F1 is reported beside it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.compression.evaluate import render
from graphopt.compression.evaluate.base import (
    Metric,
    Run,
    batches,
    first_output,
    image_input,
    load_proto,
    ort_runner,
    with_progress,
)

DEFAULT_HW = (640, 640)
DEFAULT_SAMPLES = 20
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
THRESH, BOX_THRESH, UNCLIP_RATIO, MIN_SIZE = 0.3, 0.6, 1.5, 3
IOU = 0.5


def preprocess_page(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 page [H, W, 3] -> float32 [3, H, W] as PP-OCR's detector expects it."""
    bgr = image[:, :, ::-1].astype(np.float32) / 255.0
    return ((bgr - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def _label_scipy(mask: np.ndarray) -> np.ndarray | None:
    try:
        from scipy import ndimage
    except ImportError:
        return None
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))[0]


def label_numpy(mask: np.ndarray) -> np.ndarray:
    """8-connected components without scipy: each pixel takes its neighbourhood's smallest label, then
    jumps to its label's own label, until nothing changes. Labels are positive, not consecutive."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        low = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(low, padded[dy:dy + h, dx:dx + w], out=low)
        low = np.where(mask, low, big)
        flat = low.ravel()
        on = flat < big
        flat[on] = np.minimum(flat[on], flat[flat[on] - 1])  # pointer jump: a label names a pixel
        if np.array_equal(low, labels):
            return np.where(mask, labels, 0)
        labels = low


def components(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes [n, 4] (x0, y0, x1, y1; x1/y1 exclusive) of the 8-connected components of ``mask``."""
    labels = _label_scipy(mask)
    if labels is None:
        labels = label_numpy(mask)
    ys, xs = np.nonzero(labels)
    if len(ys) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    ids, lab = np.unique(labels[ys, xs], return_inverse=True)
    boxes = np.empty((len(ids), 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], lab, xs)
    np.minimum.at(boxes[:, 1], lab, ys)
    np.maximum.at(boxes[:, 2], lab, xs + 1)
    np.maximum.at(boxes[:, 3], lab, ys + 1)
    return boxes.astype(np.float32)


def db_boxes(prob: np.ndarray, *, thresh: float = THRESH, box_thresh: float = BOX_THRESH,
             unclip_ratio: float = UNCLIP_RATIO, min_size: int = MIN_SIZE) -> np.ndarray:
    """DB post-processing of one probability map [H, W] -> boxes [n, 4] (x0, y0, x1, y1), in pixels."""
    prob = np.asarray(prob, dtype=np.float32)
    h, w = prob.shape
    out = []
    for x0, y0, x1, y1 in components(prob > thresh):
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < min_size:
            continue
        if float(prob[int(y0):int(y1), int(x0):int(x1)].mean()) < box_thresh:
            continue
        d = bw * bh * unclip_ratio / (2.0 * (bw + bh))
        if min(bw, bh) + 2 * d < min_size + 2:
            continue
        out.append((max(0.0, x0 - d), max(0.0, y0 - d), min(float(w), x1 + d), min(float(h), y1 + d)))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(pred: np.ndarray, truth: np.ndarray, iou: float = IOU) -> int:
    """Boxes of ``pred`` matched one to one with ``truth`` at IoU >= ``iou`` (greedy, best IoU first)."""
    m = iou_matrix(pred, truth)
    hits = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(int(m.argmax()), m.shape)
        hits += 1
        m[i, :] = -1
        m[:, j] = -1
    return hits


def f1(hits: int, n_pred: int, n_truth: int) -> float:
    """F1 from matches; two empty sets agree perfectly (1.0)."""
    if n_pred == 0 and n_truth == 0:
        return 1.0
    return 2.0 * hits / (n_pred + n_truth)


def page_samples(count: int, seed: int, height: int, width: int,
                 purpose: int = render.EVALUATION) -> tuple[list[render.Page], np.ndarray]:
    """``count`` rendered pages and their preprocessed arrays [count, 3, height, width]; page i depends
    only on (purpose, seed, i)."""
    pages = [render.render_page(render.rng_for(purpose, seed, i), height, width) for i in range(count)]
    return pages, np.stack([preprocess_page(p.image) for p in pages])


def sample_arrays(count: int, seed: int, height: int, width: int, *, purpose: int, proto=None) -> np.ndarray:
    """Preprocessed pages only (calibration data)."""
    return page_samples(count, seed, height, width, purpose)[1]


class DetMetric(Metric):
    """Box F1 of a DB text detector on ``samples`` rendered pages, against the known line boxes or,
    with ``reference``, against the reference model's boxes."""

    name = "ocr-det"

    def __init__(self, model: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                 samples: int | None = None, input_shapes: Sequence[str] | None = None, seed: int = 0) -> None:
        self.input_name, self.shape = image_input(load_proto(model), input_shapes, DEFAULT_HW, self.name)
        self.count = DEFAULT_SAMPLES if samples is None else int(samples)
        if self.count < 1:
            raise GraphoptError(f"metric {self.name}: --samples must be at least 1, got {self.count}")
        self.seed = seed
        self.reference = reference
        # the reference model in ONNX Runtime; its boxes are computed once, also when it is measured itself
        self.reference_run = ort_runner(reference) if reference is not None else None
        self._data: tuple[list[render.Page], np.ndarray] | None = None
        self._reference_boxes: list[np.ndarray] | None = None

    def samples(self) -> tuple[list[render.Page], np.ndarray]:
        if self._data is None:
            _, _, h, w = self.shape
            self._data = page_samples(self.count, self.seed, h, w)
        return self._data

    def boxes(self, run: Run, *, progress: bool = False) -> list[np.ndarray]:
        """The detected boxes of every page, by ``run``."""
        _, arrays = self.samples()
        batch = self.shape[0]
        out: list[np.ndarray] = []
        for x, n in with_progress(batches(arrays, batch), total=-(-len(arrays) // batch), desc=self.name,
                                  enabled=progress):
            maps = first_output(run({self.input_name: x}), self.name)
            if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape[0] != len(x):
                raise GraphoptError(f"metric {self.name}: detector output has shape {list(maps.shape)}, "
                                    f"expected [{len(x)}, 1, H, W] (a DB probability map)")
            out += [db_boxes(m[0]) for m in maps[:n]]
        return out

    def measure(self, run: Run, *, progress: bool = False) -> dict[str, Any]:
        pages, _ = self.samples()
        if self.reference_run is not None and self._reference_boxes is None:
            self._reference_boxes = self.boxes(self.reference_run, progress=progress)
        pred = self._reference_boxes if run is self.reference_run else self.boxes(run, progress=progress)
        known = _scores(pred, [p.boxes for p in pages])
        result: dict[str, Any] = {"score": known["f1"], "samples": len(pages), "against": "known boxes",
                                  "known_boxes": known}
        if self.reference_run is not None:
            ref = _scores(pred, self._reference_boxes)
            result.update(score=ref["f1"], against=f"reference {self.reference}", reference_boxes=ref)
        result["per_sample"] = [{"lines": len(p.texts), "detected": len(b), "texts": p.texts}
                                for p, b in zip(pages, pred)]
        return result


def _scores(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict[str, Any]:
    hits = sum(match(p, t) for p, t in zip(pred, truth))
    n_pred, n_truth = sum(len(p) for p in pred), sum(len(t) for t in truth)
    return {"f1": f1(hits, n_pred, n_truth), "matched": hits, "predicted": n_pred, "expected": n_truth,
            "precision": hits / n_pred if n_pred else 1.0, "recall": hits / n_truth if n_truth else 1.0}

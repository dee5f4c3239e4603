"""Text recognition (PP-OCR rec) on rendered text lines: character accuracy and exact-match lines.

The character dictionary comes from the model itself (ONNX metadata key ``character``, one character a
line). As PP-OCR decodes: index 0 is the CTC blank, index i is dictionary character i-1, and the last
index is the space PP-OCR appends. Lines are preprocessed as PP-OCR does: resized to height H keeping
the aspect ratio (never wider than the input), scaled to (x/255 - 0.5) / 0.5, zero-padded on the right
to the input width, BGR channel order.

Predictions are compared without spaces at their ends and with runs of spaces as one (the margin and the
padding around a line decode as spaces). Score: character accuracy summed over all lines, ``1 - sum(edit distance) / sum(reference length)``
(clipped at 0), so long lines weigh more; the per-line mean is reported beside it.
"""

from __future__ import annotations

import math
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

DEFAULT_HW = (48, 320)
DEFAULT_SAMPLES = 60


def character_list(proto) -> list[str]:
    """The model's dictionary: metadata ``character`` split into lines; missing is a GraphoptError."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        name = proto.graph.name or "the model"
        raise GraphoptError(f"metric ocr-rec: {name} has no 'character' metadata (the PP-OCR recognizer's "
                            "dictionary); it is not a PP-OCR recognition model")
    return meta["character"].splitlines()


def decode_table(characters: Sequence[str]) -> list[str]:
    """Index -> character for CTC decoding: blank first, the dictionary, then PP-OCR's space."""
    return ["", *characters, " "]


def ctc_greedy_decode(probs: np.ndarray, table: Sequence[str]) -> list[str]:
    """Greedy CTC over [N, T, C] (or [T, C]) scores: argmax per step, repeats merged, blanks (0) dropped."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    if probs.ndim != 3 or probs.shape[-1] != len(table):
        raise GraphoptError(f"metric ocr-rec: recognizer output has shape {list(probs.shape)}, expected "
                            f"[N, T, {len(table)}] (blank + {len(table) - 2} dictionary characters + space)")
    best = probs.argmax(axis=-1)
    texts = []
    for seq in best:
        keep = np.ones(len(seq), dtype=bool)
        keep[1:] = seq[1:] != seq[:-1]
        texts.append("".join(table[i] for i in seq[keep] if i != 0))
    return texts


def normalize(text: str) -> str:
    """Spaces as compared: none at the ends, runs of them as one (the padding reads as space)."""
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def preprocess_line(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An RGB uint8 line crop -> float32 [3, height, width] as PP-OCR's recognizer expects it."""
    from PIL import Image

    h, w = image.shape[:2]
    new_w = min(width, int(math.ceil(height * w / float(h))))
    resized = np.asarray(Image.fromarray(image).resize((new_w, height), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :new_w] = (resized[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def line_samples(count: int, seed: int, charset, height: int, width: int,
                 purpose: int = render.EVALUATION) -> tuple[list[str], np.ndarray]:
    """``count`` rendered lines (texts, float32 [count, 3, height, width]); sample i depends only on
    (purpose, seed, i). Lines are shortened word by word until they fit ``width`` without squeezing."""
    texts, arrays = [], []
    for i in range(count):
        rng = render.rng_for(purpose, seed, i)
        text = render.text_line(rng, charset)
        st = render.style(rng)
        img = render.render_line(text, st, rng)
        while " " in text and math.ceil(height * img.shape[1] / img.shape[0]) > width:
            text = text.rsplit(" ", 1)[0]
            img = render.render_line(text, st, rng)
        texts.append(text)
        arrays.append(preprocess_line(img, height, width))
    return texts, np.stack(arrays)


def sample_arrays(count: int, seed: int, height: int, width: int, *, purpose: int, proto=None) -> np.ndarray:
    """Preprocessed lines only (calibration data); ``proto`` restricts them to its dictionary."""
    charset = set(character_list(proto)) if proto is not None else None
    return line_samples(count, seed, charset, height, width, purpose)[1]


class RecMetric(Metric):
    """Character accuracy of a PP-OCR recognizer on ``samples`` rendered lines of known text. With a
    ``reference`` model, its score on the same lines is reported beside (the score stays the model's)."""

    name = "ocr-rec"

    def __init__(self, model: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                 samples: int | None = None, input_shapes: Sequence[str] | None = None, seed: int = 0) -> None:
        proto = load_proto(model)
        self.table = decode_table(character_list(proto))
        self.input_name, self.shape = image_input(proto, input_shapes, DEFAULT_HW, self.name)
        self.count = DEFAULT_SAMPLES if samples is None else int(samples)
        if self.count < 1:
            raise GraphoptError(f"metric {self.name}: --samples must be at least 1, got {self.count}")
        self.seed = seed
        self.reference = reference
        self.reference_run = ort_runner(reference) if reference is not None else None
        self._reference_result: dict[str, Any] | None = None
        self._data: tuple[list[str], np.ndarray] | None = None

    def samples(self) -> tuple[list[str], np.ndarray]:
        """(texts, preprocessed lines), rendered once."""
        if self._data is None:
            _, _, h, w = self.shape
            self._data = line_samples(self.count, self.seed, set(self.table[1:-1]), h, w)
        return self._data

    def measure(self, run: Run, *, progress: bool = False) -> dict[str, Any]:
        result = self._measure(run, progress)
        if self.reference_run is not None:
            if self._reference_result is None:
                self._reference_result = self._measure(self.reference_run, False)
            ref = self._reference_result
            result["reference"] = {"model": str(self.reference), "score": ref["score"], "exact": ref["exact"]}
        return result

    def _measure(self, run: Run, progress: bool) -> dict[str, Any]:
        texts, lines = self.samples()
        batch = self.shape[0]
        predicted: list[str] = []
        for x, n in with_progress(batches(lines, batch), total=-(-len(lines) // batch), desc=self.name,
                                  enabled=progress):
            predicted += ctc_greedy_decode(first_output(run({self.input_name: x}), self.name), self.table)[:n]
        return score_lines(texts, predicted)


def score_lines(texts: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Summed character accuracy (the score), per-line mean, exact matches and every line's result."""
    predicted = [normalize(p) for p in predicted]
    dists = [edit_distance(t, p) for t, p in zip(texts, predicted)]
    total = sum(len(t) for t in texts)
    per_line = [max(0.0, 1.0 - d / max(1, len(t))) for t, d in zip(texts, dists)]
    return {
        "score": max(0.0, 1.0 - sum(dists) / max(1, total)),
        "samples": len(texts),
        "exact": sum(d == 0 for d in dists),
        "char_accuracy_mean_per_line": float(np.mean(per_line)) if per_line else 0.0,
        "per_sample": [{"text": t, "predicted": p, "edit_distance": d}
                       for t, p, d in zip(texts, predicted, dists)],
    }

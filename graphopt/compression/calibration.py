"""Calibration: read a set of sample inputs, stream them through ONNX Runtime, and turn the values
each tensor took into a range ``(lo, hi)`` for quantization. Knows no target.

* :func:`load_calibration` reads ``FILE.npz`` (one array per model input) or a folder of ``.npz``
  files and checks every array against the model's inputs (names, dtypes, static dims, NaN/inf).
  An array either has one more axis than the input (``[S, *input_shape]``: sample ``i`` is
  ``arr[i]``) or the input's rank (the leading axis is the sample axis: it is cut into samples of
  the input's batch size, 1 when that is dynamic).
* :class:`Histogram` keeps a tensor's exact min/max and a histogram over ``[-R, R]`` whose bins
  merge pairwise when ``R`` doubles to cover new values, so memory stays constant whatever the
  number of samples.
* :func:`collect` runs the model (a copy with the tensors to calibrate added as outputs) one
  sample at a time and feeds each tensor's values into its histogram.
* :meth:`Histogram.range` applies a method: ``minmax``, ``percentile`` (two tails cut at
  ``100 - p`` percent in all), ``entropy`` (the threshold whose 128-level quantization keeps the
  least KL divergence from the clipped distribution, TensorRT's method) or ``mse`` (the
  threshold with the smallest expected squared error of 8-bit quantization).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import GraphoptError, UsageError
from graphopt.core.progress import wrap

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.999
HALF_BINS = 2048  # bins on each side of zero
LEVELS = 255  # 8-bit quantization levels the entropy and mse methods aim at


class CalibrationError(GraphoptError):
    """A calibration set that does not fit the model: the message names the file, input and problem."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None: dynamic


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    specs = []
    for v in model.graph.inputs:
        if v.is_initializer() or v.const_value is not None:
            continue
        dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else None for d in v.shape) if v.shape is not None else ()
        specs.append(InputSpec(v.name, np.dtype(dtype), shape))
    return specs


@dataclasses.dataclass
class CalibrationSet:
    """Validated calibration data: samples are produced one at a time from the files."""

    files: list[Path]
    specs: list[InputSpec]
    counts: list[int]  # samples per file
    limit: int | None = None

    def __len__(self) -> int:
        total = sum(self.counts)
        return total if self.limit is None else min(total, self.limit)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        left = len(self)
        for path in self.files:
            with np.load(path, allow_pickle=False) as data:
                arrays = {s.name: _as_samples(data[s.name], s) for s in self.specs}
            for i in range(len(next(iter(arrays.values())))):
                if left <= 0:
                    return
                left -= 1
                yield {name: np.ascontiguousarray(a[i]) for name, a in arrays.items()}


def _batch(spec: InputSpec) -> int:
    return spec.shape[0] if spec.shape and spec.shape[0] is not None else 1


def _as_samples(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``arr`` as [samples, *input_shape] (an array of the input's rank is cut along its first axis)."""
    if arr.ndim == len(spec.shape) + 1:
        return arr
    b = _batch(spec)
    return arr.reshape((arr.shape[0] // b, b, *arr.shape[1:]))


def _check_array(path: Path, arr: np.ndarray, spec: InputSpec) -> int:
    """Number of samples in ``arr`` for input ``spec``; a CalibrationError naming what is wrong."""
    where = f"calibration file {path}: input '{spec.name}'"
    rank = len(spec.shape)
    if arr.dtype != spec.dtype:
        raise CalibrationError(f"{where} has dtype {arr.dtype}, the model expects {spec.dtype}")
    if arr.ndim not in (rank, rank + 1) or arr.ndim == 0:
        raise CalibrationError(f"{where} has shape {list(arr.shape)}: expected [samples, "
                               f"{', '.join('?' if d is None else str(d) for d in spec.shape)}] "
                               f"or the input's own rank with samples along the first axis")
    sample_shape = arr.shape[1:] if arr.ndim == rank + 1 else (_batch(spec), *arr.shape[1:])
    for i, (got, want) in enumerate(zip(sample_shape, spec.shape)):
        if want is not None and got != want:
            raise CalibrationError(f"{where}: a sample has shape {list(sample_shape)}, the model input is "
                                   f"{[('?' if d is None else d) for d in spec.shape]} (dim {i}: {got} != {want})")
    if arr.ndim == rank and arr.shape[0] % _batch(spec):
        raise CalibrationError(f"{where}: {arr.shape[0]} rows are not a multiple of the input's batch {_batch(spec)}")
    if arr.shape[0] == 0:
        raise CalibrationError(f"{where} holds no samples")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0][0])
        raise CalibrationError(f"{where}: sample {bad} contains NaN or inf")
    return arr.shape[0] if arr.ndim == rank + 1 else arr.shape[0] // _batch(spec)


def load_calibration(path: str | os.PathLike, model: ir.Model, *, limit: int | None = None) -> CalibrationSet:
    """Check a ``.npz`` file or a folder of them against ``model``'s inputs; at most ``limit`` samples."""
    if limit is not None and limit < 1:
        raise UsageError(f"--calibration-samples {limit}: must be at least 1")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npz" and f.is_file())
        if not files:
            raise CalibrationError(f"calibration folder {p}: no .npz files in it")
    elif p.is_file():
        files = [p]
    else:
        raise CalibrationError(f"calibration file {p}: no such file or folder")
    specs = input_specs(model)
    wanted = {s.name for s in specs}
    counts = []
    for f in files:
        try:
            data = np.load(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise CalibrationError(f"calibration file {f}: not a readable .npz ({type(e).__name__})") from None
        with data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise CalibrationError(f"calibration file {f}: a .npy array, expected a .npz with one array per input")
            names = set(data.files)
            if names - wanted:
                extra = sorted(names - wanted)[0]
                raise CalibrationError(f"calibration file {f}: array '{extra}' names no model input "
                                       f"(inputs: {', '.join(sorted(wanted))})")
            if wanted - names:
                missing = sorted(wanted - names)[0]
                raise CalibrationError(f"calibration file {f}: no array for model input '{missing}'")
            per_input = {s.name: _check_array(f, data[s.name], s) for s in specs}
        if len(set(per_input.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in per_input.items())
            raise CalibrationError(f"calibration file {f}: inputs hold different numbers of samples ({detail})")
        counts.append(next(iter(per_input.values())) if per_input else 0)
    if not specs or sum(counts) == 0:
        raise CalibrationError(f"calibration {p}: the set is empty")
    return CalibrationSet(files, specs, counts, limit)


class Histogram:
    """Streaming statistics of one tensor: exact min/max and a histogram over [-R, R]."""

    def __init__(self, half_bins: int = HALF_BINS):
        self.half = half_bins
        self.counts = np.zeros(2 * half_bins, dtype=np.int64)
        self.radius = 0.0
        self.min = np.inf
        self.max = -np.inf

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        need = max(abs(lo), abs(hi))
        if self.radius == 0.0:
            self.radius = need if need > 0 else 1e-8
        while need > self.radius:  # double R: each pair of bins merges into one, outer bins start empty
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            self.counts[self.half // 2: self.half // 2 + self.half] = merged
            self.radius *= 2
        width = self.radius / self.half
        idx = np.floor(x / width).astype(np.int64) + self.half
        np.clip(idx, 0, 2 * self.half - 1, out=idx)
        self.counts += np.bincount(idx, minlength=2 * self.half)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, 2 * self.half + 1)

    def abs_counts(self) -> np.ndarray:
        """Counts of |x| over [0, R] in ``half`` bins."""
        return self.counts[self.half:] + self.counts[:self.half][::-1]

    def range(self, method: str = "percentile", percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
        if self.min > self.max:
            return 0.0, 0.0
        if method == "minmax":
            return float(self.min), float(self.max)
        if method == "percentile":
            return self._percentile(percentile)
        if method in ("entropy", "mse"):
            t = self._entropy_threshold() if method == "entropy" else self._mse_threshold()
            return max(float(self.min), -t), min(float(self.max), t)
        raise UsageError(f"--calibration-method {method}: expected one of {', '.join(METHODS)}")

    def _percentile(self, p: float) -> tuple[float, float]:
        if not 50 < p <= 100:
            raise UsageError(f"percentile {p}: must be in (50, 100]")
        cdf = np.cumsum(self.counts) / self.counts.sum()
        edges = self.edges
        tail = (100.0 - p) / 200.0  # half of the cut on each side
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        lo = max(float(self.min), float(edges[lo_bin]))
        hi = min(float(self.max), float(edges[min(hi_bin + 1, len(edges) - 1)]))
        return lo, hi

    def _entropy_threshold(self, levels: int = 128, stride: int = 16) -> float:
        hist = self.abs_counts().astype(np.float64)
        width = self.radius / self.half
        last = int(np.nonzero(hist)[0][-1]) + 1 if hist.any() else 1
        if last <= levels:
            return last * width
        best, best_t = np.inf, last * width
        for i in range(levels, last + 1, stride):
            p = hist[:i].copy()
            p[-1] += hist[i:].sum()
            # quantize the first i bins into `levels` groups, spread each group over its non-empty bins
            group = np.minimum(np.arange(i) * levels // i, levels - 1)
            nonzero = hist[:i] > 0
            sums = np.bincount(group, weights=hist[:i], minlength=levels)
            nz = np.bincount(group, weights=nonzero, minlength=levels)
            q = np.where(nonzero, sums[group] / np.maximum(nz[group], 1), 0.0)
            kl = _kl(p, q)
            if kl < best:
                best, best_t = kl, i * width
        return best_t

    def _mse_threshold(self, candidates: int = 128) -> float:
        hist = self.abs_counts().astype(np.float64)
        width = self.radius / self.half
        centers = (np.arange(self.half) + 0.5) * width
        top = max(abs(self.min), abs(self.max))
        best, best_t = np.inf, top
        for t in np.linspace(top / candidates, top, candidates):
            step = 2 * t / LEVELS
            inside = centers <= t
            err = np.where(inside, step * step / 12.0, (centers - t) ** 2)
            total = float((err * hist).sum())
            if total < best:
                best, best_t = total, float(t)
        return best_t


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalised histograms; empty q bins where p has mass are smoothed."""
    p = p / p.sum()
    q = np.where((q == 0) & (p > 0), 1e-4 * q.sum() / max(q.size, 1) + 1e-12, q)
    q = q / q.sum()
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def _with_outputs(model: ir.Model, names: Sequence[str]) -> bytes:
    """The model as bytes with ``names`` added as graph outputs (the model itself is not changed)."""
    import onnx

    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    types = {}
    for node in model.graph:
        for v in node.outputs:
            types[v.name] = v
    for v in model.graph.inputs:
        types[v.name] = v
    for name in names:
        if name in present:
            continue
        v = types.get(name)
        elem = v.dtype.value if v is not None and v.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return proto.SerializeToString()


def ort_session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def progress(items: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """``items`` behind a bar on a terminal (``graphopt.core.progress``)."""
    return wrap(items, total=total, desc=desc, unit="sample", enabled=enabled)


def run_outputs(model: ir.Model, names: Sequence[str], data: CalibrationSet, *, show: bool = False,
                desc: str = "calibrating") -> Iterator[dict[str, np.ndarray]]:
    """For each sample, ``{name: value}`` of ``names`` computed by ONNX Runtime on ``model``."""
    names = list(dict.fromkeys(names))
    try:
        sess = ort_session(_with_outputs(model, names))
    except Exception as e:  # noqa: BLE001
        raise GraphoptError(f"calibration: ONNX Runtime cannot load the model ({' '.join(str(e).split())[:300]})") from None
    for feeds in progress(data, total=len(data), desc=desc, enabled=show):
        try:
            values = sess.run(names, feeds)
        except Exception as e:  # noqa: BLE001 - ORT's errors on the user's data
            raise CalibrationError(f"calibration: ONNX Runtime failed on a sample ({' '.join(str(e).split())[:300]})") from None
        yield dict(zip(names, values))


def collect(model: ir.Model, names: Sequence[str], data: CalibrationSet, *, show: bool = False) -> dict[str, Histogram]:
    """A :class:`Histogram` per tensor name, accumulated over every sample of ``data``."""
    hists = {n: Histogram() for n in dict.fromkeys(names)}
    for values in run_outputs(model, list(hists), data, show=show):
        for name, value in values.items():
            hists[name].update(value)
    return hists


def ranges(hists: dict[str, Histogram], method: str = "percentile",
           percentile: float = DEFAULT_PERCENTILE) -> dict[str, tuple[float, float]]:
    if method not in METHODS:
        raise UsageError(f"--calibration-method {method}: expected one of {', '.join(METHODS)}")
    return {name: h.range(method, percentile) for name, h in hists.items()}

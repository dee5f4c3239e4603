"""Calibration: the range methods on known distributions, the streaming histogram, reading and
checking calibration files, and collecting statistics through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.compression import calibration as cal
from graphopt.compression.calibration import CalibrationError, Histogram
from graphopt.core.errors import GraphoptError, UsageError
from tests.passes.graph_testing import model_from_text

RNG = np.random.default_rng(0)


def _streamed(x: np.ndarray, parts: int = 10) -> Histogram:
    h = Histogram()
    for part in np.array_split(x, parts):
        h.update(part)
    return h


def test_minmax_is_exact_while_the_range_grows():
    h = Histogram()
    h.update(np.array([0.25, -0.5], np.float32))
    h.update(np.array([3.0, -7.5, 0.0], np.float32))  # the histogram doubles its radius 4 times
    h.update(np.array([100.0], np.float32))
    assert h.range("minmax") == (-7.5, 100.0)
    assert h.counts.sum() == 6
    assert h.radius >= 100.0


def test_rebinned_histogram_keeps_the_distribution():
    x = np.concatenate([RNG.uniform(0, 1, 100_000), RNG.uniform(-20, 20, 100_000)]).astype(np.float32)
    h = _streamed(x)  # starts at radius 1, grows to 32 through pairwise merges
    cdf = np.cumsum(h.counts) / h.counts.sum()
    edges = h.edges[1:]
    width = h.radius / h.half
    for q in (0.1, 0.3, 0.5, 0.9):
        exact = np.quantile(x, q)
        assert abs(edges[np.searchsorted(cdf, q)] - exact) <= 2 * width


def test_percentile_cuts_both_tails():
    x = RNG.uniform(0, 1, 1_000_000).astype(np.float32)
    lo, hi = _streamed(x).range("percentile", 99.0)
    exact_lo, exact_hi = np.percentile(x, [0.5, 99.5])
    width = 1.0 / cal.HALF_BINS
    assert abs(lo - exact_lo) <= 2 * width and abs(hi - exact_hi) <= 2 * width
    g = RNG.standard_normal(1_000_000).astype(np.float32)
    lo, hi = _streamed(g).range("percentile", 99.9)
    exact_lo, exact_hi = np.percentile(g, [0.05, 99.95])
    assert abs(lo - exact_lo) < 0.02 and abs(hi - exact_hi) < 0.02


def test_entropy_keeps_a_uniform_range_and_cuts_rare_outliers():
    u = RNG.uniform(-1, 1, 500_000).astype(np.float32)
    lo, hi = _streamed(u).range("entropy")
    assert lo < -0.97 and hi > 0.97  # nothing to clip: the whole range
    g = np.concatenate([RNG.standard_normal(1_000_000), [30.0] * 5, [-25.0] * 5]).astype(np.float32)
    lo, hi = _streamed(g).range("entropy")
    assert 2.5 < hi < 8 and -8 < lo < -2.5  # the 10 outliers are clipped, the Gaussian body kept
    assert _streamed(g).range("minmax") == (-25.0, 30.0)


def _fake_quant_mse(x: np.ndarray, t: float) -> float:
    step = 2 * t / 255
    q = np.clip(np.round(x / step), -127.5, 127.5) * step
    return float(np.mean((x - q) ** 2))


def test_mse_threshold_is_the_brute_force_optimum():
    x = RNG.laplace(0, 1, 400_000).astype(np.float32)
    lo, hi = _streamed(x).range("mse")
    assert lo == -hi or lo == float(x.min())
    grid = np.linspace(0.5, float(np.abs(x).max()), 300)
    errors = [_fake_quant_mse(x, t) for t in grid]
    best = grid[int(np.argmin(errors))]
    assert abs(hi - best) / best < 0.1
    assert _fake_quant_mse(x, hi) <= 1.05 * min(errors)


def test_unknown_method_and_bad_percentile_are_usage_errors():
    h = _streamed(np.ones(10, np.float32))
    with pytest.raises(UsageError, match="calibration-method"):
        h.range("median")
    with pytest.raises(UsageError, match="percentile"):
        h.range("percentile", 30.0)


CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,3,4,4] y) {
  c = Conv <pads = [1,1,1,1]> (x, w)
  y = Relu (c)
}
"""


@pytest.fixture
def conv_model():
    return model_from_text(CONV, w=RNG.standard_normal((3, 2, 3, 3)).astype(np.float32))


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_calibration_reads_files_and_folders(conv_model, tmp_path):
    a = RNG.standard_normal((5, 1, 2, 4, 4)).astype(np.float32)
    one = cal.load_calibration(_write(tmp_path / "a.npz", x=a), conv_model)
    assert len(one) == 5
    samples = list(one)
    assert samples[2]["x"].shape == (1, 2, 4, 4) and np.array_equal(samples[2]["x"], a[2])
    folder = tmp_path / "set"
    folder.mkdir()
    _write(folder / "1.npz", x=a)
    _write(folder / "2.npz", x=a[:, 0])  # the input's own rank: samples along the batch axis
    both = cal.load_calibration(folder, conv_model)
    assert len(both) == 10 and all(s["x"].shape == (1, 2, 4, 4) for s in both)
    assert len(list(cal.load_calibration(folder, conv_model, limit=7))) == 7


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((2, 1, 2, 4, 4), np.float32)}, "array 'y' names no model input"),
    ({}, "no array for model input 'x'"),
    ({"x": np.zeros((2, 1, 2, 4, 4), np.float64)}, "input 'x' has dtype float64, the model expects float32"),
    ({"x": np.zeros((2, 1, 3, 4, 4), np.float32)}, r"input 'x': a sample has shape \[1, 3, 4, 4\].*dim 1: 3 != 2"),
    ({"x": np.zeros((2, 4, 4), np.float32)}, "input 'x' has shape"),
    ({"x": np.zeros((0, 1, 2, 4, 4), np.float32)}, "input 'x' holds no samples"),
    ({"x": np.where(np.arange(64).reshape(2, 1, 2, 4, 4) == 40, np.nan, 0).astype(np.float32)},
     "input 'x': sample 1 contains NaN or inf"),
    ({"x": np.full((1, 1, 2, 4, 4), np.inf, np.float32)}, "sample 0 contains NaN or inf"),
])
def test_bad_calibration_files_name_file_input_and_problem(conv_model, tmp_path, arrays, message):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError, match=message) as e:
        cal.load_calibration(path, conv_model)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_empty_and_unreadable_sets(conv_model, tmp_path):
    with pytest.raises(CalibrationError, match="no such file"):
        cal.load_calibration(tmp_path / "nope.npz", conv_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .npz files"):
        cal.load_calibration(tmp_path / "empty", conv_model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        cal.load_calibration(tmp_path / "junk.npz", conv_model)
    with pytest.raises(UsageError, match="calibration-samples"):
        cal.load_calibration(tmp_path / "junk.npz", conv_model, limit=0)
    assert issubclass(CalibrationError, GraphoptError)


def test_collect_streams_exact_statistics(conv_model, tmp_path):
    a = RNG.standard_normal((6, 1, 2, 4, 4)).astype(np.float32) * 3
    data = cal.load_calibration(_write(tmp_path / "a.npz", x=a), conv_model)
    hists = cal.collect(conv_model, ["x", "c", "y"], data)
    assert hists["x"].range("minmax") == (float(a.min()), float(a.max()))
    assert hists["y"].min == 0.0 and hists["y"].max == hists["c"].max
    assert hists["c"].counts.sum() == 6 * 3 * 16
    assert cal.ranges(hists, "minmax")["c"] == (hists["c"].min, hists["c"].max)

"""AdaRound: learned rounding of int8 weights lowers the error against the float (teacher) model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_prune_channels import feeds, prune_model

from graphopt.compression.compress import CompressOptions, compress, copy_model, ort_run
from graphopt.core.errors import UsageError
from graphopt.core.verify import verify


def _error(model, teacher, data, name="y") -> float:
    run, ref = ort_run(model), ort_run(teacher)
    return float(np.mean([np.sum((run(f)[name] - ref(f)[name]) ** 2) / np.sum(ref(f)[name] ** 2) for f in data]))


def _int8(model, calib, **kw):
    opts = CompressOptions(quantize="int8", calibration=calib, method="minmax", **kw)
    return compress(copy_model(model), opts)


def _int8_weights(model) -> dict[str, np.ndarray]:
    return {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "c.npz"
    np.savez(path, x=np.concatenate([f["x"] for f in feeds(32, seed=3)]))
    return path


def test_adaround_lowers_every_layers_error_and_the_output_error(calib):
    teacher = prune_model(seed=4, dead=False)
    nearest = _int8(teacher, calib)
    learned = _int8(teacher, calib, adaround=True)
    verify(learned.model)
    errors = learned.report["adaround"]
    assert {"c1", "c2", "c3", "c4", "c5", "gemm"} <= set(errors)  # the depthwise conv is grouped: skipped
    assert all(kept <= rtn for rtn, kept in errors.values())
    assert sum(kept < rtn for rtn, kept in errors.values()) >= 3
    # the rounding changed, nothing else: same int8 tensors, a few entries one step apart
    a, b = _int8_weights(nearest.model), _int8_weights(learned.model)
    assert a.keys() == b.keys()
    steps = [np.abs(a[k].astype(int) - b[k].astype(int)) for k in a]
    assert max(s.max() for s in steps) == 1 and sum(s.sum() for s in steps) > 0
    held_out = feeds(16, seed=99)
    assert _error(learned.model, teacher, held_out) < _error(nearest.model, teacher, held_out)


def test_adaround_needs_int8():
    with pytest.raises(UsageError, match="--adaround applies to --quantize int8"):
        CompressOptions(quantize="int8-dynamic", adaround=True).check()

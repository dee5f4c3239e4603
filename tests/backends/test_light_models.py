"""Every ONNX "light" model (in the onnx wheel, real generated weights) compiles for x86 and matches ORT.

Untuned CPU code is slow to build and to run, so all but the smallest are ``slow``
(``python3 -m pytest tests/backends/test_light_models.py -m slow``).
"""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.front import api

from graphopt import models

LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512"]
FAST = {"squeezenet", "resnet50"}
RTOL, ATOL = 1e-3, 1e-4


def _ort(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in LIGHT]
)
def test_light_model_matches_onnxruntime(name):
    spec = f"light:{name}"
    feeds, reference = models.reference_data(spec)
    compiled = api.compile(spec, target="x86", opt_level=2)
    out = compiled(**feeds)
    expected = _ort(models.resolve(spec), feeds)
    assert list(out) == list(reference)
    for (oname, value), exp, ref in zip(out.items(), expected, reference.values()):
        np.testing.assert_allclose(value, exp, rtol=RTOL, atol=ATOL, err_msg=f"{spec} output {oname} vs ORT")
        assert np.argmax(value) == np.argmax(ref)

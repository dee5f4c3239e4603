"""`graphopt conformance` on a fast subset of the ONNX node cases, and its pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphopt.front import conformance
from graphopt.front.cli import main
from graphopt.core.errors import UsageError

# Common ops across op families: every one of these cases must pass through the whole compiler.
SUBSET = [
    "test_add_bcast", "test_div", "test_relu", "test_sigmoid", "test_matmul_3d", "test_gemm_default_no_bias",
    "test_conv_with_strides_padding", "test_maxpool_2d_default", "test_averagepool_2d_default",
    "test_globalaveragepool", "test_softmax_axis_0", "test_transpose_default", "test_concat_1d_axis_0",
    "test_reshape_reduced_dims", "test_flatten_axis0", "test_reduce_mean_default_axes_keepdims_example",
    "test_unsqueeze_axis_0", "test_slice", "test_gather_0", "test_where_example", "test_clip", "test_leakyrelu",
    "test_causal_conv_with_state_kernel_size_one",  # a zero-length state: an empty loop to schedule
]


def test_subset_passes():
    report = conformance.run_conformance(names=SUBSET, jobs=2, timeout=120)
    failed = {r.name: f"{r.status}: {r.reason}" for r in report.results if r.status != "passed"}
    assert failed == {}
    assert report.passed == len(SUBSET)
    assert report.ort_passed == len(SUBSET)  # ONNX Runtime agrees with the expected outputs too


def test_cli_prints_groups_and_the_closing_line(tmp_path, capsys):
    out = tmp_path / "conf.json"
    # test_bitshift_* has uint64 cases; test_sequence_insert_* needs sequences, which graphopt does not lower
    assert main(["conformance", "-k", "test_relu,test_sequence_insert_at_back", "-j", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    data = json.loads(out.read_text())
    assert lines[-1] == f"{data['passed']} passed, {data['failed']} failed"
    assert data["total"] == data["passed"] + data["failed"] == len(data["cases"])
    seq = [c for c in data["cases"] if c["name"] == "test_sequence_insert_at_back"]
    assert seq and seq[0]["status"] == "unsupported"
    assert "SequenceInsert [unsupported]" in text
    assert any(c["name"] == "test_relu" and c["status"] == "passed" for c in data["cases"])


def test_hung_case_is_a_timeout_and_the_worker_is_replaced():
    report = conformance.run_conformance(names=["test_abs", "test_neg"], jobs=1, timeout=0.05, ort=False)
    assert [r.status for r in report.results] == ["timeout", "timeout"]
    assert "0.05 s" in report.results[0].reason


def test_selection_and_unknown_names():
    names = ["test_add", "test_add_bcast", "test_conv_with_strides_padding", "test_relu"]
    assert conformance.select(names, "test_add") == ["test_add", "test_add_bcast"]
    assert conformance.select(names, "test_conv_*,relu") == ["test_conv_with_strides_padding", "test_relu"]
    assert conformance.select(names, None) == names
    with pytest.raises(UsageError, match="test_nope"):
        conformance.run_conformance(names=["test_nope"])
    with pytest.raises(UsageError, match="matches no conformance case"):
        conformance.run_conformance("zzz_no_such_case")


def test_comparison_rules():
    import ml_dtypes

    f = np.array([1.0, np.nan, 3.0], np.float32)
    assert conformance._close(f + 1e-5, f) is None
    assert "1 of 3" in conformance._close(f + np.array([0, 0, 0.1], np.float32), f)
    assert "shape" in conformance._close(f[:2], f)
    assert conformance._close(np.array([1, 2]), np.array([1, 3])) == "1 of 2 elements differ"
    b = np.array([2.0], ml_dtypes.bfloat16)
    assert conformance._close(np.array([2.0078125], ml_dtypes.bfloat16), b) is None  # one bf16 ulp


def test_case_op_and_frozen_inputs():
    cases = conformance._all_cases()
    assert conformance.case_op(cases["test_relu"]) == "Relu"
    assert conformance.case_op(cases["test_relu_expanded_ver18"]) == "Relu"
    assert conformance.case_op(cases["test_layer_normalization_2d_axis0_expanded"]) == "LayerNormalization"
    assert conformance.shape_input_names(cases["test_reshape_reduced_dims"].model) == {"shape"}
    assert conformance.shape_input_names(cases["test_gather_0"].model) == set()


def test_cases_with_dtypes_numpy_lacks_run_through_the_compiler():
    """Data sets of bfloat16, float8, float4 and int4 come as TensorProtos: they are converted, fed in
    the dtype the compiled input holds, and compared (float4 outputs are held as bit patterns)."""
    names = ["test_cast_FLOAT_to_BFLOAT16", "test_cast_FLOAT8E4M3FN_to_FLOAT", "test_cast_FLOAT_to_FLOAT4E2M1",
             "test_cast_INT4_to_FLOAT", "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2"]
    report = conformance.run_conformance(names=names, jobs=2, timeout=120, ort=False)
    assert {r.name: f"{r.status}: {r.reason}" for r in report.results if r.status != "passed"} == {}
    assert report.passed == len(names)

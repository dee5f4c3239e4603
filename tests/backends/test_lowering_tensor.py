"""Tensor lowering rules (shapes, indexing, padding, matmul) compared with ONNX Runtime on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from conformance_util import all_cases, check_against_ort, make_model, run_case
from onnx import TensorProto as T
from onnx import helper

rng = np.random.default_rng(2)
F, I64 = T.FLOAT, T.INT64


def _x(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _i(values):
    return np.asarray(values, np.int64)


def _run(nodes, x, inits, outs, opset=18, extra_inputs=()):
    inputs = [("x", F, list(x.shape)), *[(n, t, list(v.shape)) for n, t, v in extra_inputs]]
    feeds = {"x": x, **{n: v for n, _t, v in extra_inputs}}
    model = make_model(nodes, inputs, [(o, t, None) for o, t in outs], inits, opset=opset)
    return check_against_ort(model, feeds)


def test_reshape_flatten_squeeze_unsqueeze_transpose():
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r1"]),  # 0 copies a dim, -1 infers
        helper.make_node("Flatten", ["x"], ["f1"], axis=-1),
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["sq"]),
        helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
        helper.make_node("Transpose", ["x"], ["t2"]),
    ]
    inits = {"s1": _i([0, -1]), "ax": _i([-1, 1])}
    _run(nodes, _x(2, 3, 4), inits, [(o, F) for o in ("r1", "f1", "u", "sq", "t", "t2")])


def test_attribute_forms_before_opset_13():
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, 3]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[0]),
        helper.make_node("Split", ["x"], ["a", "b"], axis=2, split=[1, 3]),
        helper.make_node("Slice", ["x"], ["sl"], starts=[1, -3], ends=[100, -1], axes=[0, 2]),
        helper.make_node("Softmax", ["x"], ["sm"]),
    ]
    _run(nodes, _x(2, 3, 4), {}, [(o, F) for o in ("u", "s", "a", "b", "sl", "sm")], opset=9)


def test_slice_negative_steps_clamping_and_split_forms():
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s1"]),
        helper.make_node("Slice", ["x", "st2", "en2"], ["s2"]),
        helper.make_node("Split", ["x", "parts"], ["p0", "p1", "p2"], axis=1),
        helper.make_node("Split", ["x"], ["q0", "q1"], axis=2, num_outputs=2),
    ]
    inits = {"st": _i([-1, 10]), "en": _i([-1000, 0]), "ax": _i([2, 1]), "sp": _i([-2, -1]),
             "st2": _i([0, 1]), "en2": _i([1, 2**62]), "parts": _i([1, 0, 4])}
    _run(nodes, _x(3, 5, 5), inits, [(o, F) for o in ("s1", "s2", "p0", "p1", "p2", "q0", "q1")])


def test_concat_expand_tile_pad_modes():
    nodes = [
        helper.make_node("Concat", ["x", "x"], ["c"], axis=-1),
        helper.make_node("Expand", ["x", "es"], ["e"]),
        helper.make_node("Tile", ["x", "reps"], ["t"]),
        *[helper.make_node("Pad", ["x", "pads"], [f"pad_{m}"], mode=m) for m in ("reflect", "edge", "wrap")],
        helper.make_node("Pad", ["x", "pads", "cv"], ["pad_c"]),
        helper.make_node("Pad", ["x", "negpads"], ["pad_neg"]),
    ]
    inits = {"es": _i([2, 1, 3, 4]), "reps": _i([1, 2, 2]), "pads": _i([0, 1, 2, 0, 2, 1]),
             "cv": np.array(1.5, np.float32), "negpads": _i([0, -1, 1, 1, 0, -2])}
    outs = ["c", "e", "t", "pad_reflect", "pad_edge", "pad_wrap", "pad_c", "pad_neg"]
    _run(nodes, _x(2, 3, 4), inits, [(o, F) for o in outs])


def test_gather_scatter_family_with_negative_indices():
    idx = _i([[0, -1], [2, 1]])
    nodes = [
        helper.make_node("Gather", ["x", "gi"], ["g"], axis=1),
        helper.make_node("GatherElements", ["x", "ge"], ["ge_out"], axis=2),
        helper.make_node("GatherND", ["x", "gnd"], ["gnd_out"]),
        helper.make_node("ScatterElements", ["x", "ge", "upd"], ["se"], axis=2, reduction="add"),
        helper.make_node("ScatterND", ["x", "gnd", "updnd"], ["snd"]),
    ]
    inits = {"gi": idx, "ge": rng.integers(-4, 4, (2, 3, 2)).astype(np.int64),
             "upd": _x(2, 3, 2), "gnd": _i([[0, 1], [1, -1]]), "updnd": _x(2, 4)}
    _run(nodes, _x(2, 3, 4), inits, [(o, F) for o in ("g", "ge_out", "gnd_out", "se", "snd")])


def test_gather_with_runtime_indices():
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], axis=0)]
    _run(nodes, _x(5, 3), {}, [("g", F)], extra_inputs=[("idx", I64, _i([[4, -5], [0, -1]]))])


def test_depth_space_trilu_cumsum_onehot_eyelike_topk():
    nodes = [
        helper.make_node("DepthToSpace", ["x"], ["d_dcr"], blocksize=2),
        helper.make_node("DepthToSpace", ["x"], ["d_crd"], blocksize=2, mode="CRD"),
        helper.make_node("SpaceToDepth", ["x"], ["s2d"], blocksize=2),
        helper.make_node("Trilu", ["x", "k"], ["tri"], upper=0),
        helper.make_node("CumSum", ["x", "axis"], ["cs"], exclusive=1, reverse=1),
        helper.make_node("TopK", ["x", "kk"], ["tv", "ti"], axis=1, largest=0),
    ]
    inits = {"k": _i(1), "axis": _i(-1), "kk": _i([3])}
    outs = [("d_dcr", F), ("d_crd", F), ("s2d", F), ("tri", F), ("cs", F), ("tv", F), ("ti", I64)]
    _run(nodes, _x(1, 8, 4, 6), inits, outs)


def test_matmul_batched_and_vector_forms_and_gemm():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("MatMul", ["x", "v"], ["mv"]),
        helper.make_node("Gemm", ["a", "b", "c"], ["gm"], alpha=0.5, beta=2.0, transA=1, transB=1),
        helper.make_node("Einsum", ["x", "w"], ["es"], equation="bij,jk->bik"),
        helper.make_node("Shape", ["x"], ["sh"], start=1),
        helper.make_node("Size", ["x"], ["sz"]),
    ]
    inits = {"w": _x(4, 5), "v": _x(4), "a": _x(6, 3), "b": _x(7, 6), "c": _x(7)}
    outs = [("mm", F), ("mv", F), ("gm", F), ("es", F), ("sh", I64), ("sz", I64)]
    _run(nodes, _x(2, 3, 4), inits, outs)


CONFORMANCE_SAMPLE = [
    "test_reshape_allowzero_reordered", "test_slice_neg_steps", "test_split_zero_size_splits_opset18",
    "test_onehot_negative_indices", "test_compress_negative_axis", "test_reversesequence_batch",
    "test_scatter_elements_with_reduction_max", "test_scatternd_multiply", "test_top_k_same_values_2d",
    "test_eyelike_with_dtype", "test_edge_pad", "test_nonzero_example",
    "test_cumprod_1d_reverse_exclusive", "test_center_crop_pad_crop_and_pad_expanded", "test_top_k_uint64",
    "test_dft_rfft", "test_dft_inverse_opset19", "test_stft_with_window", "test_hannwindow_symmetric", "test_melweightmatrix",
    "test_tensorscatter_circular", "test_nonmaxsuppression_iou_threshold_boundary",
    "test_nonmaxsuppression_center_point_box_format", "test_unique_not_sorted_without_axis", "test_unique_sorted_with_axis",
]


@pytest.mark.parametrize("name", CONFORMANCE_SAMPLE)
def test_conformance_sample(name):
    (case,) = [c for c in all_cases() if c.name == name]
    ok, why, _frozen = run_case(case)
    assert ok, why

"""Reductions, ArgMax/ArgMin and the Softmax family, compared with ONNX Runtime on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from conformance_util import all_cases, check_against_ort, make_model, run_case
from onnx import TensorProto as T
from onnx import helper

rng = np.random.default_rng(3)
F, I64 = T.FLOAT, T.INT64
REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare"]


def _check(nodes, outs, x, inits=None, opset=18):
    model = make_model(nodes, [("x", F, list(x.shape))], [(o, t, None) for o, t in outs], inits or {}, opset=opset)
    return check_against_ort(model, {"x": x})


def test_reductions_with_axes_input_keepdims_and_all_axes():
    x = rng.uniform(0.5, 1.5, (2, 3, 4)).astype(np.float32)
    nodes, outs = [], []
    for op in REDUCE:
        nodes.append(helper.make_node(op, ["x", "axes"], [f"{op}_k"]))
        nodes.append(helper.make_node(op, ["x"], [f"{op}_all"], keepdims=0))
        outs += [(f"{op}_k", F), (f"{op}_all", F)]
    nodes.append(helper.make_node("ReduceLogSum", ["x", "axes"], ["ls"], keepdims=0))
    nodes.append(helper.make_node("ReduceSum", ["x", "empty"], ["noop"], noop_with_empty_axes=1))
    outs += [("ls", F), ("noop", F)]
    _check(nodes, outs, x, {"axes": np.array([0, -1], np.int64), "empty": np.zeros(0, np.int64)})


def test_reductions_with_axes_attribute_before_opset_18():
    x = rng.standard_normal((3, 4, 2)).astype(np.float32)
    nodes = [helper.make_node(op, ["x"], [op], axes=[1], keepdims=0) for op in REDUCE if op != "ReduceSum"]
    _check(nodes, [(n.output[0], F) for n in nodes], x, opset=13)


def test_argmax_argmin_with_ties_and_select_last_index():
    x = rng.integers(0, 3, (3, 5)).astype(np.float32)  # many ties
    nodes, outs = [], []
    for op in ("ArgMax", "ArgMin"):
        for last in (0, 1):
            name = f"{op}{last}"
            nodes.append(helper.make_node(op, ["x"], [name], axis=-1, keepdims=last, select_last_index=last))
            outs.append((name, I64))
    _check(nodes, outs, x)


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_family_axis_semantics_change_at_13(opset):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    nodes = [helper.make_node(op, ["x"], [op], axis=1) for op in ("Softmax", "LogSoftmax", "Hardmax")]
    nodes += [helper.make_node("Softmax", ["x"], ["default_axis"])]
    _check(nodes, [(n.output[0], F) for n in nodes], x, opset=opset)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_losses_with_weights_and_ignore_index(reduction):
    scores = rng.standard_normal((3, 5, 2)).astype(np.float32)
    labels = rng.integers(0, 5, (3, 2)).astype(np.int64)
    labels[0, 1] = -1  # ignored
    weight = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    nodes = [
        helper.make_node("SoftmaxCrossEntropyLoss", ["x", "labels", "w"], ["sce", "logp"],
                         reduction=reduction, ignore_index=-1),
        helper.make_node("NegativeLogLikelihoodLoss", ["logp", "labels"], ["nll"], reduction=reduction,
                         ignore_index=-1),
    ]
    model = make_model(nodes, [("x", F, [3, 5, 2]), ("labels", I64, [3, 2])],
                       [("sce", F, None), ("logp", F, None), ("nll", F, None)], {"w": weight})
    check_against_ort(model, {"x": scores, "labels": labels})


CONFORMANCE_SAMPLE = [
    "test_reduce_max_empty_set", "test_reduce_log_sum_exp_empty_set", "test_reduce_max_bool_inputs",
    "test_reduce_sum_empty_axes_input_noop", "test_argmax_negative_axis_keepdims_random_select_last_index",
    "test_hardmax_one_hot", "test_logsoftmax_large_number", "test_softmax_axis_0",
    "test_nllloss_NCd1d2d3_none_no_weight_negative_ii", "test_sce_mean_weight_ii_4d_log_prob",
    "test_det_nd",
]


@pytest.mark.parametrize("name", CONFORMANCE_SAMPLE)
def test_conformance_sample(name):
    (case,) = [c for c in all_cases() if c.name == name]
    ok, why, _frozen = run_case(case)
    assert ok, why

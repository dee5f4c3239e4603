"""LSTM / GRU / RNN lowering: ONNX conformance cases, ORT comparisons over the attribute space, silero-vad."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.backends.lowering.testing import run_lowered

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import run_case, select_cases  # noqa: E402

F = TensorProto.FLOAT
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@pytest.mark.parametrize("case", select_cases({"LSTM", "GRU", "RNN"}), ids=lambda c: c.name)
def test_conformance(case):
    ok, why, _frozen = run_case(case)
    assert ok, why


def _ort(model: onnx.ModelProto, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rnn_model(kind, steps, batch, inp, hidden, *, direction="forward", layout=0, seq_lens=None,
               initial=False, peephole=False, bias=True, rng, **attrs):
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[kind]
    inits = [
        onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, g * hidden, inp)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, g * hidden, hidden)).astype(np.float32), "R"),
    ]
    names = ["X", "W", "R"]
    if bias:
        inits.append(onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, 2 * g * hidden)).astype(np.float32), "B"))
        names.append("B")
    else:
        names.append("")
    xshape = [steps, batch, inp] if layout == 0 else [batch, steps, inp]
    hshape = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", F, xshape)]
    feeds = {"X": rng.standard_normal(xshape).astype(np.float32)}
    if seq_lens is not None:
        inits.append(onnx.numpy_helper.from_array(np.array(seq_lens, dtype=np.int32), "L"))
        names.append("L")
    else:
        names.append("")
    for s in ("h0", "c0")[: 2 if kind == "LSTM" else 1]:
        if initial:
            graph_inputs.append(helper.make_tensor_value_info(s, F, hshape))
            feeds[s] = rng.standard_normal(hshape).astype(np.float32)
            names.append(s)
        else:
            names.append("")
    if peephole:
        inits.append(onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, 3 * hidden)).astype(np.float32), "P"))
        names.append("P")
    while names and names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][: 3 if kind == "LSTM" else 2]
    node = helper.make_node(kind, names, outs, hidden_size=hidden, direction=direction, layout=layout, **attrs)
    yshape = [steps, dirs, batch, hidden] if layout == 0 else [batch, steps, dirs, hidden]
    out_vi = [helper.make_tensor_value_info("Y", F, yshape)] + [helper.make_tensor_value_info(o, F, hshape) for o in outs[1:]]
    graph = helper.make_graph([node], "rnn", graph_inputs, out_vi, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), feeds


SWEEP = [
    ("LSTM", dict(direction="bidirectional", seq_lens=[5, 2, 4], initial=True, peephole=True)),
    ("LSTM", dict(direction="reverse", layout=1, seq_lens=[1, 5, 3], initial=True)),
    ("LSTM", dict(input_forget=1, clip=0.7, bias=False)),
    ("LSTM", dict(activations=["HardSigmoid", "LeakyRelu", "Tanh"], activation_alpha=[0.3, 0.1], activation_beta=[0.4])),
    ("GRU", dict(direction="bidirectional", seq_lens=[3, 5, 1], initial=True)),
    ("GRU", dict(linear_before_reset=1, direction="reverse", layout=1, seq_lens=[2, 5, 4])),
    ("GRU", dict(linear_before_reset=1, clip=0.5, bias=False, initial=True)),
    ("RNN", dict(direction="bidirectional", layout=1, seq_lens=[5, 3, 2], initial=True)),
    ("RNN", dict(activations=["Relu"], clip=2.0)),
]


@pytest.mark.parametrize("kind,attrs", SWEEP, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SWEEP)])
def test_against_ort(kind, attrs):
    seed = len(str(attrs))
    model, feeds = _rnn_model(kind, steps=5, batch=3, inp=4, hidden=6, rng=np.random.default_rng(seed), **attrs)
    got = run_lowered(model, feeds)
    if attrs.get("layout") == 1:  # ORT runs only layout 0: the same weights, time-major, transposed back
        ref, _ = _rnn_model(kind, steps=5, batch=3, inp=4, hidden=6, rng=np.random.default_rng(seed), **{**attrs, "layout": 0})
        ref_feeds = {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()}
        y, *states = _ort(ref, ref_feeds)
        want = [np.transpose(y, (2, 0, 1, 3))] + [np.swapaxes(s, 0, 1) for s in states]
    else:
        want = _ort(model, feeds)
    for name, w in zip([o.name for o in model.graph.output], want):
        assert got[name].shape == w.shape, name
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5, err_msg=name)


def _with_input_shapes(model: onnx.ModelProto, feeds) -> onnx.ModelProto:
    """The model with its graph inputs' dims fixed to the feeds' shapes (static shapes for lowering)."""
    for vi in model.graph.input:
        if vi.name in feeds:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, feeds[vi.name].shape):
                d.Clear()
                d.dim_value = n
    return model


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["silero:openvino_16k", "silero:16k_sequence"])
def test_silero_vad_matches_ort(spec):
    from graphopt.models import resolve
    from graphopt.models.inputs import random_inputs

    feeds = random_inputs(spec, seed=0)
    model = _with_input_shapes(onnx.load(str(resolve(spec))), feeds)
    want = _ort(model, feeds)
    got = run_lowered(model, feeds)
    for out, w in zip(model.graph.output, want):
        np.testing.assert_allclose(got[out.name], w, rtol=1e-3, atol=1e-4, err_msg=out.name)

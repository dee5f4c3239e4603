"""EqualizePass: cross-layer equalization, exact in float, evening out per-channel weight ranges."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from rendered_text import LINES, render_line, render_page

import graphopt
from graphopt.passes.equalize import EqualizePass, equalize
from graphopt.passes.graphopt_ops import run_ort
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def _conv_weight(o, i, k, spread=True):
    w = RNG.standard_normal((o, i, k, k)).astype(np.float32) * 0.1
    if spread:  # channel ranges over three orders of magnitude, as in depthwise-heavy models
        w *= np.logspace(-1.5, 1.5, o, dtype=np.float32)[RNG.permutation(o)].reshape(-1, 1, 1, 1)
    return w


def _chain(between: list[tuple[str, dict, list]], opset=13) -> ir.Model:
    """x[1,8,12,12] -> Conv(16) -> between[0] -> dw Conv(16) -> between[1] -> Conv(8) -> y."""
    inits = {"w0": _conv_weight(16, 8, 3), "b0": RNG.standard_normal(16).astype(np.float32),
             "w1": _conv_weight(16, 1, 3), "b1": RNG.standard_normal(16).astype(np.float32),
             "w2": _conv_weight(8, 16, 1)}
    nodes, v = [], "x"
    for i, (w, b, group) in enumerate((("w0", "b0", 1), ("w1", "b1", 16), ("w2", None, 1))):
        nodes.append(helper.make_node("Conv", [v, w] + ([b] if b else []), [f"c{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1] if w != "w2" else [0, 0, 0, 0], group=group))
        v = f"c{i}"
        if i < len(between):
            op, attrs, extra = between[i]
            if op:
                for k, arr in extra:
                    inits[k] = arr
                nodes.append(helper.make_node(op, [v, *[k for k, _ in extra]], [f"a{i}"], name=f"act{i}", **attrs))
                v = f"a{i}"
    nodes.append(helper.make_node("Identity", [v], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _ranges(model, name, axis):
    w = model.graph.initializers[name].const_value.numpy()
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def _apply_exact(model):
    feeds = {"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}
    before = run_ort(model, feeds)[0]
    p = EqualizePass()
    result = p(model)
    verify(result.model)
    np.testing.assert_allclose(run_ort(result.model, feeds)[0], before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
    return result, p


ZERO = np.array(0.0, np.float32)
RELU, NONE = ("Relu", {}, []), (None, {}, [])


@pytest.mark.parametrize("between", [
    [RELU, RELU],
    [("LeakyRelu", {"alpha": 0.1}, []), NONE],
    [("Clip", {}, [("lo", ZERO)]), ("MaxPool", {"kernel_shape": [2, 2]}, [])],
    [("PRelu", {}, [("slope", np.full((16, 1, 1), 0.2, np.float32))]), RELU],
], ids=["relu", "leaky-none", "clip0-maxpool", "prelu-relu"])
def test_chain_through_depthwise_is_equalized_exactly(between):
    model = _chain(between)
    original = ir.serde.deserialize_model(ir.to_proto(model))
    result, p = _apply_exact(model)
    assert p.pairs == [("conv0", "conv1"), ("conv1", "conv2")]
    # after the sweeps each pair's ranges meet: output channel i of the first, input channel i of the second
    np.testing.assert_allclose(_ranges(result.model, "w0", 0), _ranges(result.model, "w1", 0), rtol=2e-2)
    np.testing.assert_allclose(_ranges(result.model, "w1", 0), _ranges(result.model, "w2", 1), rtol=1e-5)
    # the spread of channel ranges (std of their logs) shrinks in the two tensors drawn with 1000x spreads
    for name in ("w0", "w1"):
        assert np.log(_ranges(result.model, name, 0)).std() < 0.6 * np.log(_ranges(original, name, 0)).std()


@pytest.mark.parametrize("between, opset", [
    ([("Clip", {}, [("lo", ZERO), ("hi", np.array(6.0, np.float32))]), RELU], 13),  # Relu6: not homogeneous
    ([("Clip", {"min": 0.0, "max": 6.0}, []), RELU], 9),
    ([("Sigmoid", {}, []), RELU], 13),
    ([("HardSwish", {}, []), RELU], 14),
])
def test_non_homogeneous_ops_stop_a_pair(between, opset):
    model = _chain(between, opset)
    w0 = model.graph.initializers["w0"].const_value.numpy().copy()
    result, p = _apply_exact(model)
    assert p.pairs == [("conv1", "conv2")]  # the second pair only
    np.testing.assert_array_equal(result.model.graph.initializers["w0"].const_value.numpy(), w0)


def test_branches_and_shared_weights_are_left_alone():
    model = _chain([RELU, RELU])
    # conv0's output also read by an extra output: a residual-like branch
    model.graph.outputs.append(model.graph.node("conv0").outputs[0])
    # conv2's weight shared with a second Conv
    graph = model.graph
    extra = ir.node("Conv", [graph.node("act1").outputs[0], graph.initializers["w2"]], name="conv2b")
    graph.append(extra)
    extra.outputs[0].name = "y2"
    graph.outputs.append(extra.outputs[0])
    p = EqualizePass()
    assert not p(model).modified and p.pairs == []


def _weight_error_int8(model, names):
    """Mean relative L2 error of per-tensor symmetric int8 over the named Convs' weights."""
    errs = []
    for node in model.graph:
        if node.op_type == "Conv" and node.name in names:
            w = node.inputs[1].const_value.numpy().astype(np.float64)
            s = np.abs(w).max() / 127
            errs.append(np.linalg.norm(w - np.round(w / s) * s) / np.linalg.norm(w))
    return float(np.mean(errs))


def _int8_weights(model):
    """A copy with every Conv weight rounded to per-tensor symmetric int8 and back (fake quantization)."""
    copy = ir.serde.deserialize_model(ir.to_proto(model))
    for node in copy.graph:
        if node.op_type == "Conv":
            v = node.inputs[1]
            w = v.const_value.numpy()
            s = np.abs(w).max() / 127
            v.const_value = ir.tensor((np.round(w / s) * s).astype(np.float32), name=v.name)
    return copy


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name, shape, pairs, error_drop", [
    ("rapidocr:det", "x:1,3,640,640", 18, 0.9), ("rapidocr:rec", "x:1,3,48,320", 3, 0.85)])
def test_ppocr_outputs_unchanged_and_int8_weight_error_drops(name, shape, pairs, error_drop):
    feeds = [{"x": render_page()}] if name.endswith("det") else [{"x": render_line(t)} for t in LINES[:3]]
    model = graphopt.optimize(name, opt_level=2, input_shapes=[shape]).model
    before = [run_ort(model, f)[0] for f in feeds]
    original = ir.serde.deserialize_model(ir.to_proto(model))
    p = EqualizePass()
    equalized = p(model).model
    assert len(p.pairs) == pairs  # HardSwish (x * clip(x + 3, 0, 6) / 6) stops the others
    after = [run_ort(equalized, f)[0] for f in feeds]
    for a, b in zip(after, before):
        # fp32 only: rounding every Conv weight by one ulp at random moves det's map by 4e-5
        assert np.abs(a - b).max() <= 2e-4 * np.abs(b).max()
        assert np.abs(a - b).mean() <= 1e-6 * np.abs(b).max()
    names = {n for pair in p.pairs for n in pair}
    assert _weight_error_int8(equalized, names) < error_drop * _weight_error_int8(original, names)
    if name.endswith("det"):  # the whole model with per-tensor int8 weights: closer to fp32
        cos_before = _cosine(run_ort(_int8_weights(original), feeds[0])[0], before[0])
        cos_after = _cosine(run_ort(_int8_weights(equalized), feeds[0])[0], before[0])
        assert cos_after > cos_before + 0.03


def test_equalize_function_returns_the_model():
    model = _chain([RELU, RELU])
    assert equalize(model) is model

"""Static QDQ insertion: the layout (per-channel int8 weights, int32 bias, shared scales, fused
activations), error bounds derived from the scales, opset handling, and the catalog's real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.front import api

from graphopt.compression import calibration as cal
from graphopt.core.errors import UnsupportedError
from graphopt.passes.graphopt_ops import run_ort
from graphopt.passes.quantize_qdq import QuantizeQDQPass, calibration_targets
from graphopt.passes.rewrite_utils import const_array
from tests.passes.graph_testing import model_from_text

RNG = np.random.default_rng(3)


def _calibrated(model: ir.Model, arrays: dict[str, np.ndarray], tmp_path, method="minmax", **kw) -> QuantizeQDQPass:
    np.savez(tmp_path / "calib.npz", **arrays)
    data = cal.load_calibration(tmp_path / "calib.npz", model)
    hists = cal.collect(model, calibration_targets(model, kw.get("exclude", ())), data)
    return QuantizeQDQPass(cal.ranges(hists, method), **kw)


def _valid(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _producer(model, name):
    return next(n for n in model.graph if any(o.name == name for o in n.outputs))


def _consumers(model, name):
    return [n for n in model.graph if any(v is not None and v.name == name for v in n.inputs)]


def test_single_conv_error_is_within_the_bound_the_scales_give(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,6,8,8] y) { y = Conv <pads = [1,1,1,1]> (x, w, b) }"""
    w = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32) * np.array([1, 0.1, 3, 0.5, 2, 0.01], np.float32)[:, None, None, None]
    b = RNG.standard_normal(6).astype(np.float32)
    model = model_from_text(text, w=w, b=b)
    xs = RNG.standard_normal((4, 1, 4, 8, 8)).astype(np.float32)
    p = _calibrated(model, {"x": xs}, tmp_path)
    p(model)
    _valid(model)
    wdq = _producer(model, model.graph.node(len(model.graph) - 1).inputs[1].name)
    s_w = const_array(wdq.inputs[1])
    assert wdq.attributes.get_int("axis") == 0 and s_w.shape == (6,)
    np.testing.assert_allclose(s_w, np.abs(w).max(axis=(1, 2, 3)) / 127, rtol=1e-6)
    s_x = float(const_array(_producer(model, "x_dequantized").inputs[1]))
    # |y_q - y| <= sum|w| s_x/2 + sum|x| s_w/2 + K s_x s_w/4 + bias rounding s_x s_w/2, per output
    for x in xs:
        y = run_ort(model_from_text(text, w=w, b=b), {"x": x})[0]
        yq = run_ort(model, {"x": x})[0]
        cols = np.lib.stride_tricks.sliding_window_view(np.pad(np.abs(x[0]), ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
        sum_x = cols.sum(axis=(0, 3, 4))  # [8, 8]: sum of |x| under each window
        sum_w = np.abs(w).sum(axis=(1, 2, 3))
        k = 4 * 9
        bound = (sum_w[:, None, None] * s_x / 2 + s_w[:, None, None] / 2 * sum_x[None] + k * s_x * s_w[:, None, None] / 4
                 + s_x * s_w[:, None, None] / 2)
        assert np.all(np.abs(yq - y)[0] <= bound * 1.001 + 1e-6)
        assert np.abs(yq - y).max() > 0  # it really is quantized


NET = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,10] y) {
  c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  p = MaxPool <kernel_shape = [3,3], pads = [1,1,1,1]> (r1)
  c2 = Conv <pads = [1,1,1,1]> (p, w2, b2)
  a = Add (c2, p)
  f = Flatten (a)
  y = Gemm (f, wg, bg)
}"""


def _net():
    return model_from_text(NET, w1=RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                           b1=RNG.standard_normal(8).astype(np.float32) * 0.1,
                           w2=RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
                           b2=RNG.standard_normal(8).astype(np.float32) * 0.1,
                           wg=RNG.standard_normal((512, 10)).astype(np.float32) * 0.05,
                           bg=RNG.standard_normal(10).astype(np.float32))


def test_layout_matches_the_standard_qdq_form(tmp_path):
    model = _net()
    ref = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    xs = RNG.standard_normal((6, 1, 4, 8, 8)).astype(np.float32)
    p = _calibrated(model, {"x": xs}, tmp_path, method="percentile")
    p(model)
    _valid(model)
    layers = [n for n in model.graph if n.op_type in ("Conv", "Gemm", "Add")]
    assert len(layers) == 4 and all(v.producer().op_type == "DequantizeLinear" for n in layers for v in n.inputs)
    for n in layers[:2]:  # Conv: weight per output channel, bias int32 with scale s_x * s_w
        wdq, bdq, xdq = n.inputs[1].producer(), n.inputs[2].producer(), n.inputs[0].producer()
        assert wdq.inputs[0].dtype == ir.DataType.INT8 and wdq.attributes.get_int("axis") == 0
        assert not const_array(wdq.inputs[2]).any()
        assert bdq.inputs[0].dtype == ir.DataType.INT32
        np.testing.assert_allclose(const_array(bdq.inputs[1]), const_array(xdq.inputs[1]) * const_array(wdq.inputs[1]),
                                   rtol=1e-6)
    assert layers[3].inputs[1].producer().attributes.get_int("axis") == 1  # Gemm [K, N]: per column
    # Relu belongs to the first Conv: no pair between them; MaxPool shares its input's scale
    assert [c.op_type for c in _consumers(model, "c1")] == ["Relu"]
    q_r1, q_p = (_consumers(model, n)[0] for n in ("r1", "p"))
    assert q_r1.op_type == q_p.op_type == "QuantizeLinear" and q_r1.inputs[1] is q_p.inputs[1]
    assert [v.name for v in model.graph.outputs] == ["y"] and _producer(model, "y").op_type == "Gemm"
    for x in xs[:2]:
        a, b = run_ort(ref, {"x": x})[0], run_ort(model, {"x": x})[0]
        assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_exclude_by_name_or_op_type_and_int8_activations(tmp_path):
    model = _net()
    names = [n.name for n in model.graph]
    conv2 = next(n for n in model.graph if n.outputs[0].name == "c2")
    conv2.name = "second"
    p = _calibrated(model, {"x": RNG.standard_normal((3, 1, 4, 8, 8)).astype(np.float32)}, tmp_path,
                    exclude=("second", "Gemm"), activation_type="int8")
    p(model)
    _valid(model)
    assert const_array(conv2.inputs[1]) is not None and conv2.inputs[1].dtype == ir.DataType.FLOAT
    gemm = _producer(model, "y")
    assert gemm.inputs[1].producer() is None  # float weight, no DequantizeLinear
    zps = [const_array(n.inputs[2]) for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and z == 0 for z in zps)
    assert len(names) == len([n for n in model.graph if n.op_type not in ("QuantizeLinear", "DequantizeLinear")])


LEGACY = """<ir_version: 4, opset_import: ["" : 9]>
g (float[1,3,8,8] x) => (float[1,5] y) {
  c = Conv <pads = [1,1,1,1]> (x, w)
  r = Relu (c)
  m = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r)
  f = Flatten (m)
  y = Gemm <transB = 1> (f, g, h)
}"""


def _legacy(text=LEGACY):
    return model_from_text(text, w=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
                           g=RNG.standard_normal((5, 64)).astype(np.float32), h=np.zeros(5, np.float32))


def test_opset_9_is_raised_to_13_and_gemm_transb_is_per_row(tmp_path):
    model = _legacy()
    p = _calibrated(model, {"x": RNG.standard_normal((2, 1, 3, 8, 8)).astype(np.float32)}, tmp_path)
    p(model)
    _valid(model)
    assert model.opset_imports[""] == 13
    assert _producer(model, "y").inputs[1].producer().attributes.get_int("axis") == 0


def test_per_tensor_weights_where_opset_13_is_not_exact(tmp_path):
    text = LEGACY.replace('"" : 9', '"" : 11').replace("=> (float[1,5] y)", "=> (float[1,5,1] y)").replace(
        "y = Gemm <transB = 1> (f, g, h)", "e = Gemm <transB = 1> (f, g, h)\n  u = Unsqueeze <axes = [2]> (e)\n"
        "  y = Softmax <axis = 1> (u)")
    model = _legacy(text)
    p = _calibrated(model, {"x": RNG.standard_normal((2, 1, 3, 8, 8)).astype(np.float32)}, tmp_path)
    p(model)
    _valid(model)
    assert model.opset_imports[""] == 11 and "Softmax" in p.opset_note[0]
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert dqs and all("axis" not in n.attributes and const_array(n.inputs[1]).ndim == 0 for n in dqs)


def test_old_opset_that_cannot_be_upgraded_is_unsupported(tmp_path):
    text = LEGACY.replace("r = Relu (c)", "r = Upsample <mode = \"nearest\"> (c, sc)").replace(
        "m = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r)", "m = MaxPool <kernel_shape = [4,4], strides = [4,4]> (r)")
    model = _legacy(text)
    model.graph.register_initializer(ir.Value(name="sc", const_value=ir.tensor(np.array([1, 1, 2, 2], np.float32))))
    p = _calibrated(model, {"x": RNG.standard_normal((1, 1, 3, 8, 8)).astype(np.float32)}, tmp_path)
    with pytest.raises(UnsupportedError, match="opset 9.*Upsample"):
        p(model)
    assert model.opset_imports[""] == 9


REAL = [  # (model, input shape, calibration kind, samples, least output cosine with fp32, or a check)
    ("rapidocr:rec", "x:1,3,48,320", "ocr-rec", 6, "argmax"),  # the decoded characters mostly agree
    ("rapidocr:det", "x:1,3,192,192", "ocr-det", 2, "boxes"),  # DB boxes of the text map agree
    ("rapidocr:cls", "x:1,3,48,192", "ocr-rec", 4, 0.99),
    ("light:resnet50", "gpu_0/data_0:1,3,224,224", None, 2, 0.99),
    ("light:squeezenet", "data_0:1,3,224,224", None, 2, 0.99),
]


@pytest.mark.parametrize("spec, shape, kind, samples, least", REAL, ids=[r[0] for r in REAL])
def test_catalog_models_quantize_to_valid_models_ort_runs(spec, shape, kind, samples, least, tmp_path):
    from graphopt.compression import evaluate

    model = api.optimize(api.load(spec, input_shapes=[shape])).model
    opset = model.opset_imports[""]
    path = tmp_path / "calib.npz"
    if kind:
        evaluate.write_calibration(kind, path, samples, seed=1, input_shape=shape)
    else:
        name, dims = shape.split(":")
        np.savez(path, **{name: RNG.random((samples, *map(int, dims.split(","))), dtype=np.float32)})
    data = cal.load_calibration(path, model)
    ref = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    hists = cal.collect(model, calibration_targets(model), data)
    QuantizeQDQPass(cal.ranges(hists))(model)
    proto = _valid(model)
    assert proto.opset_import[0].version >= max(opset, 11)
    sample = next(iter(data))
    for a, b in zip(run_ort(ref, sample), run_ort(model, sample)):
        if least == "argmax":  # rec: per time step character probabilities; the argmax is what is decoded
            assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
            continue
        if least == "boxes":  # det: a text probability map; DB post-processing turns it into boxes
            from graphopt.compression.evaluate.ocr_det import db_boxes, f1, match

            ba, bb = db_boxes(a[0, 0]), db_boxes(b[0, 0])
            assert len(ba) >= 2 and f1(match(bb, ba), len(bb), len(ba)) >= 0.8
            continue
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) >= least

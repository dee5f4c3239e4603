"""graphopt optimize --quantize/--weights and graphopt.front.api.quantize: end to end, the accuracy budget's
fallback on a model with one really sensitive layer, bias correction, int8-dynamic, and bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import api, cli
from graphopt.compression.compress import CompressOptions, compress, ort_run
from graphopt.core.errors import GraphoptError, UnsupportedError

RNG = np.random.default_rng(5)


def _mlp_proto(sensitive: bool = True) -> onnx.ModelProto:
    """x[4,16] -> g1 -> Relu -> g2 -> Relu -> g3 -> y. With ``sensitive``, hidden feature 0 is always 0
    and g2's weights from it are 1000: per-column int8 scales of 1000/127 round every other weight of g2
    to 0, so g2 alone ruins the output while g1 and g3 quantize well."""
    w1 = RNG.standard_normal((16, 32)).astype(np.float32) * 0.3
    b1 = RNG.standard_normal(32).astype(np.float32) * 0.1
    w2 = RNG.standard_normal((32, 32)).astype(np.float32) * 0.3
    if sensitive:
        w1[:, 0], b1[0], w2[0, :] = 0.0, -1.0, 1000.0
    w3 = RNG.standard_normal((32, 8)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"),
                                                         (np.full(32, 0.1, np.float32), "b2"),
                                                         (np.zeros(8, np.float32), "b3"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="g1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="g2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="g3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


FEEDS = [{"x": RNG.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]


def _cosine_metric(reference: onnx.ModelProto):
    sess = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    refs = [sess.run(None, f)[0] for f in FEEDS]

    def metric(run):
        cos = [float((r * run(f)["y"]).sum() / np.linalg.norm(r) / np.linalg.norm(run(f)["y"])) for r, f in zip(refs, FEEDS)]
        return max(0.0, float(np.mean(cos)))

    return metric


@pytest.fixture
def mlp(tmp_path):
    proto = _mlp_proto()
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.standard_normal((8, 4, 16)).astype(np.float32))
    return path, calib


def _run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_cli_int8_end_to_end(mlp, tmp_path, capsys):
    path, calib = mlp
    before = _sha(path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", path, "-o", out, "--quantize", "int8", "--calibration", calib,
                             "--calibration-method", "minmax", "--report", report)
    assert code == 0, err
    assert _sha(path) == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("Gemm") == 3
    assert {t.data_type for t in q.graph.initializer if t.name.endswith("_quantized")} == {TensorProto.INT8, TensorProto.INT32}
    ort.InferenceSession(out.as_posix(), providers=["CPUExecutionProvider"]).run(None, FEEDS[0])
    rows = json.loads(report.read_text())["compression"]["layers"]
    assert [(r["layer"], r["status"]) for r in rows] == [("g1", "int8"), ("g2", "int8"), ("g3", "int8")]
    assert "g2" in stdout and "int8" in stdout


def test_budget_fallback_keeps_the_sensitive_layer_float():
    proto = _mlp_proto()
    metric = _cosine_metric(proto)
    model = api.optimize(ir.serde.deserialize_model(proto)).model
    calib = {"x": np.stack([f["x"] for f in FEEDS])}
    opts = CompressOptions(quantize="int8", calibration=_tmp_npz(calib), method="minmax", max_drop=0.01, metric=metric)
    res = compress(model, opts)
    b = res.report["budget"]
    assert b["float"] == pytest.approx(1.0, abs=1e-5)
    assert b["float"] - b["all_quantized"] > 0.05  # over budget with every layer int8
    assert b["within_budget"] and b["float"] - b["final"] <= 0.01
    assert b["kept_float"] == ["g2"]
    assert max(b["sensitivity"], key=b["sensitivity"].get) == "g2"
    status = {r["layer"]: r["status"] for r in res.report["layers"]}
    assert status == {"g1": "int8", "g2": "float (budget)", "g3": "int8"}
    g2 = next(n for n in res.model.graph if n.name == "g2")
    assert g2.inputs[1].const_value is not None and g2.inputs[1].dtype == ir.DataType.FLOAT
    assert metric(_session_run(res.model)) >= b["float"] - 0.01


def _tmp_npz(arrays, _cache={}) -> str:  # noqa: B006 - one file per test process is enough
    import tempfile

    if "path" not in _cache:
        _cache["path"] = tempfile.mkstemp(suffix=".npz")[1]
    np.savez(_cache["path"], **arrays)
    return _cache["path"]


def _session_run(model: ir.Model):
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


METRIC_FILE = """
import numpy as np, onnxruntime as ort
_S = ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
_X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
_R = _S.run(None, {{"x": _X}})[0]
def cosine(run):
    y = run({{"x": _X}})["y"]
    return min(1.0, max(0.0, float((y * _R).sum() / np.linalg.norm(y) / np.linalg.norm(_R))))
def broken(run):
    raise ValueError("no labels here")
"""


def test_cli_budget_with_a_user_metric(mlp, tmp_path, capsys):
    path, calib = mlp
    (tmp_path / "mymetric.py").write_text(METRIC_FILE.format(path=str(path)))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", path, "-o", out, "--quantize", "int8", "--calibration", calib,
                             "--max-drop", "0.01", "--metric", f"{tmp_path / 'mymetric.py'}:cosine", "--report", report)
    assert code == 0, err
    budget = json.loads(report.read_text())["compression"]["budget"]
    assert budget["kept_float"] == ["g2"] and budget["within_budget"]
    assert "within budget, 1 layer kept float" in stdout


def _bad_npz(tmp_path, name, arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("case, expect", [
    ("name", "array 'z' names no model input"),
    ("dtype", "has dtype float64"),
    ("shape", "a sample has shape [4, 15]"),
    ("empty", "holds no samples"),
    ("nan", "contains NaN or inf"),
    ("budget0", "--max-drop 0.0: must be between 0 and 1"),
    ("budget1", "--max-drop 1.5: must be between 0 and 1"),
    ("metric", "raised ValueError"),
    ("nocal", "--quantize int8 needs --calibration"),
    ("noquant", "--calibration is used only by --quantize int8"),
    ("noop", "has no quantizable op"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(mlp, tmp_path, capsys, case, expect):
    path, calib = mlp
    x = RNG.standard_normal((3, 4, 16)).astype(np.float32)
    cal = {"name": lambda: _bad_npz(tmp_path, "c.npz", {"z": x}),
           "dtype": lambda: _bad_npz(tmp_path, "c.npz", {"x": x.astype(np.float64)}),
           "shape": lambda: _bad_npz(tmp_path, "c.npz", {"x": x[:, :, :15]}),
           "empty": lambda: _bad_npz(tmp_path, "c.npz", {"x": x[:0]}),
           "nan": lambda: _bad_npz(tmp_path, "c.npz", {"x": np.where(np.arange(x.size).reshape(x.shape) == 70, np.nan, x)})}.get(case, lambda: calib)()
    args = ["--quantize", "int8", "--calibration", cal]
    if case.startswith("budget"):
        args += ["--max-drop", "0" if case == "budget0" else "1.5", "--metric", "cosine"]
    elif case == "metric":
        (tmp_path / "mymetric.py").write_text(METRIC_FILE.format(path=str(path)))
        args += ["--max-drop", "0.1", "--metric", f"{tmp_path / 'mymetric.py'}:broken"]
    elif case == "nocal":
        args = ["--quantize", "int8"]
    elif case == "noquant":
        args = ["--calibration", cal]
    elif case == "noop":
        relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])])
        path = tmp_path / "relu.onnx"
        onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 13)]), path)
    before = _sha(path)
    out = tmp_path / "q.onnx"
    code, _, err = _run(capsys, "optimize", path, "-o", out, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert not out.exists() and _sha(path) == before


def test_bias_correction_removes_the_mean_error(tmp_path):
    scales = np.array([4.0, 0.02, 0.05, 1.0], np.float32)[:, None, None, None]
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * scales
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    xs = (RNG.random((16, 1, 3, 8, 8)) + 0.5).astype(np.float32)  # positive mean: weight error biases the output
    np.savez(tmp_path / "c.npz", x=xs)
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = {}
    for corrected in (False, True):
        model = ir.serde.deserialize_model(proto)
        opts = CompressOptions(quantize="int8", calibration=tmp_path / "c.npz", method="minmax", per_channel=False,
                               bias_correction=corrected)
        run = _session_run(compress(model, opts).model)
        diff = np.stack([run({"x": x})["y"] - ref.run(None, {"x": x})[0] for x in xs])
        errors[corrected] = np.abs(diff.mean(axis=(0, 1, 3, 4)))  # mean error per channel
    assert errors[False].max() > 1e-3
    assert errors[True].max() < 0.3 * errors[False].max()


def test_int8_dynamic_matmul_gemm_and_lstm():
    hidden, feat = 16, 8
    inits = {"W": RNG.standard_normal((1, 4 * hidden, feat)), "R": RNG.standard_normal((1, 4 * hidden, hidden)) * 0.3,
             "M": RNG.standard_normal((hidden, 24)), "G": RNG.standard_normal((10, 24)), "C": RNG.standard_normal(10)}
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["seq", "last"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["last", "axes"], ["s"]),
             helper.make_node("MatMul", ["s", "M"], ["m"], name="mm"),
             helper.make_node("Gemm", ["m", "G", "C"], ["y"], transB=1, alpha=0.5, beta=2.0, name="gemm")]
    graph = helper.make_graph(nodes, "d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, feat])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
                              + [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    res = api.quantize(ir.serde.deserialize_model(proto), quantize="int8-dynamic")
    q = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2 and "Gemm" not in ops
    lstm = next(n for n in res.model.graph if n.op_type == "LSTM")
    assert all(lstm.inputs[i].producer().op_type == "DequantizeLinear" for i in (1, 2))
    assert {r["layer"] for r in res.report["layers"]} == {"lstm", "mm", "gemm"}
    x = {"x": RNG.standard_normal((5, 2, feat)).astype(np.float32)}
    a = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = _session_run(res.model)(x)["y"]
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_options_are_checked_before_any_work():
    with pytest.raises(GraphoptError, match="alternatives"):
        CompressOptions(quantize="int8-dynamic", weights="fp16").check()
    with pytest.raises(GraphoptError, match="--max-drop needs --metric"):
        CompressOptions(quantize="int8-dynamic", max_drop=0.1).check()
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(UnsupportedError, match="no quantizable op"):
        compress(ir.serde.deserialize_model(helper.make_model(relu)), CompressOptions(quantize="int8-dynamic"))


@pytest.mark.parametrize("args, dtype", [(["--weights", "fp16"], TensorProto.FLOAT16),
                                         (["--quantize", "int8-weights"], TensorProto.INT8)])
def test_cli_dispatches_weight_conversion_and_weight_only_quantization(tmp_path, capsys, args, dtype):
    w = RNG.standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(w, "w")])
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, _, err = _run(capsys, "optimize", path, "-o", out, *args)
    assert code == 0, err
    q = onnx.load(out)
    assert dtype in {t.data_type for t in q.graph.initializer}
    x = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    y = ort.InferenceSession(out.as_posix(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    ref = x["x"] @ w
    assert float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref)) > 0.9995


def test_layers_get_unique_names_for_exclusion_and_the_report():
    from graphopt.compression.compress import name_nodes

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Relu", ["a"], ["b"], name="same"),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    name_nodes(model)
    names = [n.name for n in model.graph]
    assert names[0] == "same" and len(set(names)) == 3 and all(names)


# pruning (--prune channels|magnitude, --reconstruct, one budget with --quantize)

def _conv_proto(sensitive_c1: bool = True) -> onnx.ModelProto:
    """x[1,3,8,8] -> c1 (3x3, 8) -> Relu -> c2 (1x1, 8) -> Relu -> c3 (1x1, 4) -> y. Half of c2's channels
    are dead (zero weights in and out), so pruning them costs nothing; every c1 channel matters."""
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    w2[4:], w3[:, 4:] = 0, 0
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"),
                                                         (np.full(8, 0.1, np.float32), "b1"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], name="c2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="c3")]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


CONV_FEEDS = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]


def _conv_cosine(reference: onnx.ModelProto):
    sess = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    refs = [sess.run(None, f)[0] for f in CONV_FEEDS]

    def metric(run):
        ys = [run(f)["y"] for f in CONV_FEEDS]
        return max(0.0, float(np.mean([(r * y).sum() / np.linalg.norm(r) / np.linalg.norm(y) for r, y in zip(refs, ys)])))

    return metric


@pytest.fixture
def convs(tmp_path):
    path = tmp_path / "convs.onnx"
    onnx.save(_conv_proto(), path)
    calib = tmp_path / "ccalib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in CONV_FEEDS]))
    return path, calib


def test_prune_budget_restores_the_sensitive_group_then_quantizes_within_the_same_budget():
    proto = _conv_proto()
    metric = _conv_cosine(proto)
    model = api.optimize(ir.serde.deserialize_model(proto)).model
    calib = _tmp_npz({"x": np.stack([f["x"] for f in CONV_FEEDS])})
    opts = CompressOptions(prune="channels:0.5", quantize="int8", calibration=calib, method="minmax",
                           max_drop=0.02, metric=metric)
    res = compress(model, opts)
    p = res.report["prune"]
    assert p["budget"]["all_pruned"] < 0.98  # pruning c1 costs more than the budget
    assert p["budget"]["restored"] == ["c1"] and p["budget"]["within_budget"]
    assert p["budget"]["sensitivity"]["c1"] > 0.02 > abs(p["budget"]["sensitivity"]["c2"])
    rows = {r["group"]: r for r in p["layers"]}
    assert rows["c1"]["status"] == "kept (budget)" and rows["c2"]["status"] == "pruned" and rows["c2"]["kept"] == 4
    assert 0 < p["flops"]["reduction"] < 1
    assert res.report["budget"]["float"] == pytest.approx(1.0, abs=1e-5)  # quantization measured against unpruned
    assert 1.0 - metric(ort_run(res.model)) <= 0.02


def test_cli_prune_reconstruct_and_quantize(convs, tmp_path, capsys):
    path, calib = convs
    before = _sha(path)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", path, "-o", out, "--prune", "channels:0.5", "--reconstruct",
                             "--calibration", calib, "--quantize", "int8", "--report", report)
    assert code == 0, err
    assert _sha(path) == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    y = ort.InferenceSession(out.as_posix(), providers=["CPUExecutionProvider"]).run(None, CONV_FEEDS[0])[0]
    assert y.shape == (1, 4, 8, 8)
    p = json.loads(report.read_text())["compression"]["prune"]
    assert {r["group"]: r["kept"] for r in p["layers"]} == {"c1": 4, "c2": 4, "c3": 4}
    assert p["reconstructed"] == 2 and p["flops"]["reduction"] > 0.3  # c2 and c3 lost input channels: refitted
    assert "8 -> 4" in stdout and "FLOPs" in stdout


def test_cli_magnitude_reports_the_compressed_size(convs, tmp_path, capsys):
    path, _ = convs
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", path, "-o", out, "--prune", "magnitude:0.6:global", "--report", report)
    assert code == 0, err
    p = json.loads(report.read_text())["compression"]["prune"]
    assert p["gzip_bytes"]["after"] < p["gzip_bytes"]["before"] and 0.55 < p["sparsity"] < 0.65
    assert "no CPU runtime runs the model faster" in stdout


@pytest.mark.parametrize("args, expect", [
    (["--prune", "channels:1.0"], "ratio 1.0 is outside [0, 1)"),
    (["--prune", "channels:-0.2"], "outside [0, 1)"),
    (["--prune", "shuffle:0.3"], "expected channels:R or magnitude:R"),
    (["--prune", "channels:0.3:global"], "unknown option 'global'"),
    (["--prune", "channels:0.3", "--exclude", "nosuch"], "--exclude nosuch: no node or op type"),
    (["--prune", "channels:0.3", "--prune-layer", "nosuch=0.1"], "layer nosuch is not a node"),
    (["--prune", "channels:0.3", "--prune-layer", "c1=2"], "outside [0, 1)"),
    (["--prune", "channels:0.3", "--reconstruct"], "--reconstruct applies to --prune channels:R and needs --calibration"),
    (["--prune", "channels:0.3", "--exclude", "Conv"], "no layer can be pruned"),
    (["--prune-layer", "c1=0.2"], "--prune-layer needs --prune"),
])
def test_prune_bad_input_exits_2_with_one_line(convs, tmp_path, capsys, args, expect):
    path, _ = convs
    out = tmp_path / "p.onnx"
    code, _, err = _run(capsys, "optimize", path, "-o", out, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert not out.exists()


def test_cli_adaround_and_share_tolerance(mlp, tmp_path, capsys):
    path, calib = mlp
    out = tmp_path / "q.onnx"
    code, stdout, err = _run(capsys, "optimize", path, "-o", out, "--quantize", "int8", "--calibration", calib,
                             "--adaround", "--share-tolerance", "0.5")
    assert code == 0, err
    assert "adaround:" in stdout and "layers rounded better than nearest" in stdout
    assert "shared within tolerance 0.5:" in stdout
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    code, _, err = _run(capsys, "optimize", path, "-o", tmp_path / "r.onnx", "--share-tolerance", "1.5")
    assert code == 2 and "--share-tolerance 1.5: must be between 0 and 1" in err

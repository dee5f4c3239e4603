"""graphopt.compression.evaluate: real-label metrics on rendered text with the real PP-OCRv4 models, run in ONNX Runtime.

The fp32 models must score high and a model with one conv's weights scaled by 0.3 clearly lower, so the
metrics can fail; the pieces (CTC decoding, edit distance, box matching, labelling) are checked on
hand-made values.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.compression import evaluate
from graphopt.front.cli import main
from graphopt.core.errors import GraphoptError
from graphopt.compression.evaluate import ocr_det, ocr_rec, render
from graphopt.compression.evaluate.base import ort_runner
from graphopt.models import resolve

REC_LINES = 60
DET_PAGES = 5


def damaged(spec: str, path, conv_index: int = 3, factor: float = 0.3) -> str:
    """A copy of ``spec`` with the weights of its ``conv_index``-th Conv scaled by ``factor``."""
    proto = onnx.load(str(resolve(spec)))
    tensors = {t.name: t for t in proto.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"})
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][conv_index]
    t = tensors[conv.input[1]]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(proto, str(path))
    return str(path)


@pytest.fixture(scope="module")
def rec_metric():
    return evaluate.resolve_metric("ocr-rec", "rapidocr:rec", samples=REC_LINES)


@pytest.fixture(scope="module")
def rec_fp32(rec_metric):
    return rec_metric.measure(ort_runner("rapidocr:rec"))


def test_fp32_recognizer_reads_rendered_lines(rec_fp32):
    assert rec_fp32["samples"] == REC_LINES
    assert rec_fp32["score"] >= 0.95
    assert rec_fp32["exact"] >= 0.85 * REC_LINES
    texts = [s["text"] for s in rec_fp32["per_sample"]]
    assert len(set(texts)) == REC_LINES and all(t.strip() == t and t for t in texts)
    assert any(c.isdigit() for t in texts for c in t) and any(c in ".,:;!?$%#@()-/" for t in texts for c in t)


def test_damaged_recognizer_scores_clearly_lower(rec_metric, rec_fp32, tmp_path):
    bad = rec_metric.measure(ort_runner(damaged("rapidocr:rec", tmp_path / "rec.onnx")))
    assert bad["score"] < rec_fp32["score"] - 0.01
    assert bad["exact"] <= rec_fp32["exact"] - 5


@pytest.fixture(scope="module")
def det_metric(tmp_path_factory):
    bad = damaged("rapidocr:det", tmp_path_factory.mktemp("det") / "det.onnx")
    metric = evaluate.resolve_metric("ocr-det", bad, reference_path="rapidocr:det", samples=DET_PAGES)
    return metric, bad


def test_detector_box_f1_against_known_boxes_and_reference(det_metric):
    metric, bad = det_metric
    fp32 = metric.measure(metric.reference_run)  # the reference's boxes, computed once
    assert fp32["known_boxes"]["f1"] >= 0.95 and fp32["known_boxes"]["expected"] >= 4 * DET_PAGES
    assert fp32["score"] == 1.0  # against its own boxes
    worse = metric.measure(ort_runner(bad))
    assert worse["known_boxes"]["f1"] <= fp32["known_boxes"]["f1"] - 0.03
    assert worse["score"] <= 0.97


def test_cosine_is_one_against_itself_and_lower_when_damaged(tmp_path):
    same = evaluate.evaluate("rapidocr:rec", "cosine", reference_path="rapidocr:rec", samples=2)
    assert same["score"] == pytest.approx(1.0, abs=1e-9)
    bad = evaluate.evaluate(damaged("rapidocr:rec", tmp_path / "r.onnx", conv_index=10), "cosine",
                            reference_path="rapidocr:rec", samples=2)
    assert bad["score"] < 0.9
    with pytest.raises(GraphoptError, match="cosine: needs a reference"):
        evaluate.resolve_metric("cosine", "rapidocr:rec")


def test_cosine_reads_real_inputs_from_npz(tmp_path):
    path = tmp_path / "lines.npz"
    evaluate.write_calibration("ocr-rec", path, 2, seed=3)
    with np.load(path) as z:
        np.savez(tmp_path / "flat.npz", x=z["x"])
    result = evaluate.evaluate("rapidocr:rec", "cosine", reference_path="rapidocr:rec", data=tmp_path / "flat.npz")
    assert result["samples"] == 2 and result["score"] == pytest.approx(1.0, abs=1e-9)
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 1, 3, 48, 320), np.float32))
    with pytest.raises(GraphoptError, match="no array for input x"):
        evaluate.resolve_metric("cosine", "rapidocr:rec", reference_path="rapidocr:rec", data=tmp_path / "wrong.npz")


def test_cosine_on_a_model_without_an_image_input_asks_for_data(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 16])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(GraphoptError, match="give its real inputs with --data"):
        evaluate.resolve_metric("cosine", path, reference_path=path)
    np.savez(tmp_path / "a.npz", a=np.random.default_rng(0).standard_normal((3, 1, 16)).astype(np.float32))
    result = evaluate.evaluate(path, "cosine", reference_path=path, data=tmp_path / "a.npz")
    assert result["samples"] == 3 and result["score"] == pytest.approx(1.0)


def test_user_metric_callable_and_failures():
    def top_prob(run):
        _, x = ocr_rec.line_samples(1, 0, None, 48, 320)
        return float(next(iter(run({"x": x}).values())).max(-1).mean())

    assert 0.5 < evaluate.resolve_metric(top_prob, "rapidocr:rec")(ort_runner("rapidocr:rec")) <= 1.0

    def broken(run):
        raise KeyError("no such output")

    with pytest.raises(GraphoptError, match="raised KeyError"):
        evaluate.resolve_metric(broken, "rapidocr:rec")(ort_runner("rapidocr:rec"))
    with pytest.raises(GraphoptError, match="returned 3.0, expected a number in"):
        evaluate.resolve_metric(lambda run: 3.0, "rapidocr:rec")(lambda feeds: {})
    with pytest.raises(GraphoptError, match="unknown metric"):
        evaluate.resolve_metric("accuracy", "rapidocr:rec")


def test_ctc_greedy_decoding_on_hand_made_probabilities():
    table = ocr_rec.decode_table(["a", "b", "c"])  # 0 blank, 1 a, 2 b, 3 c, 4 space
    steps = [1, 1, 0, 1, 2, 2, 4, 3, 0, 0, 3]  # a a _ a b b ' ' c _ _ c -> "aab cc"
    probs = np.full((len(steps), 5), 0.01, np.float32)
    probs[np.arange(len(steps)), steps] = 0.96
    assert ocr_rec.ctc_greedy_decode(probs, table) == ["aab cc"]
    assert ocr_rec.ctc_greedy_decode(np.stack([probs, probs[::-1]]), table) == ["aab cc", "cc baa"]
    with pytest.raises(GraphoptError, match=r"expected \[N, T, 5\]"):
        ocr_rec.ctc_greedy_decode(probs[:, :4], table)
    assert ocr_rec.edit_distance("kitten", "sitting") == 3 and ocr_rec.edit_distance("", "ab") == 2
    scored = ocr_rec.score_lines(["abcd", "xy"], ["  abed ", "xy"])
    assert scored["score"] == pytest.approx(1 - 1 / 6) and scored["exact"] == 1


def test_box_matching_and_labelling():
    truth = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    pred = np.array([[1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    assert ocr_det.match(pred, truth) == 1  # one truth box, matched once; the duplicate does not count
    assert ocr_det.f1(1, 3, 2) == pytest.approx(0.4) and ocr_det.f1(0, 0, 0) == 1.0
    mask = np.random.default_rng(0).random((40, 50)) > 0.55
    from scipy import ndimage

    ref = ndimage.label(mask, structure=np.ones((3, 3)))[0]
    mine = ocr_det.label_numpy(mask)
    pairs = set(zip(ref[mask].tolist(), mine[mask].tolist()))
    assert len(pairs) == ref.max() == len(np.unique(mine[mask]))  # the same partition
    prob = np.zeros((40, 60), np.float32)
    prob[10:20, 10:50] = 0.9
    prob[30:32, 10:50] = 0.9  # 2 px high: under DB's minimum size
    prob[34:38, 10:20] = 0.4  # above the threshold, under the box score
    (box,) = ocr_det.db_boxes(prob)
    d = 40 * 10 * 1.5 / (2 * 50)  # DB unclip distance: area * ratio / perimeter
    np.testing.assert_allclose(box, [10 - d, 10 - d, 50 + d, 20 + d], rtol=1e-6)


def test_calibration_is_deterministic_and_apart_from_the_evaluation_set(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    info = evaluate.write_calibration("ocr-rec", a, 3, seed=0, model="rapidocr:rec")
    evaluate.write_calibration("ocr-rec", b, 3, seed=0, input_shape="x:1,3,48,320")
    assert info["shape"] == [3, 1, 3, 48, 320]
    with np.load(a) as za, np.load(b) as zb:
        assert list(za.files) == ["x"] and np.array_equal(za["x"], zb["x"])
        assert np.isfinite(za["x"]).all() and -1.0 <= za["x"].min() and za["x"].max() <= 1.0
    eval_texts, _ = ocr_rec.line_samples(40, 0, None, 48, 320)
    calib_texts, _ = ocr_rec.line_samples(40, 0, None, 48, 320, purpose=render.CALIBRATION)
    assert not set(eval_texts) & set(calib_texts)
    evaluate.write_calibration("ocr-det", a, 1, seed=1, input_shape="img:2,3,64,96")
    with np.load(a) as z:
        assert z["img"].shape == (1, 2, 3, 64, 96)


def test_cli_exit_codes_and_output(tmp_path, capsys):
    assert main(["evaluate", "rapidocr:rec", "--metric", "ocr-rec", "--samples", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "ocr-rec" and out["samples"] == 3 and 0 <= out["score"] <= 1
    assert main(["evaluate", "rapidocr:rec", "--metric", "no-such-metric"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.onnx"), "--metric", "ocr-rec"]) == 2
    assert main(["evaluate", "rapidocr:det", "--metric", "ocr-rec"]) == 2
    assert "no 'character' metadata" in capsys.readouterr().err
    user = tmp_path / "mymetric.py"
    user.write_text("def bad(run):\n    raise RuntimeError('boom')\n\ndef one(run):\n    return 1.0\n")
    assert main(["evaluate", "rapidocr:rec", "--metric", f"{user}:bad"]) == 2
    assert "raised RuntimeError: boom" in capsys.readouterr().err
    assert main(["evaluate", "rapidocr:rec", "--metric", f"{user}:one"]) == 0
    assert main(["evaluate", "rapidocr:rec", "--metric", f"{user}:absent"]) == 2
    calib = tmp_path / "calib.npz"
    assert main(["evaluate", "rapidocr:rec", "--metric", "ocr-rec", "--write-calibration", str(calib),
                 "--count", "2"]) == 0
    with np.load(calib) as z:
        assert z["x"].shape == (2, 1, 3, 48, 320)
    assert main(["evaluate", "--metric", "ocr-det", "--write-calibration", str(tmp_path), "--count", "1"]) == 2


def test_cli_imports_a_module_metric_from_the_current_directory_and_never_writes_over_the_model(tmp_cwd, capsys):
    (tmp_cwd / "scores.py").write_text("def half(run):\n    return 0.5\n")
    assert main(["evaluate", "rapidocr:rec", "--metric", "scores:half", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 0.5
    assert main(["evaluate", "rapidocr:rec", "--metric", "no_such_module:f"]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err
    model = tmp_cwd / "rec.onnx"
    model.write_bytes(resolve("rapidocr:rec").read_bytes())
    before = model.read_bytes()
    assert main(["evaluate", str(model), "--metric", "ocr-rec", "--write-calibration", str(model)]) == 2
    assert "refusing to overwrite an input" in capsys.readouterr().err and model.read_bytes() == before

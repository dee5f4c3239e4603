"""graphopt search: the configuration search within an accuracy budget, and optimize --config."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.compression.evaluate import resolve_metric
from graphopt.compression.evaluate.base import ort_runner
from graphopt.front.cli import main

SPACE = {"quantize": ["none", "int8"], "calibration-method": ["percentile"], "prune": [0, 0.3],
         "reconstruct": [False], "fallback": [False, True]}
MAX_DROP = 0.005


def convnet() -> onnx.ModelProto:
    """x[1,3,32,32] -> 3x3 conv 64 -> 3x3 conv 64 -> 1x1 conv 64 (Relu after each) -> GAP -> Gemm 10."""
    rng = np.random.default_rng(0)

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w(64, 3, 3, 3), "w1"), (np.full(64, 0.05, np.float32), "b1"), (w(64, 64, 3, 3), "w2"),
        (np.zeros(64, np.float32), "b2"), (w(64, 64, 1, 1), "w3"), (w(10, 64), "wf"), (np.zeros(10, np.float32), "bf"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["h3"], name="c3"),
             helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    onnx.save(convnet(), d / "conv.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", x=rng.standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    np.savez(d / "data.npz", x=rng.standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    (d / "space.json").write_text(json.dumps(SPACE))
    return d


def _search_argv(d, out, *extra):
    return ["search", str(d / "conv.onnx"), "--metric", "cosine", "--data", str(d / "data.npz"),
            "--calibration", str(d / "calib.npz"), "--max-drop", str(MAX_DROP), "--budget", "5m",
            "--repeat", "5", "--threads", "1", "-o", str(out), *extra]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched(files):
    """One search over SPACE for the smallest model (5 configurations measured, 2 skipped); its directory,
    stdout and stderr."""
    out = files / "s"
    buf_out, buf_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err  # not terminals: no bar
    try:
        code = main(_search_argv(files, out, "--space", str(files / "space.json"), "--objective", "size"))
    finally:
        sys.stdout, sys.stderr = old
    assert code == 0, buf_err.getvalue()
    return out, buf_out.getvalue(), buf_err.getvalue()


def _rows(out):
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_search_measures_each_configuration_and_the_fallback_brings_pruning_within_budget(searched):
    out, stdout, stderr = searched
    rows = _rows(out)
    assert set(rows) == {"none", "int8/percentile", "none channels:0.3", "none channels:0.3 fallback@0.005",
                         "int8/percentile channels:0.3 fallback@0.005"}
    base, pruned = rows["none"], rows["none channels:0.3"]
    assert base["drop"] == 0 and base["score"] == pytest.approx(1.0, abs=1e-6)
    assert pruned["drop"] > MAX_DROP and pruned["flops"] < 0.7 * base["flops"]  # over budget alone
    fb = rows["none channels:0.3 fallback@0.005"]
    assert fb["drop"] <= MAX_DROP and fb["flops"] < base["flops"] and len(fb["left_unpruned"]) >= 1  # brought within
    assert rows["int8/percentile"]["bytes"] < 0.35 * base["bytes"]
    for r in rows.values():
        assert r["latency_ms"] > 0 and 0 < r["gzip_bytes"] < r["bytes"]
    # skipped (pruning more than an over-budget configuration; a fallback of a within-budget one), not stored
    assert "int8/percentile channels:0.3" not in rows and "int8/percentile fallback@0.005" not in rows
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 5 and "| **best** | int8/percentile channels:0.3 fallback@0.005 |" in table
    assert "- int8/percentile channels:0.3: none channels:0.3 is already over budget" in table
    assert stderr == "" and "\r" not in stdout  # not a terminal: no bar, one line per configuration
    assert stdout.count(" budget), ") == 5 and "best: int8/percentile channels:0.3 fallback@0.005" in stdout


def test_png_is_valid(searched):
    from PIL import Image

    with Image.open(searched[0] / "pareto.png") as im:
        im.verify()
    with Image.open(searched[0] / "pareto.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 500


def test_rerun_does_no_new_work(searched, files, capsys):
    out = searched[0]
    before = (out / "results.jsonl").read_bytes()
    code, stdout, err = _run(capsys, *_search_argv(files, out, "--space", files / "space.json", "--objective", "size"))
    assert code == 0, err
    assert (out / "results.jsonl").read_bytes() == before
    assert stdout.startswith("0 configurations measured now, 5 in all, 2 skipped, 0 left")
    narrow = files / "narrow.json"  # a narrower space: nothing new; the table still lists every configuration
    narrow.write_text(json.dumps({"quantize": ["int8"], "calibration-method": ["percentile"], "prune": [0],
                                  "fallback": [False]}))
    code, stdout, err = _run(capsys, *_search_argv(files, out, "--space", narrow, "--objective", "size"))
    assert code == 0 and stdout.startswith("0 configurations measured now, 5 in all, 0 skipped, 0 left"), err
    assert (out / "table.md").read_text().count("\n| ") == 1 + 5
    assert "| **best** | int8/percentile channels:0.3 fallback@0.005 |" in (out / "table.md").read_text()


def test_an_interrupted_search_resumes_with_the_configuration_it_was_on(searched, files, capsys):
    out = files / "interrupted"
    shutil.copytree(searched[0], out)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    (out / "results.jsonl").write_text("".join(lines[:-1]) + lines[-1][:25])  # cut while writing the last line
    code, stdout, err = _run(capsys, *_search_argv(files, out, "--space", files / "space.json", "--objective", "size"))
    assert code == 0, err
    assert stdout.count(" budget), ") == 1 and stdout.startswith(last["label"] + ": score ")  # only that one again
    text = (out / "results.jsonl").read_text().splitlines()
    assert text[-2] == lines[-1][:25]  # the cut line is left behind; the measurement follows on a line of its own
    assert json.loads(text[-1])["score"] == pytest.approx(last["score"], abs=1e-6)
    assert len(text) == 6 and [json.loads(t)["key"] for t in text[:-2]] == [json.loads(t)["key"] for t in lines[:-1]]


def test_rerun_with_other_settings_is_refused(searched, files, capsys):
    argv = _search_argv(files, searched[0], "--space", files / "space.json")
    argv[argv.index("--threads") + 1] = "2"  # another latency measurement
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "holds a search with latency" in err


def test_best_json_round_trips_through_optimize_config(searched, files, capsys):
    out = searched[0]
    best = json.loads((out / "best.json").read_text())
    row = _rows(out)["int8/percentile channels:0.3 fallback@0.005"]
    assert best["prune"] == "channels:0.3" and best["quantize"] == "int8" and "max-drop" not in best
    assert best["prune-layer"] == [f"{g}=0" for g in row["left_unpruned"]]  # what the fallback decided
    model = files / "best.onnx"
    code, _, err = _run(capsys, "optimize", files / "conv.onnx", "--config", out / "best.json", "-o", model, "-q")
    assert code == 0, err
    metric = resolve_metric("cosine", files / "conv.onnx", reference_path=files / "conv.onnx",
                            data=files / "data.npz")
    assert metric(ort_runner(model)) == pytest.approx(row["score"], abs=1e-6)  # the same model as measured
    assert abs(model.stat().st_size - row["bytes"]) < 0.01 * row["bytes"]


def test_over_budget_configuration_is_never_best(files, capsys):
    """int8 pruned 30% is the smallest and fastest, but over the budget: int8 alone is best."""
    space = files / "space2.json"
    space.write_text(json.dumps({"quantize": ["int8"], "calibration-method": ["percentile"], "prune": [0, 0.3],
                                 "reconstruct": [False], "fallback": [False]}))
    out = files / "s2"
    code, stdout, err = _run(capsys, *_search_argv(files, out, "--space", space, "--objective", "size", "-q"))
    assert code == 0, err
    rows = _rows(out)
    over, best = rows["int8/percentile channels:0.3"], rows["int8/percentile"]
    assert over["drop"] > MAX_DROP and over["bytes"] < best["bytes"]
    assert json.loads((out / "best.json").read_text()) == {
        "opt-level": 2, "quantize": "int8", "calibration-method": "percentile",
        "calibration": str((files / "calib.npz").resolve())}
    assert "| **best** | int8/percentile |" in (out / "table.md").read_text()
    assert stdout.count("\n") == 1 and stdout.startswith("best: int8/percentile: ")  # -q: the result only
    # no configuration within a budget smaller than every drop: exit 2 naming the closest one
    shutil.rmtree(out)
    space.write_text(json.dumps({"quantize": ["none"], "prune": [0.3], "reconstruct": [False], "fallback": [False]}))
    argv = _search_argv(files, out, "--space", space, "-q")
    argv[argv.index("--max-drop") + 1] = "0.0001"
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "no configuration within --max-drop 0.0001; closest: none channels:0.3" in err
    assert (out / "table.md").is_file() and not (out / "best.json").exists()


def test_progress_bar_on_a_terminal_only(files, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    space = files / "space3.json"
    space.write_text(json.dumps({"quantize": ["fp16"], "prune": [0]}))
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(_search_argv(files, files / "s3", "--space", str(space))) == 0
    assert "search" in err.getvalue() and "config" in err.getvalue()  # the tqdm bar was drawn


@pytest.mark.parametrize("space, message", [
    ('{"quantise": ["int8"]}', "unknown key 'quantise'"),
    ('{"quantize": ["int9"]}', "'quantize' value 'int9': expected one of"),
    ('{"prune": [1.5]}', "'prune' value 1.5: expected a pruning ratio in [0, 1)"),
    ('{"prune": []}', "'prune' must be a non-empty list"),
    ("[1, 2]", "expected a JSON object of lists"),
    ("{not json", "not valid JSON"),
])
def test_bad_space_file_exits_2(files, capsys, space, message):
    path = files / "bad_space.json"
    path.write_text(space)
    out = files / "never"
    code, _, err = _run(capsys, *_search_argv(files, out, "--space", path))
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--budget", "soon"], "--budget soon: expected a duration"),
    (["--max-drop", "1.5"], "--max-drop 1.5: must be between 0 and 1"),
    (["--metric", "nosuch"], "--metric nosuch: unknown metric"),
])
def test_bad_options_exit_2(files, capsys, argv, message):
    base = _search_argv(files, files / "never2")
    for opt, value in zip(argv[::2], argv[1::2]):
        if opt in base:
            base[base.index(opt) + 1] = value
        else:
            base += [opt, value]
    code, _, err = _run(capsys, *base)
    assert code == 2 and message in err


@pytest.mark.parametrize("config, message", [
    ({"quantise": "int8"}, "unknown key 'quantise'"),
    ({"quantize": "int9"}, "key 'quantize': 'int9': expected one of"),
    ({"reconstruct": "yes"}, "key 'reconstruct': expected one of True"),
    ({"opt-level": 7}, "key 'opt-level': expected one of 0, 1, 2, 3"),
    ({"percentile": "high"}, "key 'percentile': 'high' is not a valid float"),
])
def test_optimize_config_bad_key_or_value_exits_2(files, capsys, config, message):
    path = files / "bad_config.json"
    path.write_text(json.dumps(config))
    out = files / "never.onnx"
    code, _, err = _run(capsys, "optimize", files / "conv.onnx", "--config", path, "-o", out)
    assert code == 2 and message in err and f"--config {path}" in err
    assert not out.exists()


def test_optimize_flag_overrides_config_even_at_its_default(files, capsys):
    path = files / "cfg.json"
    path.write_text(json.dumps({"quantize": "int8", "calibration": str(files / "calib.npz"),
                                "calibration-method": "minmax", "exclude": ["c3"], "opt-level": 1}))
    report = files / "r.json"
    code, _, err = _run(capsys, "optimize", files / "conv.onnx", "--config", path, "--calibration-method",
                        "percentile", "-o", files / "c.onnx", "-q", "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["compression"]["method"] == "percentile"  # the flag, though it equals the default
    assert r["opt_level"] == 1 and {"layer": "c3", "op": "", "status": "float (excluded)"} in r["compression"]["layers"]
    code, _, err = _run(capsys, "optimize", files / "conv.onnx", "--config", path, "-o", files / "c.onnx", "-q",
                        "--report", report)
    assert code == 0 and json.loads(report.read_text())["compression"]["method"] == "minmax"


# the goal configuration on PP-OCRv4 rec (docs/compression.md): the backbone pruned 20%, the neck and
# squeeze-excite groups kept, reconstructed on 64 rendered lines; minutes of reconstruction
REC_KEPT = ["p2o.MatMul.8", "p2o.MatMul.20", "p2o.Conv.33", "p2o.Conv.35", "p2o.Conv.36", "p2o.Conv.37",
            "p2o.Conv.22", "p2o.Conv.26"]


@pytest.mark.slow
def test_rec_backbone_pruning_with_reconstruction_keeps_accuracy_and_without_it_does_not(tmp_path, capsys):
    from graphopt.compression.evaluate import write_calibration

    calib = tmp_path / "rec_calib.npz"
    write_calibration("ocr-rec", calib, 64, input_shape="x:1,3,48,320", model="rapidocr:rec")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"quantize": ["none"], "prune": [0.2], "reconstruct": [False, True],
                                 "fallback": [False], "prune-layer": [[f"{n}=0" for n in REC_KEPT]]}))
    out = tmp_path / "s"
    code, stdout, err = _run(capsys, "search", "rapidocr:rec", "--input-shape", "x:1,3,48,320", "--metric", "ocr-rec",
                             "--max-drop", "0.01", "--budget", "60m", "--calibration", calib, "--space", space,
                             "--repeat", "10", "-o", out)
    assert code == 0, err
    rows = list(_rows(out).values())
    base = next(r for r in rows if r["key"] == "none")
    rec = next(r for r in rows if r["config"]["reconstruct"])
    plain = next(r for r in rows if r["config"]["prune"] and not r["config"]["reconstruct"])
    assert rec["flops"] <= 0.75 * base["flops"] and plain["flops"] == rec["flops"]  # >= 25% of FLOPs removed
    assert rec["drop"] <= 0.01  # character accuracy within 1 point of the float model
    assert plain["score"] < rec["score"] - 0.1  # the same pruning without reconstruction reads far worse
    assert json.loads((out / "best.json").read_text())["reconstruct"] is True

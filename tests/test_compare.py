"""graphopt compare: node counts, latency and accuracy of original / onnxslim / graphopt -O3."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.front.cli import main
from graphopt.front.compare import compare_model, to_markdown
from graphopt.core.errors import UsageError


def _write_model(path):
    """A small model with work for both tools: a BN after a conv, a no-op, a HardSwish chain (opset 13)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "s"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "m"),
        numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "v"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Identity", ["bn"], ["i"]),
        helper.make_node("Add", ["i", "three"], ["a3"]),
        helper.make_node("Clip", ["a3", "zero", "six"], ["cl"]),
        helper.make_node("Mul", ["i", "cl"], ["mu"]),
        helper.make_node("Div", ["mu", "six"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, 16, 16])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_compare_model_counts_and_accuracy(tmp_path):
    path = _write_model(tmp_path / "m.onnx")
    row = compare_model(str(path), input_shapes=["x:1,3,16,16"], runs=3, threads=1)
    orig, slim, ours, ort = (row.results[t] for t in ("original", "onnxslim", "graphopt", "graphopt-ort"))
    assert orig.nodes == 7 and orig.max_abs_diff == 0.0
    assert slim.error is None and ours.error is None and ort.error is None
    assert ours.nodes < slim.nodes <= orig.nodes  # HardSwish fusion is what onnxslim lacks
    assert ort.nodes == ours.nodes  # Conv+HardSwish: ONNX Runtime's FusedConv has no HardSwish
    assert max(ours.max_abs_diff, ort.max_abs_diff, slim.max_abs_diff) < 1e-4
    assert all(r.latency_ms > 0 for r in (orig, slim, ours, ort))
    md = to_markdown([row])
    assert md.splitlines()[0].startswith("| model |") and str(path) in md


def test_cli_json_and_markdown(tmp_path, capsys):
    path = _write_model(tmp_path / "m.onnx")
    out = tmp_path / "cmp.json"
    code = main(["compare", str(path), "--input-shape", "x:1,3,16,16", "--runs", "2", "--threads", "1",
                 "--json", str(out), "--markdown"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("| model |")
    data = json.loads(out.read_text())
    assert data[0]["graphopt"]["nodes"] < data[0]["original"]["nodes"]


def test_missing_model_is_a_usage_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx" in capsys.readouterr().err
    with pytest.raises(UsageError):
        compare_model(str(tmp_path / "nope.onnx"))


def test_a_failing_tool_is_reported_in_its_row(tmp_path, monkeypatch):
    import graphopt.front.compare as cmp

    def broken(path, shapes):
        raise RuntimeError("slim exploded")

    monkeypatch.setattr(cmp, "_slim", broken)
    path = _write_model(tmp_path / "m.onnx")
    row = compare_model(str(path), input_shapes=["x:1,3,16,16"], runs=2, threads=1)
    assert row.results["onnxslim"].error == "RuntimeError: slim exploded"
    assert row.results["onnxslim"].nodes is None
    assert row.results["graphopt"].nodes is not None and row.results["graphopt"].max_abs_diff < 1e-4
    assert "error" in to_markdown([row])


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    assert main(["compare", str(bad)]) == 2

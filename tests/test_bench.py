"""``graphopt bench`` end to end on a tiny model: the JSON fields, the profile, usage errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.front.cli import main

N, C, H, W, O, K = 1, 8, 12, 12, 16, 3


@pytest.fixture
def tiny_model(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((O, C, K, K)).astype(np.float32) * 0.1, "w")
    b = numpy_helper.from_array(rng.standard_normal(O).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, O, H, W])], [w, b],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bench_json_fields(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", str(tiny_model), "--threads", "1", "--repeat", "3", "--warmup", "1",
               "--json", str(out), "--profile", "--plot", str(tmp_path / "bench.png")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "tiny.onnx" in printed and "time per function" in printed
    (r,) = json.loads(out.read_text())
    from graphopt.front.bench import RESULT_FIELDS

    assert set(RESULT_FIELDS) <= set(r)
    assert r["threads"] == 1 and r["repeat"] == 3 and r["target"] == "x86" and r["untuned"] is False
    g, o = r["graphopt"], r["ort"]
    assert 0 < g["min_ms"] <= g["median_ms"] <= g["max_ms"]
    assert 0 < o["min_ms"] <= o["median_ms"] <= o["max_ms"]
    assert r["ratio"] == pytest.approx(g["median_ms"] / o["median_ms"], rel=1e-2)
    assert r["ratio_min"] == pytest.approx(g["min_ms"] / o["min_ms"], rel=1e-2)
    macs = N * O * H * W * C * K * K
    assert r["flops"] >= 2 * macs
    assert r["gflops"] == pytest.approx(r["flops"] / (g["median_ms"] * 1e6), rel=1e-2)
    assert r["schedules"].get("conv2d", 0) >= 1, r["schedules"]
    shares = [p["share"] for p in r["profile"]]
    assert r["profile"] and sum(shares) == pytest.approx(1.0, abs=0.01) and shares == sorted(shares, reverse=True)
    # the VM's builtins are one row (run time minus kernels), not what instrumenting them measured
    assert not any(p["function"].startswith("vm.builtin.") for p in r["profile"])
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_untuned_without_ort(tiny_model, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_model), "--threads", "1", "--repeat", "2", "--warmup", "0",
                 "--untuned", "--against", "none", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["untuned"] is True and r["schedules"] == {} and r["ort"] is None and r["ratio"] is None


def test_bench_usage_errors(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.onnx"), "--repeat", "0"]) == 2


def test_bench_a_bundle_against_its_source(tiny_model, tmp_path):
    from graphopt.front import api

    bundle = tmp_path / "tiny.bundle"
    api.compile(str(tiny_model), output=bundle)
    out = tmp_path / "b.json"
    assert main(["bench", str(bundle), "--threads", "1", "--repeat", "2", "--warmup", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["target"] == "x86" and r["ort"] is not None and r["ratio"] > 0  # ORT runs the recorded source


def test_graphopt_and_ort_take_turns_in_blocks(monkeypatch):
    import graphopt.core.timing
    from graphopt.core.timing import BLOCK, interleaved

    monkeypatch.setattr(graphopt.core.timing, "SETTLE_SECONDS", 0.0)  # one untimed run per turn

    order = []

    def timer(name):
        def run(n):
            order.append((name, n))
            return [0.001] * n
        return run

    out = interleaved({"graphopt": timer("g"), "ort": timer("o")}, repeat=2 * BLOCK + 1, warmup=0)
    assert [len(v) for v in out.values()] == [2 * BLOCK + 1] * 2
    start = next(i for i, (_, n) in enumerate(order) if n == BLOCK) - 1  # after the warm-up calls
    # per turn: one untimed run, then a block; the sides alternate, the last turn times the rest
    assert order[start:] == [("g", 1), ("g", BLOCK), ("o", 1), ("o", BLOCK)] * 2 + [("g", 1), ("g", 1), ("o", 1), ("o", 1)]


def test_each_turn_settles_for_a_while_before_timing():
    import time

    from graphopt.core.timing import SETTLE_SECONDS, _settle

    calls = []
    start = time.perf_counter()
    _settle(lambda n: calls.append(n) or [0.0] * n)
    assert time.perf_counter() - start >= SETTLE_SECONDS and len(calls) > 1


def test_bench_with_a_tuning_database_times_default_and_tuned(tiny_model, tmp_path):
    import graphopt

    db = tmp_path / "db"
    graphopt.front.api.tune(str(tiny_model), trials=0, search_candidates=3, tuning_db=db, progress=None)
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    assert main(["bench", str(tiny_model), "--threads", "1", "--repeat", "3", "--warmup", "1",
                 "--tuning-db", str(db), "--json", str(out), "--markdown", str(md)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["tuning_db"] == str(db) and r["default"]["median_ms"] > 0 and r["graphopt"]["median_ms"] > 0
    assert r["ratio_default"] == pytest.approx(r["default"]["median_ms"] / r["ort"]["median_ms"], rel=1e-2)
    t = r["tuning"]
    assert t["functions"] >= 1 and t["searched"] >= 1 and t["candidates"] >= 2, t
    text = md.read_text()
    assert "default schedules median ms" in text and "MetaSchedule trials" in text


def test_a_bundle_is_compared_with_its_own_source_from_any_directory(tiny_model, tmp_path, monkeypatch, capsys):
    """The manifest records the source's absolute path and sha256: bench finds it from another directory,
    and a source changed since compiling is not silently timed in ORT as if it were the bundle's model."""
    import shutil

    from graphopt.front.bench import _model_source

    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(tiny_model, work / "m.onnx")
    monkeypatch.chdir(work)
    assert main(["compile", "m.onnx", "-o", "b"]) == 0
    source = json.loads((work / "b" / "manifest.json").read_text())["source"]
    assert source["path"] == str(work / "m.onnx")
    monkeypatch.chdir(tmp_path)
    assert _model_source(str(work / "b"), [])[0] == str(work / "m.onnx")
    capsys.readouterr()
    (work / "m.onnx").write_bytes((work / "m.onnx").read_bytes() + b"\n")  # no longer the compiled model
    assert _model_source(str(work / "b"), [])[0] is None
    assert "changed since compiling" in capsys.readouterr().err

"""graphopt's schedule search: rule decisions as knobs, coordinate descent, records, compile applies them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.schedules import Knobs, features_of, schedule_with_knobs
from graphopt.backends.tuning.search import neighbours, search_schedule


def _conv_model(path=None, c=16, o=32, hw=14, k=1):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((o, c, k, k)) * 0.2).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4), helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, hw, hw])], [w, b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, path)
    return model


def _conv_func(model):
    import tvm

    from graphopt.backends.compile import fused_module
    from graphopt.backends.schedules.prepack import constant_params

    mod = fused_module(ir.from_proto(model), "x86")
    (gv, func), = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func, constant_params(mod).get(gv.name_hint, frozenset())


def test_knobs_take_a_valid_choice_and_ignore_others():
    k = Knobs({"rt": 4, "plan": "nonsense"})
    assert k.pick("rt", 7, (1, 2, 4, 7)) == 4
    assert k.pick("plan", "channel", ("channel", "width")) == "channel"  # not an option: the default
    assert k.pick("vt", 8) == 8
    assert k.taken == {"rt": 4, "plan": "channel", "vt": 8}
    assert k.options["rt"] == (7, 1, 2, 4) and k.options["vt"] == (8,)
    assert neighbours({"a": 1, "b": "x"}, {"a": (1, 2, 3), "b": ("x", "y")}) == [
        {"a": 2, "b": "x"}, {"a": 3, "b": "x"}, {"a": 1, "b": "y"}]


def test_rule_decisions_are_knobs_and_a_choice_changes_the_schedule():
    func, consts = _conv_func(_conv_model(c=16, o=32, hw=14))
    feats = features_of(graphopt.backends.targets.get_target("x86"))
    default, rule, knobs = schedule_with_knobs(func, feats, consts)
    assert rule == "conv2d"
    assert {"plan", "rt", "parallel"} <= set(knobs.taken), knobs.taken
    assert all(knobs.taken[n] in opts for n, opts in knobs.options.items())
    assert len(knobs.options["rt"]) > 1 and set(knobs.options["plan"]) == {"channel", "width"}
    other = next(v for v in knobs.options["rt"] if v != knobs.taken["rt"])
    changed, _, k2 = schedule_with_knobs(func, feats, consts, {**knobs.taken, "rt": other})
    assert k2.taken["rt"] == other
    assert not _structurally_equal(default, changed)
    again, _, _ = schedule_with_knobs(func, feats, consts, dict(knobs.taken))  # the defaults, as a record
    assert _structurally_equal(default, again)


def _structurally_equal(a, b) -> bool:
    from tvm_ffi import structural_equal

    return bool(structural_equal(a, b))


def test_coordinate_descent_finds_the_fastest_decisions_and_counts_candidates():
    """A fake measurement: fastest with the largest register tile and a parallel loop (this small conv
    is serial by default); the search must find both, one decision at a time."""
    func, consts = _conv_func(_conv_model(c=16, o=32, hw=14))
    feats = features_of(graphopt.backends.targets.get_target("x86"))
    _, _, knobs = schedule_with_knobs(func, feats, consts)
    best_rt = max(knobs.options["rt"])
    calls = []

    def measure(funcs):
        out = []
        for f in funcs:
            text = f.script()
            calls.append(text)
            parallel = "T.parallel" in text
            out.append(1.0 - 0.3 * parallel + (0.5 if f"T.unroll(T.int64({best_rt}))" not in text else 0.0))
        return out

    r = search_schedule(func, feats, consts, measure, max_candidates=40)
    assert knobs.taken["parallel"] == 0 and knobs.taken["rt"] != best_rt, knobs.taken
    assert r.choice["parallel"] != 0 and r.choice["rt"] == best_rt, r.choice
    assert r.secs == pytest.approx(0.7) and r.default_secs > r.secs
    assert r.candidates == len(calls) <= 40
    small = search_schedule(func, feats, consts, measure, max_candidates=3)
    assert small.candidates == 3


def test_tune_records_decisions_reuses_them_and_compile_applies_them(tmp_path):
    db = tmp_path / "db"
    a = tmp_path / "a.onnx"
    model = _conv_model(a, c=16, o=32, hw=14)
    first = graphopt.front.api.tune(a, trials=0, search_candidates=6, tuning_db=db, progress=None)
    (s,) = [s for s in first.schedules if s.rule == "conv2d"]
    assert not s.reused and 1 < s.candidates <= 6 and s.best_ms <= s.default_ms
    records = json.loads((db / "graphopt_schedules.json").read_text())["records"]
    assert len(records) == len(first.schedules) and records[0]["choice"] == s.choice
    second = graphopt.front.api.tune(a, trials=0, search_candidates=6, tuning_db=db, progress=None)
    assert all(r.reused for r in second.schedules) and second.trials_run == 0

    # a record made when the rules offered other decisions is searched again
    for r in records:
        r["space"] = "an older set of decisions"
    (db / "graphopt_schedules.json").write_text(json.dumps({"version": 1, "records": records}))
    third = graphopt.front.api.tune(a, trials=0, search_candidates=6, tuning_db=db, progress=None)
    assert not any(r.reused for r in third.schedules) and all(r.candidates > 1 for r in third.schedules)
    records = json.loads((db / "graphopt_schedules.json").read_text())["records"]
    assert all(r["space"] != "an older set of decisions" for r in records)

    # compile applies the recorded decisions: force one that the default would not take (serial)
    from graphopt.backends.tuning import database_hash

    before = database_hash(db)
    for r in records:
        r["choice"]["parallel"] = 0
    (db / "graphopt_schedules.json").write_text(json.dumps({"version": 1, "records": records}))
    assert database_hash(db) != before  # the bundle manifest's hash covers graphopt's decisions too
    compiled = graphopt.compile(a, tuning_db=db, opt_level=2)
    x = np.random.default_rng(2).standard_normal((1, 16, 14, 14)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(compiled(x)["y"], want, rtol=1e-4, atol=1e-4)


def test_metaschedule_record_is_used_only_where_it_measured_faster(tmp_path):
    import tvm

    from graphopt.backends.compile import fused_module
    from graphopt.backends.targets import get_target
    from graphopt.backends.tuning import apply_database

    db = tmp_path / "db"
    a = tmp_path / "a.onnx"
    model = _conv_model(a, c=8, o=16, hw=10, k=3)
    graphopt.front.api.tune(a, trials=4, max_trials_per_task=4, search_candidates=2, tuning_db=db, progress=None)
    spec = get_target("x86")
    mod = fused_module(ir.from_proto(model), spec)

    def scheduled_by_metaschedule(graphopt_secs):
        path = db / "graphopt_schedules.json"
        data = json.loads(path.read_text())
        for r in data["records"]:
            r["secs"] = graphopt_secs
        path.write_text(json.dumps(data))
        out, choices = apply_database(mod, spec.target, db)
        return {gv.name_hint for gv, f in out.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "tirx.is_scheduled" in f.attrs}

    assert "conv2d" in " ".join(scheduled_by_metaschedule(1e3))  # graphopt's 1000 s: MetaSchedule's wins
    assert not scheduled_by_metaschedule(1e-12)  # graphopt's faster everywhere: no MetaSchedule schedule


def test_tvm_threads_default_to_physical_cores(monkeypatch):
    from graphopt.backends.bundle.loader import physical_cores, use_physical_cores

    n = physical_cores()
    assert 1 <= n <= __import__("os").cpu_count()
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    use_physical_cores()
    assert __import__("os").environ["TVM_NUM_THREADS"] == str(n)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    use_physical_cores()
    assert __import__("os").environ["TVM_NUM_THREADS"] == "1"  # the user's setting wins


def test_a_build_past_its_timeout_is_an_error_and_the_worker_comes_back():
    """A candidate that hangs LLVM must not hang tuning: it times out, the next one builds."""
    import time

    import tvm

    from graphopt.backends.tuning import builder as b

    func, _ = _conv_func(_conv_model(c=8, o=8, hw=6))
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    target = graphopt.backends.targets.get_target("x86").target
    cb = b.CandidateBuilder(timeout=60)
    try:
        (path, err), = cb.build([(mod, target)])
        assert err is None and path.endswith(".so")
        cb.timeout = 0.001  # no build can meet it
        cb.close()
        t0 = time.perf_counter()
        (path, err), = cb.build([(mod, target)])
        assert path is None and "timed out" in err and time.perf_counter() - t0 < 30
        cb.timeout = 60
        cb.close()
        (path, err), = cb.build([(mod, target)])
        assert err is None
    finally:
        cb.close()

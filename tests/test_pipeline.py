"""The pass manager (graphopt.core.pipeline): context, fixpoints, instruments, verification, registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes import default_registry
from graphopt.core.errors import PassError, UsageError
from graphopt.core.pipeline import (
    DumpInstrument,
    Fixpoint,
    PassContext,
    PassRegistry,
    StatsInstrument,
    Step,
    VerifyInstrument,
    run_pipeline,
    steps_from_names,
)
from graphopt.core.pipeline.levels import DEFAULT_PIPELINE, pipeline_pass_names


def _model() -> ir.Model:
    m = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] z) <float[3] b = {1.0, 2.0, 3.0}> {
          y = Relu(x)
          i = Identity(y)
          z = Add(i, b)
        }
        """
    )
    for k, n in enumerate(m.graph):
        n.name = f"{n.op_type.lower()}_{k}"
    return m


# --- tiny passes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Log:
    calls: list = dataclasses.field(default_factory=list)


class Counting(ir.passes.InPlacePass):
    """Counts its runs; claims to modify the model for its first ``modify_rounds`` runs."""

    def __init__(self, log: Log, name: str, modify_rounds: int = 0):
        super().__init__()
        self.log, self.name, self.modify_rounds = log, name, modify_rounds

    def call(self, model):
        self.log.calls.append(self.name)
        return ir.passes.PassResult(model, self.log.calls.count(self.name) <= self.modify_rounds)


class RemoveIdentity(ir.passes.InPlacePass):
    """Removes Identity nodes, rewiring their users (a correct pass)."""

    def call(self, model):
        modified = False
        for node in list(model.graph):
            if node.op_type == "Identity":
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                modified = True
        return ir.passes.PassResult(model, modified)


class BreakGraph(ir.passes.InPlacePass):
    """Points the Add at a value nothing defines (a buggy pass)."""

    def call(self, model):
        add = next(n for n in model.graph if n.op_type == "Add")
        add.replace_input_with(0, ir.Value(name="ghost"))
        return ir.passes.PassResult(model, True)


class Crash(ir.passes.InPlacePass):
    def call(self, model):
        raise RuntimeError("boom")


class Scaled(ir.passes.InPlacePass):
    """A pass with an option, to test ``create(name, options)``."""

    def __init__(self, factor: int = 1):
        super().__init__()
        self.factor = factor

    def call(self, model):
        return ir.passes.PassResult(model, False)


def _registry(log: Log, **modify_rounds: int) -> PassRegistry:
    reg = PassRegistry()
    for name in ("a", "b", "c", "low", "high"):
        reg.register(name, lambda name=name: Counting(log, name, modify_rounds.get(name, 0)))
    reg.register("remove_identity", RemoveIdentity)
    reg.register("break", BreakGraph)
    reg.register("crash", Crash)
    return reg


# --- PassContext ----------------------------------------------------------------------------------


def test_context_levels_disabled_forced():
    ctx = PassContext(opt_level=1, disabled=["a"], forced=["high", "a"])
    assert ctx.enabled("low", 1) and not ctx.enabled("other", 2)
    assert ctx.enabled("high", 3)  # forced above the level
    assert not ctx.enabled("a", 0)  # disabled wins over forced and level
    assert isinstance(ctx.disabled, frozenset) and isinstance(ctx.forced, frozenset)


@pytest.mark.parametrize("kwargs", [{"opt_level": 4}, {"opt_level": -1}, {"max_fixpoint_iterations": 0}])
def test_context_bounds(kwargs):
    with pytest.raises(UsageError):
        PassContext(**kwargs)


def test_context_options_are_copies():
    ctx = PassContext(options={"a": {"k": 1}})
    opts = ctx.pass_options("a")
    opts["k"] = 2
    assert ctx.pass_options("a") == {"k": 1} and ctx.pass_options("b") == {}


def test_verify_default_follows_the_environment(monkeypatch):
    assert PassContext().verify  # the test suite's conftest sets GRAPHOPT_VERIFY_EACH_PASS=1
    monkeypatch.setenv("GRAPHOPT_VERIFY_EACH_PASS", "0")
    assert not PassContext().verify


# --- running steps --------------------------------------------------------------------------------


def test_steps_run_by_level_and_in_order():
    log = Log()
    steps = (Step("a", 1), Step("high", 3), Step("b", 2), Step("low", 0))
    run_pipeline(_model(), steps, PassContext(opt_level=2), _registry(log))
    assert log.calls == ["a", "b", "low"]
    log.calls.clear()
    run_pipeline(_model(), steps, PassContext(opt_level=2, forced={"high"}, disabled={"b"}), _registry(log))
    assert log.calls == ["a", "high", "low"]


def test_explicit_pass_list_ignores_levels():
    log = Log()
    run_pipeline(_model(), steps_from_names(["high", "a"]), PassContext(opt_level=0), _registry(log))
    assert log.calls == ["high", "a"]


def test_fixpoint_stops_when_nothing_changes():
    log = Log()
    fp = Fixpoint("fp", (Step("a"), Step("b")))
    result = run_pipeline(_model(), (fp,), PassContext(), _registry(log, a=2))
    assert log.calls == ["a", "b"] * 3  # rounds 1-2 modify, round 3 confirms the fixpoint
    assert result.modified


def test_fixpoint_is_bounded_by_max_iterations():
    log = Log()
    fp = Fixpoint("fp", (Step("a"), Step("b")))
    result = run_pipeline(_model(), (fp,), PassContext(max_fixpoint_iterations=4), _registry(log, a=10**6))
    assert log.calls == ["a", "b"] * 4
    assert result.modified


def test_fixpoint_levels():
    log = Log()
    steps = (Fixpoint("fp", (Step("a", 1), Step("high", 3)), level=2),)
    run_pipeline(_model(), steps, PassContext(opt_level=1), _registry(log))
    assert log.calls == []  # the group's level is above -O1
    run_pipeline(_model(), steps, PassContext(opt_level=2), _registry(log))
    assert log.calls == ["a"]  # inner steps still obey their own levels
    assert not run_pipeline(_model(), steps, PassContext(opt_level=3), _registry(log)).modified


def test_default_pipeline_names_are_registered_builtins():
    reg = default_registry(plugins=False)
    assert set(pipeline_pass_names()) <= set(reg.names())
    assert any(isinstance(s, Fixpoint) for s in DEFAULT_PIPELINE)


# --- instruments ----------------------------------------------------------------------------------


class Recorder:
    def __init__(self, tag: str, events: list):
        self.tag, self.events = tag, events

    def before_pass(self, name, model):
        self.events.append((self.tag, "before", name, len(model.graph)))

    def after_pass(self, name, model, modified):
        self.events.append((self.tag, "after", name, len(model.graph), modified))


def test_instruments_wrap_every_pass_in_order():
    events: list = []
    ctx = PassContext(instruments=(Recorder("r1", events), Recorder("r2", events)))
    run_pipeline(_model(), steps_from_names(["remove_identity", "a"]), ctx, _registry(Log()))
    assert events == [
        ("r1", "before", "remove_identity", 3),
        ("r2", "before", "remove_identity", 3),
        ("r1", "after", "remove_identity", 2, True),
        ("r2", "after", "remove_identity", 2, True),
        ("r1", "before", "a", 2),
        ("r2", "before", "a", 2),
        ("r1", "after", "a", 2, False),
        ("r2", "after", "a", 2, False),
    ]


def test_verify_instrument_names_the_pass_that_broke_the_graph():
    events: list = []
    ctx = PassContext(instruments=(Recorder("r", events),))
    with pytest.raises(PassError) as info:
        run_pipeline(_model(), steps_from_names(["a", "break", "b"]), ctx, _registry(Log()))
    assert info.value.pass_name == "break"
    msg = str(info.value)
    assert "pass 'break' left an invalid graph" in msg and "node 'add_2' (Add): input 'ghost'" in msg
    assert ("r", "before", "b", 3) not in events  # the pipeline stopped there


def test_without_verification_a_broken_graph_goes_through():
    result = run_pipeline(_model(), steps_from_names(["break"]), PassContext(verify=False), _registry(Log()))
    assert result.modified and result.records[0].name == "break"


def test_verify_instrument_check_types_flag():
    m = _model()
    relu = m.graph[0]
    relu.outputs[0].shape, relu.outputs[0].dtype = ir.Shape([7, 7]), ir.DataType.FLOAT
    with pytest.raises(PassError, match="recorded as float32\\[7,7\\]"):
        VerifyInstrument().after_pass("p", m, True)
    VerifyInstrument(check_types=False).after_pass("p", m, True)  # structure alone is fine


def test_a_crashing_pass_becomes_a_pass_error():
    with pytest.raises(PassError, match="pass 'crash' failed: RuntimeError: boom") as info:
        run_pipeline(_model(), steps_from_names(["crash"]), PassContext(), _registry(Log()))
    assert info.value.pass_name == "crash"


def test_stats_records():
    m = _model()
    result = run_pipeline(m, steps_from_names(["a", "remove_identity"]), PassContext(), _registry(Log()))
    assert (result.initial_nodes, result.initial_parameter_bytes) == (3, 12)
    rows = [(r.name, r.modified, r.nodes, r.parameter_bytes) for r in result.records]
    assert rows == [("a", False, 3, 12), ("remove_identity", True, 2, 12)]
    assert all(r.seconds >= 0 for r in result.records)
    stats = StatsInstrument()
    stats.before_pass("x", m)
    m.graph.initializers["b"].const_value = ir.tensor(np.zeros(10, np.float32))
    stats.after_pass("x", m, True)
    assert stats.initial == (2, 12) and stats.records[0].parameter_bytes == 40


def test_dump_instrument_writes_modified_steps(tmp_path):
    ctx = PassContext(instruments=(DumpInstrument(tmp_path / "dump"),))
    run_pipeline(_model(), steps_from_names(["a", "remove_identity", "b"]), ctx, _registry(Log()))
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["02_remove_identity.txt"]
    text = (tmp_path / "dump" / files[0]).read_text()
    assert "Relu" in text and "Identity" not in text


# --- registry -------------------------------------------------------------------------------------


def test_registry_register_duplicate_unknown():
    reg = PassRegistry()
    reg.register("scaled", Scaled)
    assert "scaled" in reg and reg.info("scaled").source == "user"
    assert reg.info("scaled").description == "A pass with an option, to test ``create(name, options)``."
    with pytest.raises(UsageError, match="pass 'scaled' is already registered"):
        reg.register("scaled", Scaled)
    reg.register("scaled", Crash, replace=True)
    assert isinstance(reg.create("scaled"), Crash)
    reg.register("other", Scaled)
    with pytest.raises(UsageError, match=r"unknown pass 'nope' \(known: other, scaled\)"):
        reg.info("nope")
    with pytest.raises(UsageError, match="use letters"):
        reg.register("bad name!", Scaled)
    with pytest.raises(UsageError, match="must be a PassBase subclass or a callable"):
        reg.register("notcallable", 42)


def test_registry_create_with_options():
    reg = PassRegistry()
    reg.register("scaled", Scaled)
    assert reg.create("scaled", {"factor": 3}).factor == 3
    assert reg.create("scaled").factor == 1
    with pytest.raises(UsageError, match="pass 'scaled': bad options"):
        reg.create("scaled", {"nope": 1})
    reg.register("not_a_pass", lambda: object())
    with pytest.raises(PassError, match="is not an onnx_ir.passes.PassBase"):
        reg.create("not_a_pass")


def test_options_reach_passes_through_the_context():
    seen = []

    class Opt(ir.passes.InPlacePass):
        def __init__(self, k: int = 0):
            super().__init__()
            seen.append(k)

        def call(self, model):
            return ir.passes.PassResult(model, False)

    reg = PassRegistry()
    reg.register("opt", Opt)
    run_pipeline(_model(), steps_from_names(["opt", "opt"]), PassContext(options={"opt": {"k": 5}}), reg)
    assert seen == [5, 5]

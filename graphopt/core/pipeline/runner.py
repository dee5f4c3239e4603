"""Running an ordered list of steps under a PassContext."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphopt.core.errors import GraphoptError, PassError
from graphopt.core.pipeline.context import PassContext
from graphopt.core.pipeline.instruments import PassRecord, StatsInstrument, VerifyInstrument, count_nodes, parameter_stats
from graphopt.core.pipeline.registry import PassRegistry


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a pipeline, run when the context's opt level reaches ``level``."""

    name: str
    level: int = 1
    options: tuple[tuple[str, object], ...] = ()  # this step's pass options; the context's override them


@dataclasses.dataclass(frozen=True)
class Fixpoint:
    """A group of steps repeated until none modifies the model, at most ``ctx.max_fixpoint_iterations`` rounds."""

    name: str
    steps: tuple[Step, ...]
    level: int = 1


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    records: list[PassRecord]
    initial_nodes: int = 0
    initial_parameter_bytes: int = 0


def run_pipeline(
    model: ir.Model,
    steps: tuple | list,
    ctx: PassContext | None,
    registry: PassRegistry,
) -> PipelineResult:
    """Run ``steps`` (``Step``/``Fixpoint``) in order on ``model``; returns the model and the report rows."""
    from graphopt.core.io import check_external_tensors

    check_external_tensors(model)  # a short or missing weights file is named here, not inside a pass
    ctx = ctx or PassContext()
    stats = StatsInstrument()
    instruments = [*ctx.instruments]
    if ctx.verify:
        instruments.append(VerifyInstrument())
    instruments.append(stats)
    any_modified = False

    def run_one(step: Step) -> bool:
        nonlocal model
        p = registry.create(step.name, {**dict(step.options), **ctx.pass_options(step.name)})
        for inst in instruments:
            inst.before_pass(step.name, model)
        try:
            result = p(model)
        except GraphoptError:
            raise
        except Exception as e:
            raise PassError(f"pass '{step.name}' failed: {type(e).__name__}: {e}", pass_name=step.name) from e
        model = result.model
        for inst in instruments:
            inst.after_pass(step.name, model, result.modified)
        return result.modified

    for step in steps:
        if isinstance(step, Fixpoint):
            if step.level > ctx.opt_level and step.name not in ctx.forced:
                continue
            inner = [s for s in step.steps if ctx.enabled(s.name, s.level)]
            for _ in range(ctx.max_fixpoint_iterations):
                changed = False
                for s in inner:
                    changed |= run_one(s)
                any_modified |= changed
                if not changed:
                    break
        elif ctx.enabled(step.name, step.level):
            any_modified |= run_one(step)
    initial = stats.initial or (count_nodes(model), parameter_stats(model)[1])  # no pass ran
    return PipelineResult(model, any_modified, stats.records, initial[0], initial[1])


def steps_from_names(names: list[str]) -> tuple[Step, ...]:
    """An explicit ``--passes a,b,c`` list: run exactly these, in this order, whatever the level."""
    return tuple(Step(n, level=0) for n in names)

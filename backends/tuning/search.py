"""graphopt's schedule search: tuning that starts from graphopt's own rules.

MetaSchedule's default space plateaus near half the fp32 peak on these CPUs, below graphopt's
untuned rules on most convs. So tuning first searches the rules' own decisions (``Knobs``: plan,
vector and register tiles, loop order, parallel chunks): it measures the default schedule, then every
schedule one decision away from the best so far, and repeats from the new best (coordinate descent)
until nothing improves or ``max_candidates`` were measured. Each candidate is a complete schedule that
``compile`` reproduces from the recorded decisions alone.

Candidates are built in a worker that stays up between batches (``builder.py``) and measured with
MetaSchedule's runner, so a local run and the boards behind an RPC tracker measure alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence

from graphopt.backends.schedules import CPUFeatures, schedule_with_knobs
from graphopt.core.progress import Bar

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchResult:
    rule: str
    choice: dict
    secs: float | None
    default_secs: float | None
    candidates: int


def neighbours(taken: dict, options: dict) -> list[dict]:
    """Every set of decisions that differs from ``taken`` in exactly one."""
    return [{**taken, name: v} for name, opts in options.items() for v in opts if v != taken.get(name)]


def _key(choice: dict) -> str:
    return json.dumps(choice, sort_keys=True)


MIN_GAIN = 0.03  # a candidate must beat the best by this fraction (run-to-run noise is about that)


def search_schedule(func, feats: CPUFeatures, constants, measure: Callable[[Sequence], list],
                    *, max_candidates: int = 24, default_secs: float | None = None,
                    start: dict | None = None) -> SearchResult:
    """The best decisions found for ``func`` (``secs`` None when not even the default could run).

    ``default_secs``: the default schedule's run time when already measured; ``start``: decisions to
    measure beside the default and search from when faster (an earlier record).
    """
    default, rule, knobs = schedule_with_knobs(func, feats, constants)
    if default_secs is None:
        default_secs = measure([default])[0]
    best, best_secs, count = dict(knobs.taken), default_secs, 1
    seen = {_key(best)}
    best_options = dict(knobs.options)
    if start and best_secs is not None:
        f, _, k = schedule_with_knobs(func, feats, constants, start)
        if _key(k.taken) not in seen:
            seen.add(_key(k.taken))
            s = measure([f])[0]
            count += 1
            if s is not None and s < best_secs:
                best, best_options, best_secs = dict(k.taken), dict(k.options), s
    while count < max_candidates and best_secs is not None:
        batch = []
        for choice in neighbours(best, best_options):
            f, _, k = schedule_with_knobs(func, feats, constants, choice)
            if _key(k.taken) not in seen:  # a choice the rule could not take gives a schedule already seen
                seen.add(_key(k.taken))
                batch.append((dict(k.taken), dict(k.options), f))
        batch = batch[: max_candidates - count]
        if not batch:
            break
        secs = measure([f for _, _, f in batch])
        count += len(batch)
        improved = False
        for (taken, options, _), s in zip(batch, secs):
            if s is not None and s < best_secs * (1 - MIN_GAIN):
                best, best_options, best_secs, improved = taken, options, s, True
        if not improved:
            break
    return SearchResult(rule, best, best_secs, default_secs, count)


class Measurer:
    """Builds scheduled PrimFuncs (``builder.CandidateBuilder``) and times them with a MetaSchedule
    runner (local or RPC)."""

    def __init__(self, target, runner, builder):
        self.target, self.runner, self.builder = target, runner, builder

    def __call__(self, funcs: Sequence) -> list[float | None]:
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        from graphopt.backends.tuning.database import mean_seconds, workload_module

        built = self.builder.build([(workload_module(f), self.target) for f in funcs])
        device = "cpu" if self.target.kind.name == "llvm" else self.target.kind.name
        inputs, slots = [], []
        for i, (f, (path, err)) in enumerate(zip(funcs, built)):
            if path is None:  # a candidate that does not build is not a result
                log.debug("candidate %d did not build: %s", i, err)
                continue
            inputs.append(RunnerInput(path, device, ArgInfo.from_prim_func(f)))
            slots.append(i)
        out: list[float | None] = [None] * len(funcs)
        try:
            for i, fut in zip(slots, self.runner.run(inputs)):
                res = fut.result()
                if res.error_msg is None and res.run_secs:
                    out[i] = mean_seconds(res.run_secs)
                else:
                    log.debug("candidate %d did not run: %s", i, res.error_msg)
        finally:
            for inp in inputs:
                shutil.rmtree(os.path.dirname(inp.artifact_path), ignore_errors=True)
        return out


@dataclasses.dataclass
class ScheduleReport:
    """One fused function's search: its decisions, default and best run time, candidates measured."""

    name: str
    weight: int
    rule: str
    reused: bool
    candidates: int
    default_ms: float | None
    best_ms: float | None
    choice: dict

    @property
    def share_ms(self) -> float:
        """Milliseconds per model run at the best schedule (run time x calls)."""
        return (self.best_ms or 0.0) * self.weight


def call_counts(mod) -> dict[str, int]:
    """How many times the Relax functions of ``mod`` call each PrimFunc."""
    import tvm
    from tvm import relax

    counts: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and isinstance(e.args[0], tvm.ir.GlobalVar):
            counts[e.args[0].name_hint] = counts.get(e.args[0].name_hint, 0) + 1

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return counts


def search_module(mod, target, records, measure, *, max_candidates: int = 24, deadline: float | None = None,
                  log: Callable[[str], None] = lambda s: None, bar: bool = False) -> list[ScheduleReport]:
    """Search the decisions of every fused function of ``mod`` that a rule with decisions schedules.

    Functions with a record for ``target`` (from any model, made with the decisions the rules offer
    now) are reused. The others are measured at
    their default schedule first, then searched in order of their share of the model's run time
    (run time x calls) until ``deadline`` (``time.perf_counter()``); each result is saved at once.
    ``bar``: a progress bar over the functions on a terminal, ``log``'s lines printed above it.
    """
    import time

    import tvm

    from graphopt.backends.schedules import features_of, is_scheduled
    from graphopt.backends.schedules.prepack import constant_params
    from graphopt.backends.tuning.records import workload_key

    feats = features_of(target)
    consts, counts = constant_params(mod), call_counts(mod)
    unique: dict[str, list] = {}  # workload -> [name, func, constants, calls]
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        c = consts.get(gv.name_hint, frozenset())
        entry = unique.setdefault(workload_key(func, c), [gv.name_hint, func, c, 0])
        entry[3] += counts.get(gv.name_hint, 1)
    reports, todo = [], []
    for name, func, c, calls in unique.values():
        _, rule, knobs = schedule_with_knobs(func, feats, c)
        space = _key(knobs.options)  # the decisions the rules offer now, at the default
        rec = records.get(func, c, target)
        if rec is not None and rec.get("space") == space:
            reports.append(ScheduleReport(name, calls, rec["rule"], True, rec["candidates"],
                                          _ms(rec["default_secs"]), _ms(rec["secs"]), rec["choice"]))
            continue
        if any(len(o) > 1 for o in knobs.options.values()):
            # a record from rules that offered other decisions is searched again, from its choice
            todo.append((name, func, c, calls, space, rec["choice"] if rec else None))
    defaults = measure([schedule_with_knobs(f, feats, c)[0] for _, f, c, _, _, _ in todo]) if todo else []
    order = sorted(zip(todo, defaults), key=lambda p: -(p[1] or 0) * p[0][3])
    log(f"schedule search: {len(unique)} functions, {len(reports)} reused, {len(order)} to search")
    with Bar(len(order), desc="schedule search", unit="function", enabled=bar) as progress:
        _search_in_order(order, target, feats, records, measure, max_candidates, deadline,
                         progress.write if progress.active else log, progress, reports)
    return reports


def _search_in_order(order, target, feats, records, measure, max_candidates, deadline, log, progress, reports):
    import time

    for (name, func, c, calls, space, start), default_secs in order:
        progress.update()
        if deadline is not None and time.perf_counter() >= deadline:
            log("time budget reached; run again to continue from the database")
            break
        if default_secs is None:
            continue
        t0 = time.perf_counter()
        r = search_schedule(func, feats, c, measure, max_candidates=max_candidates, default_secs=default_secs,
                            start=start)
        records.put(func, c, target, choice=r.choice, secs=r.secs, default_secs=r.default_secs,
                    candidates=r.candidates, rule=r.rule, seconds=time.perf_counter() - t0, space=space)
        rep = ScheduleReport(name, calls, r.rule, False, r.candidates, _ms(r.default_secs), _ms(r.secs), r.choice)
        reports.append(rep)
        log(f"    {name[:48]:<48} x{calls:<3} {rep.default_ms:8.3f} -> {rep.best_ms:8.3f} ms "
            f"({r.candidates} candidates)")


def _ms(secs):
    return None if secs is None else secs * 1e3

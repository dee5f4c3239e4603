"""Tuning a model's fused functions, resumable, with records shared across models. Two stages:

1. **graphopt's schedule search** (``search.py``): the decisions of graphopt's own rules, starting
   from the defaults, for every fused function, largest share of run time first. Cheap (a candidate
   is built and measured in a fraction of a second) and already near the machine's peak on convs.
2. **MetaSchedule** (``trials`` > 0): its own search space on the tasks with the largest share of run
   time left, in rounds sized to the time budget. ``compile`` uses a MetaSchedule record only where
   it measured faster than graphopt's.

* Tasks come from the module that ``compile`` builds (``fused_module``), weighted by calls.
* A function already searched, or a task with ``max_trials_per_task`` records, for any model on the
  same target, is not tuned again: a second model pays only for its new workloads.
* ``time_budget_s`` covers both stages; a later run continues from the database.
* Measuring happens locally, or on the boards an RPC tracker hands out (``rpc="host:port:key"``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from graphopt.backends.bundle.loader import use_physical_cores
from graphopt.backends.tuning.builder import CandidateBuilder, metaschedule_builder
from graphopt.backends.tuning.database import best_seconds, default_db_dir, open_database
from graphopt.backends.tuning.intrinsics import register_for
from graphopt.backends.tuning.records import ScheduleRecords
from graphopt.backends.tuning.search import Measurer, ScheduleReport, search_module
from graphopt.core.errors import UsageError
from graphopt.core.progress import Bar

# What tuning needs beyond the default install (pip install 'graphopt[tune]'): MetaSchedule's cost model
# (xgboost), its local runner's worker processes (psutil, cloudpickle) and the RPC tracker client (tornado).
TUNE_EXTRA = {"xgboost": "MetaSchedule's cost model", "psutil": "the measuring workers",
              "cloudpickle": "the measuring workers", "tornado": "RPC measurement on a board"}


def require_tune_extra(*, trials: int, rpc: str | None) -> None:
    """Refuse, naming the extra to install, when a package that this tuning run needs is missing."""
    import importlib.util

    needed = ["psutil", "cloudpickle"] + (["xgboost"] if trials > 0 else []) + (["tornado"] if rpc else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        what = ", ".join(f"{name} ({TUNE_EXTRA[name]})" for name in missing)
        raise UsageError(f"tuning needs the 'tune' extra: pip install 'graphopt[tune]' (missing: {what})")


@dataclasses.dataclass
class TaskReport:
    name: str
    weight: float
    reused: bool
    trials: int
    best_ms: float | None


@dataclasses.dataclass
class TuneReport:
    db_dir: str
    target: str
    tasks: list[TaskReport]
    trials_run: int
    seconds: float
    schedules: list[ScheduleReport] = dataclasses.field(default_factory=list)

    @property
    def reused(self) -> int:
        return sum(t.reused for t in self.tasks)


def parse_rpc(spec: str) -> tuple[str, int, str]:
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        raise UsageError(f"--rpc {spec!r}: expected HOST:PORT:KEY (the tracker's address and the device key)")
    return parts[0], int(parts[1]), parts[2]


def make_runner(rpc: str | None, *, cache_flush: bool = False, session_timeout: int = 60):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=cache_flush
    )
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    host, port, key = parse_rpc(rpc)
    from tvm import rpc as tvm_rpc

    try:
        tracker = tvm_rpc.connect_tracker(host, port)
        summary = tracker.summary()
    except Exception as e:
        raise UsageError(f"--rpc {rpc}: cannot reach the RPC tracker: {e}") from None
    free = sum(q.get("free", 0) for k, q in summary.get("queue_info", {}).items() if k == key)
    if free == 0:
        raise UsageError(f"--rpc {rpc}: the tracker has no free device with key '{key}'")
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=session_timeout
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=free)


def tune_module(
    mod,
    target,
    *,
    trials: int,
    db_dir: str | os.PathLike | None = None,
    max_trials_per_task: int | None = None,
    time_budget_s: float | None = None,
    rpc: str | None = None,
    fcompile=None,
    trials_per_round: int = 32,
    search_candidates: int = 24,
    progress: Callable[[str], None] | None = print,
) -> TuneReport:
    """Tune the fused functions of a lowered Relax module (weights bound) for ``target``.

    ``search_candidates``: schedules measured per function in graphopt's search (0: skip it);
    ``trials``: MetaSchedule trials after it (0: none).
    """
    import tvm

    if trials < 0 or search_candidates < 0:
        raise UsageError(f"--trials and --search-candidates must be >= 0, got {trials}, {search_candidates}")
    require_tune_extra(trials=trials, rpc=rpc)
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    d = Path(db_dir) if db_dir else default_db_dir()
    db = open_database(d)
    log = progress or (lambda s: None)
    bar = progress is print  # the command line's default: bars on a terminal, its lines above them
    start = time.perf_counter()
    deadline = None if time_budget_s is None else start + time_budget_s

    register_for(target)  # before MetaSchedule's TuneContext imports every backend's intrinsics (45 s)
    fused = _fuse(mod, target)
    use_physical_cores()  # the runner's workers inherit it: measure with the threads the model will run on
    runner = make_runner(rpc)
    candidates = CandidateBuilder(fcompile)
    schedules, tasks, trials_run = [], [], 0
    try:
        if search_candidates > 0:
            schedules = search_module(fused, target, ScheduleRecords(d), Measurer(target, runner, candidates),
                                      max_candidates=search_candidates, deadline=deadline, log=log, bar=bar)
        if trials > 0 and (deadline is None or time.perf_counter() < deadline):
            tasks, trials_run = _metaschedule(
                fused, target, db, d, runner, trials=trials, per_task=max_trials_per_task,
                trials_per_round=trials_per_round, deadline=deadline, candidates=candidates,
                shares={r.name: r.share_ms for r in schedules}, log=log, start=start, bar=bar)
    finally:
        candidates.close()
    return TuneReport(str(d), str(target), tasks, trials_run, time.perf_counter() - start, schedules)


MAX_TASKS_PER_ROUND = 4  # short rounds: the trial rate is measured again before the budget is spent


def _metaschedule(fused, target, db, d, runner, *, trials, per_task, trials_per_round, deadline, candidates,
                  shares, log, start, bar=False) -> tuple[list[TaskReport], int]:
    """MetaSchedule's search on the tasks not yet tuned, the largest share of run time first.

    A round goes to the tasks that cover most of the run time (at most ``MAX_TASKS_PER_ROUND``); its
    size is what the rest of the budget allows at the slowest trial rate measured so far (first guess
    2 s a trial). ResNet-50 on 2 cores: planned at the 0.45 s a trial of a round of cheap tasks, one
    round of 21 tasks ran at 1.46 s a trial and overran a 14-minute budget by 4.4 minutes.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts

    tasks = [t for t in extract_tasks(fused, target) if not t.mod.attrs.get("tirx.is_scheduled", False)]
    per_task = per_task or max(trials_per_round, trials // max(1, len(tasks)))
    reports: dict[str, TaskReport] = {}
    todo = []
    for t in tasks:
        best, n = best_seconds(db, t.dispatched[0])
        reused = n >= per_task
        reports[t.task_name] = TaskReport(t.task_name, float(t.weight), reused, n, None if best is None else best * 1e3)
        if not reused:
            todo.append(t)
    # largest share of run time first (graphopt's search measured it; unsearched tasks by calls)
    todo.sort(key=lambda t: -shares.get(t.task_name, float(t.weight)))
    log(f"MetaSchedule: {len(tasks)} tasks, {len(tasks) - len(todo)} already tuned in {d} (reused), "
        f"{len(todo)} to tune, up to {per_task} trials each")
    trials_run, rates = 0, []
    builder = metaschedule_builder(candidates)
    with Bar(trials, desc="MetaSchedule", unit="trial", enabled=bar) as progress:
        log = progress.write if progress.active else log
        while todo and trials_run < trials:
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                log("time budget reached; run again to continue from the database")
                break
            room = trials - trials_run
            if deadline is not None:
                # a round cannot be stopped once started, and a new task's trials may cost more than the
                # rate so far (ResNet-50 overran 20 minutes by 87 s with the full remainder): plan 3/4 of it
                secs_per_trial = max(rates, default=2.0)
                fits = int(0.75 * (deadline - now) / secs_per_trial)
                if fits < min(8, room):  # a round has seconds of overhead: not worth it for a few trials
                    log("time budget reached; run again to continue from the database")
                    break
                room = min(room, fits)
            batch = todo[: max(1, min(MAX_TASKS_PER_ROUND, room // trials_per_round))]
            chunk = min(trials_per_round * len(batch), room)
            contexts, weights = extracted_tasks_to_tune_contexts(
                batch, str(d / "logs"), strategy=_strategy(per_task), num_threads="physical"
            )
            before = {t.task_name: best_seconds(db, t.dispatched[0])[1] for t in batch}
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(d / "logs"), max_trials_global=chunk,
                max_trials_per_task=per_task, num_trials_per_iter=min(trials_per_round, 64),
                builder=builder, runner=runner, database=db,
            )
            ran = 0
            for t in batch:
                best, n = best_seconds(db, t.dispatched[0])
                r = reports[t.task_name]
                ran += n - before[t.task_name]
                r.trials, r.best_ms = n, None if best is None else best * 1e3
            trials_run += max(ran, 1)
            progress.update(max(ran, 1))
            rates.append((time.perf_counter() - now) / max(ran, 1))
            # done: enough trials, or none this round (the task's search space is exhausted)
            done = {t.task_name for t in batch
                    if reports[t.task_name].trials >= per_task or reports[t.task_name].trials == before[t.task_name]}
            todo = [t for t in todo if t.task_name not in done]
            _print_progress(log, reports, trials_run, trials, time.perf_counter() - start, bar=progress.active)
    return list(reports.values()), trials_run


def _strategy(trials_per_task: int):
    """Evolutionary search sized to the budget: MetaSchedule's default population (512) costs
    minutes of search per round on 2 cores, wasted when a task gets only a few dozen trials."""
    from tvm.s_tir import meta_schedule as ms

    population = int(min(512, max(32, 4 * trials_per_task)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2), genetic_num_iters=2 if population < 512 else 4
    )


def _fuse(mod, target):
    """Legalize and fuse as the compile pipeline does, so the tasks are the functions that get compiled."""
    import tvm
    from tvm import relax

    if not any(isinstance(f, relax.Function) for f in mod.functions.values()):
        return mod
    has_prim = any(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())
    if has_prim:
        return mod  # already legalized and fused
    with target:
        return relax.pipeline.zero_pipeline()(mod)


def _print_progress(log, reports, done, total, elapsed, *, bar: bool = False) -> None:
    if not bar:  # a log file gets the count as a line; a terminal has the bar
        log(f"{done}/{total} trials, {elapsed:.0f}s")
    for r in sorted(reports.values(), key=lambda r: -(r.best_ms or 0) * r.weight):
        best = f"{r.best_ms:.3f} ms" if r.best_ms is not None else "-"
        log(f"    {r.name[:48]:<48} x{r.weight:<3g} {r.trials:>5} trials  best {best}{'  (reused)' if r.reused else ''}")

"""MetaSchedule tuning of a model's fused tasks, resumable, with records shared across models.

* Tasks come from the lowered Relax module (``extract_tasks`` legalizes and fuses it the same way the
  compile pipeline does), weighted by how often each fused function runs.
* A task that already has ``max_trials_per_task`` measured records in the database (for any model,
  same target) is not tuned again: a second model pays only for its new workloads.
* Trials are spent in rounds; the "gradient" task scheduler gives each round to the task whose
  weighted latency improves most, so trials go where the run time is. A time budget stops between
  rounds; a later run continues from the database.
* Measuring happens locally, or on the boards an RPC tracker hands out (``rpc="host:port:key"``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from graphopt.backends.tuning.database import best_seconds, default_db_dir, open_database
from graphopt.backends.tuning.intrinsics import register_for
from graphopt.errors import UsageError


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
    progress: Callable[[str], None] | None = print,
) -> TuneReport:
    """Tune the fused tasks of a lowered Relax module (weights bound) for ``target``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    if trials < 0:
        raise UsageError(f"--trials must be >= 0, got {trials}")
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    d = Path(db_dir) if db_dir else default_db_dir()
    db = open_database(d)
    log = progress or (lambda s: None)
    start = time.perf_counter()

    register_for(target)  # before MetaSchedule's TuneContext imports every backend's intrinsics (45 s)
    fused = _fuse(mod, target)
    tasks = [t for t in extract_tasks(fused, target) if not t.mod.attrs.get("tirx.is_scheduled", False)]
    per_task = max_trials_per_task or max(trials_per_round, trials // max(1, len(tasks)))
    reports: dict[str, TaskReport] = {}
    todo = []
    for t in tasks:
        best, n = best_seconds(db, t.dispatched[0])
        reused = n >= per_task
        reports[t.task_name] = TaskReport(t.task_name, float(t.weight), reused, n, None if best is None else best * 1e3)
        if not reused:
            todo.append(t)
    log(f"{len(tasks)} tasks, {len(tasks) - len(todo)} already tuned in {d} (reused), "
        f"{len(todo)} to tune, up to {per_task} trials each")

    runner = make_runner(rpc)
    trials_run = 0
    while todo and trials_run < trials:
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
            log("time budget reached; run again to continue from the database")
            break
        chunk = min(trials_per_round * len(todo), trials - trials_run)
        contexts, weights = extracted_tasks_to_tune_contexts(
            todo, str(d / "logs"), strategy=_strategy(per_task), num_threads="physical"
        )
        before = {t.task_name: best_seconds(db, t.dispatched[0])[1] for t in todo}
        ms.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(d / "logs"),
            max_trials_global=chunk,
            max_trials_per_task=per_task,
            num_trials_per_iter=min(trials_per_round, 64),
            builder=_builder(fcompile),
            runner=runner,
            database=db,
        )
        ran = 0
        for t in todo:
            best, n = best_seconds(db, t.dispatched[0])
            r = reports[t.task_name]
            ran += n - before[t.task_name]
            r.trials, r.best_ms = n, None if best is None else best * 1e3
        trials_run += max(ran, 1)
        todo = [t for t in todo if reports[t.task_name].trials < per_task]
        _print_progress(log, reports, trials_run, trials, time.perf_counter() - start)
        if ran == 0:
            break  # the search space is exhausted for every remaining task
    return TuneReport(str(d), str(target), list(reports.values()), trials_run, time.perf_counter() - start)


def _strategy(trials_per_task: int):
    """Evolutionary search sized to the budget: MetaSchedule's default population (512) costs
    minutes of search per round on 2 cores, wasted when a task gets only a few dozen trials."""
    from tvm.s_tir import meta_schedule as ms

    population = int(min(512, max(32, 4 * trials_per_task)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2), genetic_num_iters=2 if population < 512 else 4
    )


BUILD_TIMEOUT_S = 120  # per candidate; MetaSchedule's default of 30 s is short for a cold worker on 2 cores


def _build_candidate(mod, target, _params):
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import registers every tensor intrinsic TVM has (CUDA's alone take 30 s): 45 s on this
    project's 2-core machines, paid again in each round's new builder process, where it ran into the
    builder's timeout and every candidate was recorded as a build error. Building a candidate needs no
    registry: tensorization already happened where the candidate was sampled.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _builder(fcompile):
    """Builds candidates one at a time (2 cores: building beside measuring adds noise).

    With a cross compiler, candidates are linked here into shared libraries for the boards.
    """
    from tvm.s_tir import meta_schedule as ms

    if fcompile is None:
        return ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S, f_build=_build_candidate)

    def export(mod) -> str:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
        mod.export_library(path, fcompile=fcompile)
        return path

    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S, f_build=_build_candidate, f_export=export)


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


def _print_progress(log, reports, done, total, elapsed) -> None:
    width = 30
    filled = int(width * min(done, total) / max(total, 1))
    log(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} trials, {elapsed:.0f}s")
    for r in sorted(reports.values(), key=lambda r: -(r.best_ms or 0) * r.weight):
        best = f"{r.best_ms:.3f} ms" if r.best_ms is not None else "-"
        log(f"    {r.name[:48]:<48} x{r.weight:<3g} {r.trials:>5} trials  best {best}{'  (reused)' if r.reused else ''}")

"""The tuning database: one JSON MetaSchedule database shared by every model.

Records are keyed by the workload's structural hash and the target, so a task tuned for one model
is found again for any other model that has the same fused function on the same target.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from graphopt.backends.tuning.records import FILE as SCHEDULES
from graphopt.core.errors import UsageError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def default_db_dir() -> Path:
    base = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graphopt"
    )
    return Path(base) / "tuning"


def open_database(db_dir: str | os.PathLike | None, *, create: bool = True):
    """Open (or create) the JSON database in ``db_dir``."""
    from tvm.s_tir import meta_schedule as ms

    d = Path(db_dir) if db_dir else default_db_dir()
    if d.exists() and not d.is_dir():
        raise UsageError(f"--tuning-db {d}: not a directory")
    if not create and not (d / RECORDS).exists() and not (d / SCHEDULES).exists():
        raise UsageError(f"--tuning-db {d}: no tuning database there ({RECORDS} missing)")
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(d / WORKLOADS),
        path_tuning_record=str(d / RECORDS),
        module_equality="structural",
    )


def database_hash(db_dir: str | os.PathLike) -> str:
    """sha256 over the database files (MetaSchedule's and graphopt's schedule records: both decide the
    compiled code), recorded in a bundle's manifest."""
    h = hashlib.sha256()
    for name in (WORKLOADS, RECORDS, SCHEDULES):
        p = Path(db_dir) / name
        if p.exists():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def workload_module(func):
    """``func`` as the module MetaSchedule keys its records by (and builds): one ``main``."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def mean_seconds(run_secs) -> float:
    secs = [float(x) for x in run_secs]
    return sum(secs) / len(secs)


def apply_database(mod, target, db_dir):
    """Apply a tuning database to a fused module: returns ``(mod, choices)``.

    ``mod`` is the fused Relax module (after LegalizeOps/FuseOps/FuseTIR). A PrimFunc takes its
    MetaSchedule record where there is one and it measured faster than graphopt's schedule search
    (or that search has no record for it); ``choices(func, constants)`` then gives graphopt's recorded
    decisions for the rest, for ``apply_default_schedules``. Functions without any record keep the
    default schedules.
    """
    import tvm

    from graphopt.backends.schedules.analysis import is_scheduled, with_functions
    from graphopt.backends.schedules.prepack import constant_params
    from graphopt.backends.tuning.records import ScheduleRecords

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    db = open_database(db_dir, create=False)
    records = ScheduleRecords(db_dir)
    consts = constant_params(mod)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        workload = workload_module(func)
        rec = db.query_tuning_record(workload, target, "main")
        if rec is None or not rec.run_secs:
            continue
        ms_secs = mean_seconds(rec.run_secs)
        ours = records.get(func, consts.get(gv.name_hint, frozenset()), target)
        if ours is not None and ours["secs"] is not None and ours["secs"] <= ms_secs:
            continue
        sch = db.query_schedule(workload, target, "main")
        if sch is not None:
            updates[gv] = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
    return with_functions(mod, updates), records.chooser(target)


def best_seconds(db, mod) -> tuple[float | None, int]:
    """(best mean run time in seconds, number of trials recorded, failed ones included) for a task."""
    if not db.has_workload(mod):
        return None, 0
    workload = db.commit_workload(mod)
    measured = sum(1 for r in db.get_all_tuning_records() if r.workload.same_as(workload))
    records = db.get_top_k(workload, 1)
    if not records:
        return None, measured
    return mean_seconds(records[0].run_secs), measured


def model_summary(mod, target, db_dir) -> dict:
    """What the database holds for the fused functions of ``mod``: how many graphopt's search has
    records for, with how many candidates and seconds of search, and MetaSchedule's trials for them."""
    import tvm

    from graphopt.backends.schedules.prepack import constant_params
    from graphopt.backends.tuning.records import ScheduleRecords, workload_key

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    db = open_database(db_dir, create=False)
    records = ScheduleRecords(db_dir)
    consts = constant_params(mod)
    seen, out = set(), {"functions": 0, "searched": 0, "candidates": 0, "search_s": 0.0, "metaschedule_trials": 0}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        c = consts.get(gv.name_hint, frozenset())
        key = workload_key(func, c)
        if key in seen:
            continue
        seen.add(key)
        out["functions"] += 1
        rec = records.get(func, c, target)
        if rec is not None:
            out["searched"] += 1
            out["candidates"] += rec["candidates"]
            out["search_s"] += rec.get("seconds", 0.0)
        out["metaschedule_trials"] += best_seconds(db, workload_module(func))[1]
    out["search_s"] = round(out["search_s"], 1)
    return out

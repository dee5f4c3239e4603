"""graphopt's schedule records: the best measured decisions of graphopt's own rules per workload.

One JSON file beside MetaSchedule's database (``graphopt_schedules.json``). A record is keyed by the
fused function's structure (``workload_key``: a structural hash, so a second model with the same
kernel finds it) and the target string; it holds the rules' decisions (``Knobs.choice``), the best
and the default run time, how many candidates were measured, and the decisions the rules offered
(``space``: when a later graphopt offers others, the function is searched again from its record).
``compile --tuning-db`` passes the choices to ``apply_default_schedules``; a MetaSchedule record
replaces them only where it measured faster (``database.apply_database``). Writes are atomic (a
temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE = "graphopt_schedules.json"
VERSION = 1


def workload_key(func, constants=frozenset()) -> str:
    """The function's structure (names and attributes that differ between models left out) and
    which of its parameters are compile-time constants (their layout may be repacked)."""
    from tvm_ffi import structural_hash

    f = func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func
    h = structural_hash(f) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}:{','.join(str(c) for c in sorted(constants))}"


class ScheduleRecords:
    """The records of one tuning database directory, loaded once and saved after every update."""

    def __init__(self, db_dir: str | os.PathLike):
        self.path = Path(db_dir) / FILE
        self._records: dict[str, dict] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("version") == VERSION:
                self._records = {(r["target"] + "|" + r["workload"]): r for r in data["records"]}

    def get(self, func, constants, target) -> dict | None:
        return self._records.get(str(target) + "|" + workload_key(func, constants))

    def put(self, func, constants, target, *, choice: dict, secs: float, default_secs: float,
            candidates: int, rule: str, seconds: float = 0.0, space: str = "") -> dict:
        rec = {"workload": workload_key(func, constants), "target": str(target), "rule": rule,
               "choice": choice, "secs": secs, "default_secs": default_secs, "candidates": candidates,
               "seconds": round(seconds, 2), "space": space}
        self._records[rec["target"] + "|" + rec["workload"]] = rec
        self.save()
        return rec

    def save(self) -> None:
        from graphopt.core.io import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"version": VERSION, "records": list(self._records.values())}, indent=1))

    def chooser(self, target):
        """``choices(func, constants)`` for ``apply_default_schedules``: a record's decisions or None."""
        def choices(func, constants):
            rec = self.get(func, constants, target)
            return rec["choice"] if rec else None

        return choices

"""Tuning with MetaSchedule: a shared, resumable database of records (local or RPC measurement)."""

from graphopt.backends.tuning.database import (
    apply_database,
    database_hash,
    default_db_dir,
    model_summary,
    open_database,
)
from graphopt.backends.tuning.tuner import TaskReport, TuneReport, parse_rpc, tune_module

__all__ = [
    "TaskReport",
    "TuneReport",
    "apply_database",
    "database_hash",
    "default_db_dir",
    "model_summary",
    "open_database",
    "parse_rpc",
    "tune_module",
]

"""The pass manager: PassContext, instruments, the registry and the ordered default pipeline."""

from graphopt.core.pipeline.context import PassContext
from graphopt.core.pipeline.instruments import (
    DumpInstrument,
    Instrument,
    PassRecord,
    StatsInstrument,
    VerifyInstrument,
    count_nodes,
    parameter_stats,
)
from graphopt.core.pipeline.levels import DEFAULT_PIPELINE
from graphopt.core.pipeline.registry import ENTRY_POINT_GROUP, PassInfo, PassRegistry
from graphopt.core.pipeline.runner import Fixpoint, PipelineResult, Step, run_pipeline, steps_from_names

__all__ = [
    "DEFAULT_PIPELINE",
    "ENTRY_POINT_GROUP",
    "DumpInstrument",
    "Fixpoint",
    "Instrument",
    "PassContext",
    "PassInfo",
    "PassRecord",
    "PassRegistry",
    "PipelineResult",
    "StatsInstrument",
    "Step",
    "VerifyInstrument",
    "count_nodes",
    "parameter_stats",
    "run_pipeline",
    "steps_from_names",
]

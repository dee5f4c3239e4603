from __future__ import annotations

import argparse
import json
import logging

from graphopt import api, io
from graphopt.commands.common import add_input_shape, add_opt_level, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".onnx file or a bundled model name (light:resnet50, rapidocr:det)")
    p.add_argument("--target", default="x86", help="x86 (default), aarch64, cuda, or a TVM target as JSON")
    p.add_argument("--trials", type=int, default=256, help="trials in total (default 256)")
    p.add_argument("--max-trials-per-task", type=int, help="cap per task (default: trials / tasks, at least 32)")
    p.add_argument("--tuning-db", help="database directory (default ~/.cache/graphopt/tuning); shared by models")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop after this many minutes (resumable)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure on the devices of an RPC tracker")
    p.add_argument("--json", help="write the per-task report as JSON")
    p.add_argument("--verbose", action="store_true", help="show MetaSchedule's own logs")
    add_opt_level(p)
    add_input_shape(p)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    report = api.tune(
        args.model, target=args.target, trials=args.trials, tuning_db=args.tuning_db,
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        max_trials_per_task=args.max_trials_per_task, rpc=args.rpc, opt_level=args.opt_level,
        input_shapes=args.input_shape,
    )
    rows = [[t.name[:48], f"{t.weight:g}", t.trials, "-" if t.best_ms is None else f"{t.best_ms:.3f}",
             "reused" if t.reused else ""] for t in report.tasks]
    print(table(rows, ["task", "weight", "trials", "best ms", ""]))
    print(f"{report.trials_run} trials in {report.seconds:.0f}s; {report.reused} of {len(report.tasks)} "
          f"tasks reused from {report.db_dir} (target {report.target})")
    if args.json:
        import dataclasses

        io.atomic_write_text(args.json, json.dumps(dataclasses.asdict(report), indent=2))
    return 0

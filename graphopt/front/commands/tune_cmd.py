from __future__ import annotations

import argparse
import json
import logging

from graphopt.front import api

from graphopt.core import io, outputs
from graphopt.front.commands.common import add_input_shape, add_opt_level, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".onnx file or a bundled model name (light:resnet50, rapidocr:det)")
    p.add_argument("--target", default="x86", help="x86 (default), aarch64, cuda, or a TVM target as JSON")
    p.add_argument("--trials", type=int, default=256,
                   help="MetaSchedule trials in total, after graphopt's schedule search (default 256; 0: none)")
    p.add_argument("--search-candidates", type=int, default=24, metavar="N",
                   help="schedules graphopt's own search measures per function (default 24; 0: skip it)")
    p.add_argument("--max-trials-per-task", type=int, help="cap per task (default: trials / tasks, at least 32)")
    p.add_argument("--tuning-db", help="database directory (default ~/.cache/graphopt/tuning); shared by models")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop after this many minutes (resumable)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure on the devices of an RPC tracker")
    p.add_argument("--json", help="write the per-task report as JSON")
    p.add_argument("--verbose", action="store_true", help="show MetaSchedule's own logs")
    add_opt_level(p)
    add_input_shape(p)


def run(args: argparse.Namespace) -> int:
    outputs.check_output_files({"--json": args.json}, protected=outputs.files_read_by([args.model]))
    if args.tuning_db:  # a directory graphopt adds records to: checked before minutes of search
        outputs.check_output_dir(args.tuning_db, "--tuning-db")
    if not args.verbose:
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    report = api.tune(
        args.model, target=args.target, trials=args.trials, tuning_db=args.tuning_db,
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        max_trials_per_task=args.max_trials_per_task, rpc=args.rpc, opt_level=args.opt_level,
        input_shapes=args.input_shape, search_candidates=args.search_candidates,
    )
    if report.schedules:
        ms = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows = [[s.name[:48], s.weight, s.rule, s.candidates, ms(s.default_ms), ms(s.best_ms),
                 "reused" if s.reused else ""] for s in sorted(report.schedules, key=lambda s: -s.share_ms)]
        print(table(rows, ["function", "calls", "rule", "candidates", "default ms", "best ms", ""]))
        default = sum((s.default_ms or 0) * s.weight for s in report.schedules)
        best = sum(s.share_ms for s in report.schedules)
        print(f"schedule search: {sum(not s.reused for s in report.schedules)} functions searched, "
              f"{sum(s.reused for s in report.schedules)} reused; kernel time {default:.2f} -> {best:.2f} ms")
    if report.tasks:
        rows = [[t.name[:48], f"{t.weight:g}", t.trials, "-" if t.best_ms is None else f"{t.best_ms:.3f}",
                 "reused" if t.reused else ""] for t in report.tasks]
        print(table(rows, ["task", "weight", "trials", "best ms", ""]))
    print(f"{report.trials_run} MetaSchedule trials, {report.seconds:.0f}s in all; {report.reused} of "
          f"{len(report.tasks)} tasks reused from {report.db_dir} (target {report.target})")
    if args.json:
        import dataclasses

        io.atomic_write_text(args.json, json.dumps(dataclasses.asdict(report), indent=2))
    return 0

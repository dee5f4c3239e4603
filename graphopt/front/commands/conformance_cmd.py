"""``graphopt conformance``: the ONNX node conformance cases through the whole compiler."""

from __future__ import annotations

import argparse
import json

from graphopt.core import io, outputs
from graphopt.front.commands.common import add_opt_level
from graphopt.core.errors import UsageError
from graphopt.core.progress import Bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", dest="pattern", metavar="PATTERN",
                   help="only cases whose name contains PATTERN (comma-separated; globs allowed)")
    p.add_argument("--json", metavar="FILE", help="write every case's result as JSON")
    p.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    p.add_argument("--frontend", choices=("graphopt", "tvm"), default="graphopt",
                   help="lower with graphopt's op table (default) or TVM's ONNX importer, to compare")
    p.add_argument("--no-ort", dest="ort", action="store_false", help="do not run ONNX Runtime on the cases")
    p.add_argument("--no-freeze", dest="freeze", action="store_false",
                   help="leave shape-deciding inputs (Reshape's shape, Reduce's axes, ...) as run-time inputs "
                        "instead of fixing them from the case like --input-shape fixes dims")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case as it finishes")
    add_opt_level(p)


def run(args: argparse.Namespace) -> int:
    from graphopt.front.conformance import run_conformance

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"-j/--jobs must be at least 1, got {args.jobs}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    outputs.check_output_files({"--json": args.json})

    with Bar(None, desc="conformance", unit="case") as bar:
        failed = 0

        def progress(r, done, total):
            nonlocal failed
            bar.set_total(total)
            failed += r.status != "passed"
            if args.verbose:
                bar.write(f"[{done}/{total}] {r.name}: {r.status} {r.reason}".rstrip())
            bar.update()
            bar.note(f"{failed} failed")

        report = run_conformance(args.pattern, jobs=args.jobs, timeout=args.timeout, opt_level=args.opt_level,
                                 frontend=args.frontend, ort=args.ort, freeze=args.freeze,
                                 progress=progress)
    groups = report.failures_by_op()
    if groups:
        print("failures by op and reason:")
    for (op, status), cases in groups.items():
        reasons = sorted({c.reason for c in cases})
        print(f"  {op} [{status}] {len(cases)}: {', '.join(c.name for c in cases[:6])}"
              + (" ..." if len(cases) > 6 else ""))
        for reason in reasons[:3]:
            print(f"      {reason[:200]}")
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    print(f"{counts}; {report.seconds:.0f} s with {report.jobs} workers"
          + (f"; onnxruntime passes {report.ort_passed} of {len(report.results)}" if args.ort else ""))
    if args.json:
        io.atomic_write_text(args.json, json.dumps(report.to_json(), indent=2))
    print(f"{report.passed} passed, {report.failed} failed")
    return 0

"""``graphopt compare MODEL...``: graphopt -O3 (standard ONNX, and for ONNX Runtime) against onnxslim
(node counts, ORT latency, max diff)."""

from __future__ import annotations

import argparse
import json

from graphopt.core import io, outputs
from graphopt.front.commands.common import add_input_shape, table
from graphopt.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="an .onnx file or a model name such as light:resnet50, rapidocr:rec")
    add_input_shape(p)
    p.add_argument("--runs", type=int, default=20, help="timed ONNX Runtime runs per model (median reported)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--opt-level", type=int, default=3, choices=range(4), help="graphopt's level (default 3)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")


def run(args: argparse.Namespace) -> int:
    from graphopt.front.compare import HEADER, compare, errors, table_rows, to_markdown

    if args.runs < 1 or args.threads < 1:
        raise UsageError("--runs and --threads must be >= 1")
    outputs.check_output_files({"--json": args.json}, protected=outputs.files_read_by(args.models))
    rows = compare(args.models, input_shapes=args.input_shape or None, runs=args.runs,
                   threads=args.threads, opt_level=args.opt_level)
    if args.json:
        io.atomic_write_text(args.json, json.dumps([r.to_dict() for r in rows], indent=2))
    print(to_markdown(rows) if args.markdown else table(table_rows(rows), HEADER))
    for line in errors(rows):
        print(f"error: {line}")
    return 0

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graphopt.front import api

from graphopt.core import io, outputs
from graphopt.front.commands import compress_args
from graphopt.front.commands.common import add_input_shape, add_opt_level, split_names, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    add_opt_level(p)
    add_input_shape(p)
    p.add_argument("--passes", help="run exactly these passes, in this order (comma-separated)")
    p.add_argument("--disable", action="append", default=[], help="passes to skip (comma-separated, repeatable)")
    p.add_argument("--force", action="append", default=[], help="passes to run even below their opt level")
    p.add_argument("--target-runtime", choices=("onnx", "ort", "graphopt"), default="onnx",
                   help="where the output will run: any ONNX runtime (standard ops, the default), ONNX Runtime "
                        "(adds its com.microsoft FusedConv/FusedGemm at -O3), or graphopt compile "
                        "(graphopt-domain fused ops)")
    p.add_argument("--check", action="store_true",
                   help="differential check: run ONNX Runtime after every pass and stop at the first mismatch")
    p.add_argument("--check-dir", help="where --check writes the before/after graphs (default: beside -o)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the graph as ONNX text after every pass that changed it")
    p.add_argument("--report", help="write the per-pass report as JSON")
    p.add_argument("--plot", help="draw node count and parameter bytes after each pass (PNG)")
    p.add_argument("--quiet", "-q", action="store_true", help="print no table")
    compress_args.add_arguments(p)
    compress_args.add_config(p)  # last: it marks every default above


def _check_paths(args: argparse.Namespace, out: Path, check_dir: str | None) -> Path:
    """Every path this command writes, checked before any work; returns the model file to read."""
    files = {"-o": args.output, "--report": args.report, "--plot": args.plot}
    dirs = {"--check-dir": check_dir, "--dump-ir": args.dump_ir}
    outputs.check_distinct({**files, **dirs})
    for option, path in files.items():
        if path is not None:
            outputs.check_output_file(path, option)
    for option, path in dirs.items():
        if path is not None:
            outputs.check_output_dir(path, option)
    src = api.resolve_model_path(args.model)
    reads = outputs.model_files(src)
    if len(reads) > 1:  # external weights: the output's own weights go beside it (io.save)
        files["-o (its external data)"] = str(out.parent / (out.name + ".data"))
    for option, path in files.items():
        if path is not None:
            outputs.check_output_file(path, option, protected=reads)
    return src


def run(args: argparse.Namespace) -> int:
    compress_args.apply_config(args)
    out = Path(args.output)
    check_dir = args.check_dir or (str(out.parent / (out.stem + ".check")) if args.check else None)
    src = _check_paths(args, out, check_dir)
    compression = compress_args.options(args)
    disable = [n for d in args.disable for n in split_names(d)]
    force = [n for d in args.force for n in split_names(d)]
    passes = split_names(args.passes) if args.passes else None
    instruments = []
    if args.dump_ir:
        from graphopt.core.pipeline import DumpInstrument

        instruments.append(DumpInstrument(args.dump_ir))
    res = api.optimize(
        src, opt_level=args.opt_level, passes=passes, disable=disable, force=force,
        input_shapes=args.input_shape, check=args.check, check_dir=check_dir, instruments=instruments,
        target_runtime=args.target_runtime,
    )
    compressed = compress_args.apply(compression, res, src, args)
    api.save(res.model, out)
    report = res.report()
    report.update({"model": str(Path(args.model)), "output": str(out), "opt_level": args.opt_level})
    if compressed is not None:
        report["compression"] = compressed
    if args.report:
        io.atomic_write_text(args.report, json.dumps(report, indent=2))
    if args.plot:
        from graphopt.front.report import plot_pass_report

        plot_pass_report(report, args.plot)
    if not args.quiet:
        rows = [[r.name, f"{r.seconds * 1000:.1f}", "yes" if r.modified else "no", r.nodes, r.parameter_bytes]
                for r in res.records]
        if rows:
            print(table(rows, ["pass", "ms", "modified", "nodes", "param bytes"]))
        last_nodes = res.records[-1].nodes if res.records else res.initial_nodes
        if compressed is not None:
            print(compress_args.summary(compressed))
        print(f"{Path(args.model)} -> {out}: nodes {res.initial_nodes} -> {last_nodes}")
    return 0

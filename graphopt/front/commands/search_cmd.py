"""``graphopt search MODEL --metric M --max-drop X --budget 20m -o DIR``: try compression
configurations, measure each (metric, size, FLOPs, latency), and keep the best within the budget.

Writes, in DIR: ``results.jsonl`` (one line per configuration, appended as each finishes; a rerun
skips them), ``table.md``, ``pareto.png`` and ``best.json`` (``graphopt optimize --config`` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from graphopt.core import io, outputs
from graphopt.core.errors import GraphoptError, UsageError
from graphopt.front.commands.common import add_input_shape, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from graphopt.compression.search import OBJECTIVES

    p.add_argument("model", help="an .onnx file or a model name such as rapidocr:rec (never modified)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="results directory (created; a rerun with the same settings resumes)")
    p.add_argument("--metric", required=True, metavar="NAME",
                   help="the real-label score: ocr-rec, ocr-det, cosine, or MODULE:FUNCTION")
    p.add_argument("--max-drop", type=float, required=True, metavar="X",
                   help="accuracy budget: at most X below the float model's score")
    p.add_argument("--budget", default="20m", metavar="TIME",
                   help="wall-clock time for this run, checked between configurations (90s, 20m, 1h; default 20m)")
    p.add_argument("--strategy", choices=("grid", "random"), default="grid",
                   help="grid: cheap configurations first; random: a seeded shuffle (default grid)")
    p.add_argument("--trials", type=int, metavar="N", help="measure at most N new configurations")
    p.add_argument("--seed", type=int, default=0, help="seed of --strategy random (default 0)")
    p.add_argument("--space", metavar="FILE.json", help="the configurations to try (see docs/compression.md)")
    p.add_argument("--calibration", metavar="FILE.npz|DIR",
                   help="calibration data for int8 and reconstruction (OCR metrics: written into DIR if not given)")
    add_input_shape(p)
    p.add_argument("--objective", choices=OBJECTIVES, default="latency",
                   help="what the best configuration minimizes within the budget (default latency)")
    p.add_argument("--latency", choices=("ort", "bundle"), default="ort",
                   help="ort: ONNX Runtime on the CPU (default, fast); bundle: compile each configuration with "
                        "graphopt for x86 and time the bundle (minutes per configuration)")
    p.add_argument("--threads", type=int, help="threads for the latency runs (default: all cores)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per configuration (default 20)")
    p.add_argument("--samples", type=int, metavar="N", help="lines, pages or inputs the metric scores")
    p.add_argument("--data", metavar="FILE.npz", help="cosine only: real inputs (one array per input, samples first)")
    p.add_argument("--json", action="store_true", help="print every row and the best configuration as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no line per configuration")


def bundle_latency(out_dir: Path, threads: int, repeat: int, input_shapes):
    """Latency of a graphopt x86 bundle compiled from each configuration (``graphopt bench``, one child process)."""
    from graphopt.front.bench import bench

    def measure(model) -> float:
        from graphopt.front import api

        fd, path = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
        os.close(fd)
        try:
            api.save(model, path)
            (res,) = bench([path], threads=threads, against="none", repeat=repeat, input_shapes=list(input_shapes))
        finally:
            os.unlink(path)
        return res["graphopt"]["min_ms"]

    return measure, f"graphopt x86 bundle, {threads} threads, fastest of {repeat} runs"


def markdown(result, command: str) -> str:
    """The table of every configuration, within-budget ones first, best first."""
    base = result.baseline
    key = "latency_ms" if result.objective == "latency" else "bytes"
    rows = sorted(result.rows, key=lambda r: ("error" in r, not result.within(r), r.get(key, 0)))
    lines = [f"# graphopt search", "", f"`{command}`", "",
             f"Float model: score {base['score']:.4f}, {base['latency_ms']:.2f} ms, {base['bytes']:,} B, "
             f"{(base['flops'] or 0) / 1e9:.3f} GFLOPs. Budget: drop at most {result.max_drop:g}. "
             f"Latency: {result.latency}. Objective: lowest {result.objective} within the budget.", "",
             "| | configuration | score | drop | budget | latency ms | vs float | size B | vs float | gzip B | GFLOPs | FLOPs | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "**best**" if result.best is not None and r["key"] == result.best["key"] else (
            "float" if r["key"] == base["key"] else "")
        if "error" in r:
            lines.append(f"| | {r['label']} | error: {r['error']} | | | | | | | | | | {r['seconds']:.0f} |")
            continue
        fl = r["flops"] or 0
        lines.append(
            f"| {mark} | {r['label']} | {r['score']:.4f} | {r['drop']:+.4f} | "
            f"{'within' if result.within(r) else 'over'} | {r['latency_ms']:.2f} | "
            f"{r['latency_ms'] / base['latency_ms']:.2f}x | {r['bytes']:,} | {r['bytes'] / base['bytes']:.2f}x | "
            f"{r['gzip_bytes']:,} | {fl / 1e9:.3f} | {(fl / base['flops'] - 1) if base['flops'] else 0:+.1%} | "
            f"{r['seconds']:.0f} |")
    if result.skipped:
        lines += ["", f"Not measured ({len(result.skipped)}, decided again on every run):", ""]
        lines += [f"- {key}: {why}" for key, why in result.skipped]
    if result.pending:
        lines += ["", f"{len(result.pending)} configurations not measured yet (time budget or --trials); "
                      "rerun the same command to continue."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from graphopt.compression import search as s

    out = Path(args.output)
    src = outputs.files_read_by([p for p in (args.model, args.calibration, args.data, args.space) if p])
    outputs.check_output_dir(out, "-o", protected=src)
    budget = s.parse_duration(args.budget)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    threads = args.threads or os.cpu_count() or 1
    latency = None
    if args.latency == "bundle":
        out.mkdir(parents=True, exist_ok=True)
        latency = bundle_latency(out, threads, args.repeat, args.input_shape)
    result = s.search(args.model, args.metric, max_drop=args.max_drop, out_dir=out, budget_s=budget,
                      strategy=args.strategy, trials=args.trials, seed=args.seed, space=args.space,
                      calibration=args.calibration, input_shapes=args.input_shape or None,
                      objective=args.objective, latency=latency, threads=threads, repeat=args.repeat,
                      samples=args.samples, data=args.data, progress=not args.quiet,
                      log=None if args.quiet else print)
    command = "graphopt search " + " ".join(_argv(args))
    io.atomic_write_text(out / "table.md", markdown(result, command))
    from graphopt.front.search_plot import plot_search

    plot_search(result.rows, out / "pareto.png", baseline=result.baseline, best=result.best,
                max_drop=result.max_drop, metric=args.metric, latency=result.latency)
    calibration = args.calibration or (out / "calibration.npz" if (out / "calibration.npz").is_file() else None)
    if result.best is not None:
        best = s.best_options(result, calibration=calibration, input_shapes=args.input_shape)
        io.atomic_write_text(out / "best.json", json.dumps(best, indent=2) + "\n")
    if args.json:
        print_json({"rows": result.rows, "best": result.best, "pending": result.pending,
                    "skipped": [{"config": k, "why": w} for k, w in result.skipped], "notes": result.notes})
    elif not args.quiet:
        print(f"{result.new} configurations measured now, {len(result.rows)} in all, {len(result.skipped)} skipped, "
              f"{len(result.pending)} left; "
              f"{out / 'table.md'}, {out / 'pareto.png'}")
    if result.best is None:
        near = s.closest(result.rows)
        hint = f"; closest: {near['label']} (drop {near['drop']:.4f})" if near else ""
        raise GraphoptError(f"search: no configuration within --max-drop {result.max_drop:g}{hint}")
    b = result.best
    if not args.json:
        print(f"best: {b['label']}: score {b['score']:.4f} (drop {b['drop']:+.4f}), {b['latency_ms']:.2f} ms, "
              f"{b['bytes']:,} B -> {out / 'best.json'}")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this search (for the table's heading)."""
    parts = [args.model]
    for opt in ("metric", "max_drop", "budget", "strategy", "trials", "space", "calibration", "objective",
                "latency", "threads", "samples", "data"):
        v = getattr(args, opt)
        if v is not None:
            parts += [f"--{opt.replace('_', '-')}", str(v)]
    parts += [x for shape in args.input_shape for x in ("--input-shape", shape)]
    return parts + ["-o", str(args.output)]

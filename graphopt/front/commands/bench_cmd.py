"""``graphopt bench MODEL_OR_BUNDLE...``: latency against ONNX Runtime, GFLOP/s, slowest kernels."""

from __future__ import annotations

import argparse
import json

from graphopt.core import io, outputs
from graphopt.front.commands.common import add_input_shape, add_opt_level, table
from graphopt.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL_OR_BUNDLE",
                   help="ONNX file, bundle directory, or a model name such as light:resnet50, rapidocr:det")
    p.add_argument("--target", default="x86", help="target preset (default x86)")
    p.add_argument("--threads", type=int, default=None, help="threads for graphopt and ORT (default: all cores)")
    p.add_argument("--against", default="ort", choices=["ort", "none"], help="compare with ONNX Runtime (default)")
    add_input_shape(p)
    add_opt_level(p)
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3, and at least 1 s of them)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of median latency per model")
    p.add_argument("--markdown", metavar="FILE.md", help="write the results as a Markdown page (docs/benchmarks.md)")
    p.add_argument("--untuned", action="store_true", help="compile without graphopt's default schedules")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="also compile with this tuning database and time both (default schedules and tuned)")
    p.add_argument("--profile", action="store_true", help="time per fused function (slowest first)")
    p.add_argument("--frontend", default="graphopt", choices=["graphopt", "tvm"], help="lowering front end")
    p.add_argument("--top", type=int, default=8, help="kernels listed per model with --profile (default 8)")
    p.add_argument("--float-model", metavar="MODEL",
                   help="the float original of a QDQ model: also time it on ORT (graphopt int8, ORT int8 and "
                        "ORT fp32 in one run)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="sha256:HEX",
                   help="the digest of each bundle among the models, in order (checked before timing)")


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def run(args: argparse.Namespace) -> int:
    from graphopt.front import api
    from graphopt.front.bench import bench, plot

    api.check_digests(args.models, args.expect_digest)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.top < 0:
        raise UsageError(f"--top must be at least 0, got {args.top}")
    outputs.check_output_files({"--json": args.json, "--plot": args.plot, "--markdown": args.markdown},
                               protected=outputs.files_read_by([*args.models, *([args.float_model] if args.float_model else [])]))
    from graphopt.front.commands import emulated

    if emulated.wanted(args):  # aarch64 code on an x86 host: timed under qemu, NEON counted
        return emulated.bench(args)
    results = bench(
        args.models, threads=args.threads, target=args.target,
        against=None if args.against == "none" else "ort", input_shapes=list(args.input_shape),
        repeat=args.repeat, warmup=args.warmup, untuned=args.untuned, profile=args.profile, frontend=args.frontend,
        opt_level=args.opt_level, tuning_db=args.tuning_db,
        **({"float_model": args.float_model} if args.float_model else {}),
    )
    rows = []
    tuned = args.tuning_db is not None
    for r in results:
        g, o = r["graphopt"], r["ort"] or {}
        rows.append([r["model"], r["target"], r["threads"],
                     *([_fmt((r.get("default") or {}).get("median_ms")), _fmt(r.get("ratio_default"))] if tuned else []),
                     _fmt(g["min_ms"]), _fmt(g["median_ms"]), _fmt(g["max_ms"]),
                     _fmt(o.get("median_ms")), _fmt(r["ratio"]), _fmt(r.get("ratio_min")), _fmt(r["gflops"], 1), _fmt(r["ort_gflops"], 1),
                     _fmt(r["compile_s"], 1)])
    names = ["min ms", "median ms", "max ms"]
    if tuned:
        names = ["default median ms", "default ratio", *(f"tuned {n}" for n in names)]
    print(table(rows, ["model", "target", "threads", *names, "ORT ms", "ratio", "ratio min",
                       "GFLOP/s", "ORT GFLOP/s", "compile s"]))
    for r in results:
        if r.get("ort_float"):
            print(f"{r['model']}: graphopt {_fmt(r['graphopt']['median_ms'])} ms, ORT (same model) "
                  f"{_fmt((r['ort'] or {}).get('median_ms'))} ms, ORT float model {_fmt(r['ort_float']['median_ms'])} ms; "
                  f"graphopt / ORT float {_fmt(r['ratio_float'], 3)}, ORT / ORT float {_fmt(r.get('ort_ratio_float'), 3)}")
    for r in results:
        if r["profile"]:
            print(f"\n{r['model']}: time per function (share of the run)")
            print(table([[p["function"], _fmt(p["ms"], 3), f"{100 * p['share']:.1f}%", p["calls"]]
                         for p in r["profile"][: args.top]], ["function", "ms", "share", "calls"]))
    if args.json:
        io.atomic_write_text(args.json, json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    if args.markdown:
        import shlex
        import sys

        from graphopt.front.bench import markdown

        command = "graphopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        io.atomic_write_text(args.markdown, markdown(results, command, top=args.top))
    return 0

"""``graphopt compile MODEL --target x86 -o BUNDLE``: optimize, lower, compile and write a bundle.

``-o`` is checked before the compile (a new or empty directory, or a bundle graphopt wrote); the
bundle's digest (sha256 of its manifest.json) is printed, for ``run/bench/serve --expect-digest``."""

from __future__ import annotations

import argparse

from graphopt.front import api
from graphopt.front.commands.common import add_input_shape, add_opt_level, print_json, table
from graphopt.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".onnx file, or a bundled model name such as light:resnet50")
    p.add_argument("--target", default="x86", help="x86 (this host), aarch64, cuda, or a JSON target dict")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write (atomically; replaces only a bundle graphopt wrote)")
    add_opt_level(p)
    add_input_shape(p)
    p.add_argument("--tuning-db", metavar="DIR", help="apply tuned schedules from this MetaSchedule database")
    p.add_argument("--no-schedules", dest="schedules", action="store_false",
                   help="skip graphopt's default schedules (correct but slow code)")
    p.add_argument("--max", action="append", default=[], metavar="DIM=N", dest="max_dims",
                   help="bound of a symbolic dim named in --input-shape (x:1,seq --max seq=512): the dim "
                        "stays symbolic, one bundle serves 1..N")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16 (CUDA targets): convs and matmuls in float16 with float32 accumulation, on tensor "
                        "cores; inputs and outputs keep their types")
    p.add_argument("--json", action="store_true", help="print the stage timings as JSON")


def parse_dim_bounds(items: list[str]) -> dict[str, int]:
    """``["seq=256"]`` -> ``{"seq": 256}``; a malformed item is a UsageError naming it."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier() or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--max {item}: expected DIM=N with a dim name and a positive integer (e.g. seq=512)")
        if name in out:
            raise UsageError(f"--max {name} is given twice")
        out[name] = int(value)
    return out


def run(args: argparse.Namespace) -> int:
    compiled = api.compile(
        args.model, target=args.target, output=args.output, opt_level=args.opt_level,
        input_shapes=args.input_shape, tuning_db=args.tuning_db, schedules=args.schedules,
        dim_bounds=parse_dim_bounds(args.max_dims), precision=args.precision,
    )
    total = sum(compiled.timings.values())
    if args.json:
        print_json({"bundle": args.output, "digest": compiled.bundle_digest, "target": compiled.target.name,
                    "timings": compiled.timings, "total_seconds": total})
        return 0
    rows = [[name, f"{sec:.3f}"] for name, sec in compiled.timings.items()]
    print(table(rows, ["stage", "seconds"]))
    where = "embedded" if compiled.embedded_params else "params.npz"
    print(f"{args.model} -> {args.output} ({compiled.target.name}, -O{args.opt_level}, weights {where}) "
          f"in {total:.2f} s")
    print(f"digest {compiled.bundle_digest} (pin it: graphopt run --expect-digest ...)")
    return 0

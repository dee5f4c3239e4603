"""``graphopt bench`` for aarch64 on an x86 host: compile (or take the bundle), time it under qemu, and
report which kernels use NEON. Emulation times are not device times: no ratio against ONNX Runtime."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from graphopt.core import io
from graphopt.front.commands.common import table
from graphopt.core.errors import UsageError

UNSUPPORTED = {"profile": "--profile", "float_model": "--float-model", "plot": "--plot", "markdown": "--markdown"}


def wanted(args: argparse.Namespace) -> bool:
    """Whether this bench runs under qemu: aarch64 bundles, or models compiled for an aarch64 target."""
    from graphopt.front import api

    bundles = [m for m in args.models if os.path.isdir(m)]
    emulated = [b for b in bundles if api.is_emulated_bundle(b)]
    files = [m for m in args.models if not os.path.isdir(m)]
    by_target = bool(files) and api.emulated_target(args.target)
    if emulated and (len(emulated) < len(bundles) or (files and not by_target)):
        raise UsageError(f"{emulated[0]} is an aarch64 bundle, timed under qemu: bench it apart from "
                         "models and bundles that run natively")
    return bool(emulated) or by_target


def bench(args: argparse.Namespace) -> int:
    from graphopt.front import api

    for key, option in UNSUPPORTED.items():
        if getattr(args, key, None):
            raise UsageError(f"{option} is not available for aarch64 code timed under qemu")
    results, digests, note = [], iter(args.expect_digest), ""  # one per bundle directory, in order (checked already)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-aarch64-") as tmp:
        for i, model in enumerate(args.models):
            bundle, compile_s = model, None
            if not os.path.isdir(model):
                bundle = os.path.join(tmp, f"b{i}")
                compiled = api.compile(model, target=args.target, output=bundle, opt_level=args.opt_level,
                                       input_shapes=list(args.input_shape), tuning_db=args.tuning_db,
                                       schedules=not args.untuned)
                compile_s = round(sum(compiled.timings.values()), 2)
            digest = next(digests, None) if bundle is model else None
            timed = api.bench_emulated(bundle, repeat=args.repeat, warmup=args.warmup, threads=args.threads,
                                       digest=digest)
            note = timed["note"]
            results.append({"model": model, "target": timed["target"], "emulated": True,
                            "qemu": {k: timed[k] for k in ("median_ms", "min_ms", "max_ms", "load_s")},
                            "runs_ms": timed["runs_ms"], "compile_s": compile_s, "kernels": timed["kernels"]})
    rows = [[r["model"], r["target"], r["qemu"]["min_ms"], r["qemu"]["median_ms"], r["qemu"]["max_ms"],
             "-" if r["compile_s"] is None else r["compile_s"]] for r in results]
    print(table(rows, ["model", "target", "qemu min ms", "qemu median ms", "qemu max ms", "compile s"]))
    print(f"note: {note}")
    for r in results:
        ks = r["kernels"]
        total = sum(k["instructions"] for k in ks) or 1
        print(f"\n{r['model']}: {sum(k['neon'] > 0 for k in ks)} of {len(ks)} kernels use NEON "
              f"({100 * sum(k['neon'] for k in ks) / total:.0f}% of their instructions); "
              f"sdot/udot {sum(k['dot'] for k in ks)}, fp16 arithmetic {sum(k['fp16'] for k in ks)}")
        print(table([[k["kernel"], k["instructions"], f"{100 * k['neon_share']:.0f}%", k["vector_fma"], k["dot"],
                      k["fp16"]] for k in ks[: args.top]],
                    ["kernel (largest first)", "instructions", "NEON", "vector FMA", "sdot/udot", "fp16"]))
    if args.json:
        io.atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0

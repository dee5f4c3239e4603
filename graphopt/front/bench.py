"""``graphopt bench``: latency of compiled models against ONNX Runtime, same inputs, same threads.

Each model is measured in a child process (``python -m graphopt.front.bench``) so that ``TVM_NUM_THREADS``
is set before TVM's thread pool starts and ORT gets the same ``intra_op_num_threads``. A result is
a plain dict (the JSON written by ``--json``)::

    {"model", "target", "threads", "repeat", "warmup", "untuned", "input_shapes",
     "graphopt": {"min_ms", "median_ms", "max_ms", "mean_ms"}, "ort": {...} or None,
     "ratio": graphopt median / ORT median, "ratio_min": graphopt min / ORT min, "flops", "gflops": FLOPs / graphopt median,
     "ort_gflops", "compile_s", "schedules": {rule: functions}, "profile": [{"function", "ms", "share", "calls"}],
     "tuning_db", "default": {...} (with a database: the default schedules, same run), "ratio_default",
     "tuning": {"functions", "searched", "candidates", "search_s", "metaschedule_trials"},
     "ort_float": {...} (with ``float_model``: ORT running the float model, same run), "ratio_float":
     graphopt median / ORT float median, "ort_ratio_float": ORT median / ORT float median}

Given a QDQ model and its float original (``float_model``), one run times graphopt's integer
bundle, ORT on the same QDQ model (its int8 kernels) and ORT on the float model.

graphopt and ORT take turns in blocks of runs (``interleaved``), so a slow spell of a shared machine
falls on both.
FLOPs are ``graphopt.core.summary.summarize`` (2 per multiply-add). ``profile`` times every call the
Relax VM makes (fused kernels and builtins) with an instrument, so the slowest kernels are visible.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, UsageError
from graphopt.core.timing import BLOCK, WARMUP_MIN_SECONDS, interleaved, ort_timer, stats_ms

RESULT_FIELDS = (
    "model", "target", "threads", "repeat", "warmup", "untuned", "input_shapes", "graphopt", "ort",
    "ratio", "ratio_min", "flops", "gflops", "ort_gflops", "compile_s", "schedules", "profile",
)


def _is_bundle(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def _model_source(model: str, input_shapes: list[str]) -> tuple[str | None, list[str]]:
    """The ONNX path behind ``model`` (a file, a bundled name, or a bundle's recorded source) and its shapes."""
    if _is_bundle(model):
        with open(os.path.join(model, "manifest.json")) as f:
            manifest = json.load(f)
        if not input_shapes:  # the shapes the bundle was compiled for (its source may leave them dynamic)
            input_shapes = [f"{i['name']}:{','.join(str(d) for d in i['shape'])}" for i in manifest.get("inputs", [])
                            if all(isinstance(d, int) for d in i.get("shape", [None]))]
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        src = source.get("path") or manifest.get("source_path")
        if not (src and os.path.isfile(src)):
            return None, input_shapes
        from graphopt.models import sha256_file

        if source.get("sha256") and sha256_file(src) != source["sha256"]:  # not the model the bundle was built from
            print(f"graphopt bench: note: {model}: its source {src} changed since compiling; no ONNX Runtime "
                  "comparison", file=sys.stderr)
            return None, input_shapes
        return src, input_shapes
    from graphopt.front.api import input_shapes_for, resolve_model_path

    return str(resolve_model_path(model)), list(input_shapes_for(model, list(input_shapes)) or [])


def _inputs_for(runner, onnx_path: str | None, shapes: list[str]) -> dict[str, np.ndarray]:
    from graphopt.models import random_inputs

    if onnx_path is not None:
        feeds = random_inputs(onnx_path, input_shapes=shapes or None)
        return {n: feeds[n] for n, _, _ in runner.inputs if n in feeds} or feeds
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(d) if d.startswith("float") else np.zeros(s, d) for n, s, d in runner.inputs}


def measure(
    model: str,
    *,
    target: str = "x86",
    threads: int,
    against: str | None = "ort",
    input_shapes: list[str] = (),
    repeat: int = 20,
    warmup: int = 3,
    untuned: bool = False,
    profile: bool = False,
    opt_level: int = 2,
    frontend: str = "graphopt",
    tuning_db: str | None = None,
    float_model: str | None = None,
) -> dict[str, Any]:
    """Compile (or load) ``model`` and time it in this process (``TVM_NUM_THREADS`` already set).

    With ``tuning_db``, the model is compiled twice, with the default schedules and with the
    database, and both are timed in this run ("default" holds the first, "graphopt" the tuned one).
    """
    from graphopt.front import api

    onnx_path, shapes = _model_source(model, list(input_shapes))
    schedules: dict[str, int] = {}
    t0 = time.perf_counter()
    if _is_bundle(model):
        bundle = api.load_bundle(model)
        runner = bundle.runner
        target_name = (bundle.manifest.get("target") or {}).get("name", "bundle")
    else:
        m = api.load(onnx_path, input_shapes=shapes or None)
        default_runner = None
        if tuning_db is not None:
            default_runner = api.compile(m, target=target, opt_level=opt_level, frontend=frontend).runner()
            t0 = time.perf_counter()
        compiled = api.compile(m, target=target, opt_level=opt_level, schedules=not untuned, frontend=frontend,
                               tuning_db=tuning_db)
        for rule in ({} if untuned else api.schedule_report()).values():
            schedules[rule] = schedules.get(rule, 0) + 1
        runner = compiled.runner()
        target_name = compiled.target.name
    compile_s = time.perf_counter() - t0
    feeds = _inputs_for(runner, onnx_path, shapes)
    runner(**feeds)  # every weight touched once: the peak RSS below is graphopt's own, before ORT loads
    memory = {"load_s": None if getattr(runner, "load_seconds", None) is None else round(runner.load_seconds, 3),
              "weights_mapped_mb": round(getattr(runner, "weights_mapped_bytes", 0) / 2**20, 1),
              "weights_copied_mb": round(getattr(runner, "weights_copied_bytes", 0) / 2**20, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    timers = {"graphopt": api.timer(runner, feeds)}
    if tuning_db is not None:  # the default schedules and the tuned module, in the same run
        timers["default"] = api.timer(default_runner, feeds)
    if against == "ort" and onnx_path is not None:
        timers["ort"] = ort_timer(onnx_path, feeds, threads)
    if float_model is not None:  # the float original of a QDQ model, on ORT, in the same turns
        from graphopt.front.api import resolve_model_path

        timers["ort_float"] = ort_timer(str(resolve_model_path(float_model)), feeds, threads)
    times = interleaved(timers, repeat, warmup)
    go = times["graphopt"]
    result: dict[str, Any] = {
        "model": model, "target": target_name, "threads": threads, "repeat": repeat, "warmup": warmup,
        "untuned": untuned, "input_shapes": shapes, "graphopt": stats_ms(go), "ort": None, "ratio": None, "ratio_min": None,
        "flops": None, "gflops": None, "ort_gflops": None, "compile_s": round(compile_s, 2),
        "schedules": schedules, "profile": None, "tuning_db": tuning_db, "default": None, "ratio_default": None,
        **memory,
    }
    if tuning_db is not None:
        result["default"] = stats_ms(times["default"])
        result["tuning"] = api.tuning_summary(m, target=target, opt_level=opt_level, tuning_db=tuning_db)
    if onnx_path is not None:
        try:
            from graphopt.front import api
            from graphopt.core.summary import summarize

            result["flops"] = summarize(api.load(onnx_path, input_shapes=shapes or None)).get("flops")
        except GraphoptError:
            result["flops"] = None
    if "ort" in times:
        result["ort"] = stats_ms(times["ort"])
        result["ratio"] = round(result["graphopt"]["median_ms"] / result["ort"]["median_ms"], 3)
        result["ratio_min"] = round(result["graphopt"]["min_ms"] / result["ort"]["min_ms"], 3)
        if result["default"]:
            result["ratio_default"] = round(result["default"]["median_ms"] / result["ort"]["median_ms"], 3)
    if "ort_float" in times:
        result["ort_float"] = stats_ms(times["ort_float"])
        result["ratio_float"] = round(result["graphopt"]["median_ms"] / result["ort_float"]["median_ms"], 3)
        if result["ort"]:
            result["ort_ratio_float"] = round(result["ort"]["median_ms"] / result["ort_float"]["median_ms"], 3)
    if result["flops"]:
        result["gflops"] = round(result["flops"] / (result["graphopt"]["median_ms"] * 1e6), 2)
        if result["ort"]:
            result["ort_gflops"] = round(result["flops"] / (result["ort"]["median_ms"] * 1e6), 2)
    if profile:
        result["profile"] = api.profile(runner, feeds, runs=max(3, min(repeat, 10)))
    return result


def bench(models: list[str], *, threads: int | None = None, **options) -> list[dict[str, Any]]:
    """Measure each model in a child process with ``TVM_NUM_THREADS=threads`` (default: all cores)."""
    if not models:
        raise UsageError("bench needs at least one model, bundle or name (e.g. light:squeezenet)")
    if options.get("against") not in (None, "ort", "none"):
        raise UsageError(f"--against must be 'ort' or 'none', got {options.get('against')!r}")
    if options.get("repeat", 20) < 1 or options.get("warmup", 3) < 0:
        raise UsageError("--repeat must be at least 1 and --warmup at least 0")
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    for m in models:
        if not (os.path.exists(m) or ":" in m):
            raise UsageError(f"{m}: no such file, bundle directory or model name")
    float_model = options.get("float_model")
    if float_model is not None:
        if len(models) != 1:
            raise UsageError(f"--float-model {float_model}: give exactly one (QDQ) model with it, got {len(models)}")
        if not (os.path.isfile(float_model) or ":" in float_model):
            raise UsageError(f"--float-model {float_model}: no such file or model name")
    return [_measure_in_child(m, threads=threads, **options) for m in models]


def _measure_in_child(model: str, *, threads: int, **options) -> dict[str, Any]:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    payload = json.dumps({"model": model, "threads": threads, **options})
    proc = subprocess.run(
        [sys.executable, "-m", "graphopt.front.bench", payload], env=env, capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise GraphoptError(f"{model}: benchmark failed: {_last_line(proc.stderr)}")
    reply = json.loads(lines[-1])
    if "error" in reply:
        raise GraphoptError(f"{model}: {reply['error']}")
    return reply


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _child_main(payload: str) -> int:
    opts = json.loads(payload)
    model = opts.pop("model")
    try:
        result = measure(model, **opts)
    except GraphoptError as e:
        print(json.dumps({"error": str(e).splitlines()[0]}))
        return 0
    print(json.dumps(result))
    return 0


def markdown(results: list[dict[str, Any]], command: str = "", top: int = 5) -> str:
    """The results as a Markdown page: one table of latencies, then the slowest kernels per model."""
    import platform

    lines = ["# graphopt benchmarks", ""]
    if command:
        lines += [f"Generated by `{command}`", ""]
    r0 = results[0]
    tuned = bool(r0.get("tuning_db"))
    mode = ("untuned (no default schedules)" if r0["untuned"] else
            f"tuned with `{r0['tuning_db']}`, beside the default schedules in the same run" if tuned else
            "default schedules, no tuning")
    lines += [f"Machine: {platform.machine()}, {os.cpu_count()} cores; target {r0['target']}, {r0['threads']} threads "
              f"for graphopt (`TVM_NUM_THREADS`) and ONNX Runtime (`intra_op_num_threads`); "
              f"{r0['repeat']} timed runs after {r0['warmup']} or more warm-up runs (at least {WARMUP_MIN_SECONDS:g} s), "
              f"graphopt and ORT taking turns every {BLOCK} runs; {mode}. "
              f"Load average when written: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
              "(other processes on the machine slow both sides).", ""]
    head = "| model | graphopt min / median / max ms | ORT min / median ms | ratio (median) | ratio (min) | GFLOP/s | ORT GFLOP/s | compile s |"
    if tuned:
        head = ("| model | default schedules median ms | ratio | tuned min / median / max ms | ORT min / median ms "
                "| ratio (median) | ratio (min) | GFLOP/s | ORT GFLOP/s | compile s |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        g, o = r["graphopt"], r["ort"] or {}
        default = ""
        if tuned:
            default = f"{(r.get('default') or {}).get('median_ms', float('nan')):.2f} | {r.get('ratio_default') or '-'} | "
        lines.append(f"| {r['model']} | {default}{g['min_ms']:.2f} / {g['median_ms']:.2f} / {g['max_ms']:.2f} | "
                     f"{o.get('min_ms', float('nan')):.2f} / {o.get('median_ms', float('nan')):.2f} | "
                     f"{r['ratio'] if r['ratio'] is not None else '-'} | {r.get('ratio_min') or '-'} | "
                     f"{r['gflops'] or '-'} | {r['ort_gflops'] or '-'} | {r['compile_s']} |")
    if tuned:
        lines += ["", "What the database holds for each model's fused functions (graphopt's schedule search, "
                      "then MetaSchedule; records shared by every model tuned into it):", "",
                  "| model | functions | searched | candidates | search s | MetaSchedule trials |", "|---|---|---|---|---|---|"]
        for r in results:
            t = r.get("tuning") or {}
            lines.append(f"| {r['model']} | {t.get('functions', '-')} | {t.get('searched', '-')} | "
                         f"{t.get('candidates', '-')} | {t.get('search_s', '-')} | {t.get('metaschedule_trials', '-')} |")
    lines += ["", "ratio = graphopt / ORT latency (below 1: graphopt is faster); GFLOP/s at the median. FLOPs from "
              "`graphopt.core.summary.summarize` (2 per multiply-add).", ""]
    for r in results:
        if r.get("profile"):
            lines += [f"## {r['model']}: slowest functions", "", "| function | ms per run | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{p['function']}` | {p['ms']:.3f} | {100 * p['share']:.1f}% | {p['calls']} |" for p in r["profile"][:top]]
            if r.get("schedules"):
                lines += ["", "Functions per schedule rule: " + ", ".join(f"{k} {v}" for k, v in sorted(r["schedules"].items()))]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: list[dict[str, Any]], path: str | Path) -> Path:
    """A bar chart of median latency per model, graphopt beside ORT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["model"]).name for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(results)), 3.5))
    ax.bar(x - 0.2, [r["graphopt"]["median_ms"] for r in results], 0.4, label="graphopt")
    if any(r["ort"] for r in results):
        ax.bar(x + 0.2, [r["ort"]["median_ms"] if r["ort"] else 0 for r in results], 0.4, label="ONNX Runtime")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"{results[0]['target']}, {results[0]['threads']} threads")
    ax.legend()
    fig.tight_layout()
    from graphopt.core.io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # never a half-written picture
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))

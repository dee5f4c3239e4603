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
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, UsageError

RESULT_FIELDS = (
    "model", "target", "threads", "repeat", "warmup", "untuned", "input_shapes", "graphopt", "ort",
    "ratio", "ratio_min", "flops", "gflops", "ort_gflops", "compile_s", "schedules", "profile",
)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "min_ms": round(min(ms), 4),
        "median_ms": round(statistics.median(ms), 4),
        "max_ms": round(max(ms), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


def _is_bundle(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def _model_source(model: str, input_shapes: list[str]) -> tuple[str | None, list[str]]:
    """The ONNX path behind ``model`` (a file, a bundled name, or a bundle's recorded source) and its shapes."""
    if _is_bundle(model):
        with open(os.path.join(model, "manifest.json")) as f:
            manifest = json.load(f)
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        src = source.get("path") or manifest.get("source_path")
        if not (src and os.path.isfile(src)):
            return None, input_shapes
        from graphopt.backends.compile import sha256_file

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


VM_ROW = "(VM: allocation, shape checks, calls)"


def profile_vm(vm, args: list, runs: int = 3) -> list[dict[str, Any]]:
    """Mean time per run spent in each fused function the VM calls, slowest first, with its share.

    Each call is timed from Python (``set_instrument``), which adds its own cost, and that cost lands
    on the VM's cheap builtins (PP-OCRv4 rec: ~25 ms a run "in" alloc_tensor, in a 13-23 ms run). So
    the builtins are one row: the uninstrumented run time minus the kernels' time.
    """
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(func, symbol, before, ret, *rest):
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] += time.perf_counter() - started.pop()
            calls[symbol] += 1
        return 0

    plain_runs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm["main"](*args)
        plain_runs.append(time.perf_counter() - t0)
    plain = statistics.median(plain_runs)  # one slow run of a noisy machine made a 2.4 ms "VM" row of 0.3
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](*args)
    finally:
        vm.set_instrument(lambda *a: 0)
    kernels = {k: v / runs for k, v in totals.items() if not k.startswith("vm.builtin.")}
    builtin_calls = sum(c for k, c in calls.items() if k.startswith("vm.builtin.")) // runs
    spent = sum(kernels.values())
    rest = max(0.0, plain - spent)
    total = (spent + rest) or 1.0
    rows = [{"function": k, "ms": round(v * 1e3, 4), "share": round(v / total, 4), "calls": calls[k] // runs}
            for k, v in kernels.items()]
    if builtin_calls:
        rows.append({"function": VM_ROW, "ms": round(rest * 1e3, 4), "share": round(rest / total, 4),
                     "calls": builtin_calls})
    return sorted(rows, key=lambda r: -r["ms"])


WARMUP_MIN_SECONDS = 1.0  # a new process's first runs are slow (thread pools, page faults, clocks)


def warm_up(run, warmup: int) -> None:
    """Call ``run`` ``warmup`` times, and on until ``WARMUP_MIN_SECONDS`` have passed (at most 1000 calls).

    With three runs of a 12 ms model, the first model of a ``bench`` run measured 40% slower than the
    same bundle timed again right after it; a second of warm-up narrows that gap (to about 25% on the
    noisy 2-core machine measured), it does not close it.
    """
    start, n = time.perf_counter(), 0
    while n < warmup or (time.perf_counter() - start < WARMUP_MIN_SECONDS and n < 1000):
        run()
        n += 1


BLOCK = 5  # timed runs per turn when graphopt and ORT take turns
# Each turn starts with untimed runs for at least this long: the other side's thread pool spins on the
# same cores for a while after its last run (ORT's PP-OCRv4 cls, 0.7 ms alone, timed 0.7 to 2.1 ms
# when one untimed run began each turn).
SETTLE_SECONDS = 0.05


def interleaved(timers: dict[str, Any], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Time every ``timers[name](n) -> [seconds] * n`` for ``repeat`` runs, taking turns in blocks.

    Run one after the other, a slow minute of a shared machine lands on one side only (ORT alone
    moved 40% between two runs here); taking turns every ``BLOCK`` runs spreads it over both, so the
    ratio holds where the absolute times do not. Each turn starts with one untimed run (the other
    side's thread pool may still be spinning) and goes on for ``SETTLE_SECONDS``.
    """
    for run in timers.values():
        warm_up(lambda run=run: run(1), warmup)
    out: dict[str, list[float]] = {name: [] for name in timers}
    while any(len(v) < repeat for v in out.values()):
        for name, run in timers.items():
            n = min(BLOCK, repeat - len(out[name]))
            if n > 0:
                _settle(run)
                out[name] += run(n)
    return out


def _settle(run) -> None:
    start = time.perf_counter()
    run(1)
    while time.perf_counter() - start < SETTLE_SECONDS:
        run(1)


def _vm_timer(vm, args, dev):
    return lambda n: list(vm.time_evaluator("main", dev, number=1, repeat=n)(*args).results)


def _ort_timer(onnx_path: str, feeds: dict, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run(None, feeds)
            out.append(time.perf_counter() - t)
        return out

    return run


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
    import tvm

    onnx_path, shapes = _model_source(model, list(input_shapes))
    schedules: dict[str, int] = {}
    t0 = time.perf_counter()
    if _is_bundle(model):
        from graphopt.front.api import load_bundle

        bundle = load_bundle(model)
        runner = bundle.runner
        target_name = (bundle.manifest.get("target") or {}).get("name", "bundle")
    else:
        from graphopt.front import api
        from graphopt.backends.compile import compile_model

        m = api.load(onnx_path, input_shapes=shapes or None)
        from graphopt.backends import schedules as sched

        default_runner = None
        if tuning_db is not None:
            default_runner = compile_model(m, target=target, opt_level=opt_level, frontend=frontend).runner()
            t0 = time.perf_counter()
        compiled = compile_model(m, target=target, opt_level=opt_level, schedules=not untuned, frontend=frontend,
                                 tuning_db=tuning_db)
        for rule in ({} if untuned else sched.last_report()).values():
            schedules[rule] = schedules.get(rule, 0) + 1
        runner = compiled.runner()
        target_name = compiled.target.name
    compile_s = time.perf_counter() - t0
    feeds = _inputs_for(runner, onnx_path, shapes)
    vm, args = _vm_args(runner, feeds)
    timers = {"graphopt": _vm_timer(vm, args, runner.device)}
    if tuning_db is not None:  # the default schedules and the tuned module, in the same run
        timers["default"] = _vm_timer(*_vm_args(default_runner, feeds), runner.device)
    if against == "ort" and onnx_path is not None:
        timers["ort"] = _ort_timer(onnx_path, feeds, threads)
    if float_model is not None:  # the float original of a QDQ model, on ORT, in the same turns
        from graphopt.front.api import resolve_model_path

        timers["ort_float"] = _ort_timer(str(resolve_model_path(float_model)), feeds, threads)
    times = interleaved(timers, repeat, warmup)
    go = times["graphopt"]
    result: dict[str, Any] = {
        "model": model, "target": target_name, "threads": threads, "repeat": repeat, "warmup": warmup,
        "untuned": untuned, "input_shapes": shapes, "graphopt": stats_ms(go), "ort": None, "ratio": None, "ratio_min": None,
        "flops": None, "gflops": None, "ort_gflops": None, "compile_s": round(compile_s, 2),
        "schedules": schedules, "profile": None, "tuning_db": tuning_db, "default": None, "ratio_default": None,
    }
    if tuning_db is not None:
        result["default"] = stats_ms(times["default"])
        result["tuning"] = _tuning_summary(m, target, opt_level, tuning_db)
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
        result["profile"] = profile_vm(vm, args, runs=max(3, min(repeat, 10)))
    return result


def _vm_args(runner, feeds):
    import tvm

    arrays = runner.check_inputs((), feeds)
    args = [tvm.runtime.tensor(a, runner.device) for a in arrays] + list(getattr(runner, "_params", []))
    return runner.vm, args


def _tuning_summary(model, target: str, opt_level: int, db_dir: str) -> dict[str, Any]:
    """What the database holds for this model's fused functions (see ``tuning.model_summary``)."""
    from graphopt.backends.compile import fused_module
    from graphopt.backends.targets import get_target
    from graphopt.backends.tuning import model_summary

    spec = get_target(target)
    return model_summary(fused_module(model, spec, opt_level=opt_level), spec.target, db_dir)


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

"""``graphopt search``: try compression configurations, measure each, keep the best within an accuracy budget.

Each configuration (``search_space``) is built from the ``-O2``-optimized float model exactly as
``graphopt optimize`` builds it (prune, then quantize or convert weights; with ``fallback``, the
``--max-drop`` machinery of ``graphopt.compression.compress``), then measured: the real-label metric
(its drop from the float model), the file size (bytes, and after gzip), FLOPs
(``graphopt.core.summary``) and latency (ONNX Runtime on the CPU by default, or a caller's function).

Resumable: every measured configuration is appended to ``DIR/results.jsonl`` as one line as soon as
it is done, pruned (and reconstructed) models are kept under ``DIR/pruned/``, and a rerun skips
what is there. The best configuration is the lowest latency (or size) among those within
``max_drop`` of the float model; ``best_options`` turns it into a ``graphopt optimize --config`` file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.compression.search_space import BASELINE, Config, expand, load_space, order
from graphopt.core import io
from graphopt.core.errors import GraphoptError, UsageError
from graphopt.core.progress import Bar

OBJECTIVES = ("latency", "size")
RESULTS = "results.jsonl"
SETUP = "search.json"
SETUP_KEYS = ("model", "metric", "input_shapes", "calibration", "latency", "samples", "data")


@dataclasses.dataclass
class SearchResult:
    rows: list[dict[str, Any]]  # every configuration measured in the directory, this run's and earlier runs'
    baseline: dict[str, Any]
    best: dict[str, Any] | None  # None: no configuration within the budget
    pending: list[str]  # configurations left for a rerun (budget or --trials reached)
    skipped: list[tuple[str, str]]  # (configuration, why) not measured: see skip_reason
    new: int  # configurations measured by this run
    max_drop: float
    objective: str
    latency: str  # how latency was measured
    notes: list[str]

    def within(self, row: dict[str, Any]) -> bool:
        return within(row, self.max_drop)


def within(row: dict[str, Any], max_drop: float) -> bool:
    return "error" not in row and row["drop"] <= max_drop + 1e-12


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``20m`` or ``1.5h``."""
    s = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(s[-1:], None)
    try:
        value = float(s[:-1] if scale else s) * (scale or 1)
    except ValueError:
        raise UsageError(f"--budget {text}: expected a duration such as 90s, 20m or 1h") from None
    if not value > 0:
        raise UsageError(f"--budget {text}: must be more than zero")
    return value


def ort_latency(threads: int, repeat: int = 20, warmup: int = 3) -> tuple[Callable[[ir.Model], float], str]:
    """A latency function (ms of the fastest of ``repeat`` ONNX Runtime CPU runs of an in-memory model on
    fixed random inputs: on a shared host the least disturbed run ranks configurations more steadily than
    the median) and its description."""
    import onnxruntime as ort

    def measure(model: ir.Model) -> float:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        feeds = random_feeds(model)
        for _ in range(warmup):
            sess.run(None, feeds)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    return measure, f"ONNX Runtime CPU, {threads} threads, fastest of {repeat} runs"


def random_feeds(model: ir.Model) -> dict[str, np.ndarray]:
    """Seeded inputs for timing: normal floats, zero integers; every dimension must be fixed."""
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        dims = list(v.shape or [])
        if not all(isinstance(d, int) for d in dims):
            raise UsageError(f"input {v.name} has dynamic shape {dims}: fix it with --input-shape {v.name}:D0,D1,...")
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        feeds[v.name] = (rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                         else np.zeros(dims, dtype))
    return feeds


def optimized(source: str | os.PathLike, input_shapes: Sequence[str] | None) -> ir.Model:
    """The model as ``graphopt optimize -O2`` leaves it before compression."""
    from graphopt.core import io as core_io
    from graphopt.core.pipeline import DEFAULT_PIPELINE, PassContext, run_pipeline
    from graphopt.core.shapes import specialize
    from graphopt.passes import default_registry
    from graphopt.passes.graphopt_ops import with_target_runtime

    model = core_io.load(source)
    if input_shapes:
        specialize(model, list(input_shapes))
    ctx = PassContext(opt_level=2, options=with_target_runtime(None, "onnx"))
    return run_pipeline(model, DEFAULT_PIPELINE, ctx, default_registry()).model


class Builder:
    """Builds a configuration's model from the float model, keeping pruned models for reuse (on disk)."""

    def __init__(self, float_model: ir.Model, source, metric, calibration, cache_dir: Path):
        self.float_bytes = ir.serde.serialize_model(float_model).SerializeToString()
        self.source, self.metric = source, metric
        self.calibration, self.cache_dir = calibration, cache_dir

    def float_copy(self) -> ir.Model:
        return ir.serde.deserialize_model(_proto(self.float_bytes))

    def _options(self, cfg: Config, *, prune: bool, **extra):
        """CompressOptions for ``cfg``'s storage format, and its pruning when ``prune``."""
        from graphopt.compression.compress import CompressOptions

        kw: dict[str, Any] = {}
        if cfg.quantize in ("fp16", "bf16"):
            kw["weights"] = cfg.quantize
        elif cfg.quantize != "none":
            kw["quantize"] = cfg.quantize
        if cfg.method:
            kw["method"] = cfg.method
        if prune and cfg.pruned:
            kw.update(prune=f"channels:{cfg.prune:g}", prune_layers=cfg.prune_layers, reconstruct=cfg.reconstruct)
        if cfg.quantize == "int8" or (prune and cfg.pruned):  # pruning ranks channels by their activations
            kw["calibration"] = self.calibration
        return CompressOptions(**kw, **extra)

    def pruned(self, cfg: Config) -> ir.Model:
        """The float model pruned (and reconstructed) as ``cfg`` says, from the cache when it is there."""
        from graphopt.compression.compress import compress

        spec = Config(prune=cfg.prune, reconstruct=cfg.reconstruct, prune_layers=cfg.prune_layers)
        path = self.cache_dir / (hashlib.sha256(spec.key.encode()).hexdigest()[:16] + ".onnx")
        if path.is_file():
            return ir.serde.deserialize_model(_proto(path.read_bytes()))
        model = compress(self.float_copy(), self._options(spec, prune=True), source=self.source).model
        self.cache_dir.mkdir(exist_ok=True)
        io.atomic_write_bytes(path, ir.serde.serialize_model(model).SerializeToString())
        return model

    def build(self, cfg: Config) -> tuple[ir.Model, dict[str, Any]]:
        from graphopt.compression.compress import compress

        if cfg.fallback:  # one compress call, as optimize --max-drop runs it
            opts = self._options(cfg, prune=True, max_drop=cfg.fallback, metric=self.metric)
            res = compress(self.float_copy(), opts, source=self.source)
            return res.model, _budget_notes(res.report)
        model = self.pruned(cfg) if cfg.pruned else self.float_copy()
        if cfg.quantize == "none":
            return model, {}
        return compress(model, self._options(cfg, prune=False), source=self.source).model, {}


def _proto(data: bytes):
    import onnx

    return onnx.load_from_string(data)


def _budget_notes(report: dict[str, Any]) -> dict[str, Any]:
    """What the fallback did: layers kept float, channel groups left unpruned (by name)."""
    notes = {}
    if "budget" in report:
        notes["kept_float"] = list(report["budget"]["kept_float"])
    if "budget" in report.get("prune", {}):
        notes["left_unpruned"] = list(report["prune"]["budget"]["restored"])
    return notes


def measure(model: ir.Model, metric, latency: Callable[[ir.Model], float]) -> dict[str, Any]:
    """Score, size, gzip size, FLOPs and latency of one model."""
    import gzip

    from graphopt.compression.compress import score
    from graphopt.compression.pruning import flops

    data = ir.serde.serialize_model(model).SerializeToString()
    return {"score": score(metric, model, "searched"), "bytes": len(data), "gzip_bytes": len(gzip.compress(data, 6)),
            "flops": flops(model), "latency_ms": round(latency(model), 4)}


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows by key; a line cut short by an interruption is ignored (that configuration runs again)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[row["key"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """One line, written in one call and synced: a crash leaves at most a cut line that reads as absent."""
    line = (json.dumps(row, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(path):
            line = b"\n" + line  # after a cut line, start a fresh one
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _check_setup(out_dir: Path, setup: dict[str, Any]) -> None:
    """A results directory belongs to one model, metric and measurement; another one is refused."""
    path = out_dir / SETUP
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise UsageError(f"-o {out_dir}: {path.name} is not a search record; use another directory")
        for key in SETUP_KEYS:
            if old.get(key) != setup.get(key):
                raise UsageError(f"-o {out_dir}: holds a search with {key} {old.get(key)!r}, this one has "
                                 f"{setup.get(key)!r}; use another directory (or the same settings to resume)")
    else:
        io.atomic_write_text(path, json.dumps(setup, indent=2) + "\n")


def search(model: str | os.PathLike, metric: str | Callable, *, max_drop: float, out_dir: str | os.PathLike,
           budget_s: float | None = None, strategy: str = "grid", trials: int | None = None, seed: int = 0,
           space: str | os.PathLike | dict | None = None, calibration: str | os.PathLike | None = None,
           input_shapes: Sequence[str] | None = None, objective: str = "latency",
           latency: tuple[Callable[[ir.Model], float], str] | None = None, threads: int | None = None,
           repeat: int = 20, samples: int | None = None, data: str | os.PathLike | None = None,
           progress: bool = False, log: Callable[[str], None] | None = None) -> SearchResult:
    """Measure the configurations of ``space`` on ``model`` (a file or catalogue name) until all are
    done, ``trials`` new ones are, or ``budget_s`` seconds have passed (checked between configurations);
    see the module docstring. ``metric``: a name (``ocr-rec``, ``ocr-det``, ``cosine``,
    ``module:function``) or a callable ``metric(run) -> score``. ``latency``: ``(function(model) -> ms,
    description)``, default ONNX Runtime (``ort_latency``). OCR metrics without ``calibration`` get
    32 rendered samples written to ``DIR/calibration.npz``."""
    from graphopt.compression import evaluate

    if not 0.0 < max_drop < 1.0:
        raise UsageError(f"--max-drop {max_drop}: must be between 0 and 1 (exclusive)")
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials {trials}: must be at least 1")
    configs = order(expand(space if isinstance(space, dict) else load_space(space), max_drop), strategy, seed)
    src = evaluate.base.model_path(model)
    scorer = evaluate.resolve_metric(metric, src, reference_path=src, samples=samples,
                                     input_shapes=list(input_shapes or []) or None, data=data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    rendered = calibration is None and isinstance(metric, str) and metric in evaluate.CALIBRATION_KINDS
    if rendered:
        calibration = out / "calibration.npz"
    if calibration is None:
        dropped = [c for c in configs if c.needs_calibration]
        configs = [c for c in configs if not c.needs_calibration]
        if dropped:
            notes.append(f"no --calibration: {len(dropped)} int8 or reconstructing configurations left out")
    threads = threads or os.cpu_count() or 1
    latency_fn, latency_desc = latency or ort_latency(threads, repeat)
    setup = {"model": str(src.resolve()), "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
             "input_shapes": list(input_shapes or []), "calibration": str(Path(calibration).resolve()) if calibration else None,
             "latency": latency_desc, "samples": samples, "data": str(data) if data else None}
    _check_setup(out, setup)
    if rendered and not calibration.is_file():
        evaluate.write_calibration(metric, calibration, 32, input_shape=(input_shapes or [None])[0], model=src)
        notes.append(f"calibration: 32 rendered {metric} samples written to {calibration}")
    for note in notes if log is not None else ():
        log(note)
    results_path = out / RESULTS
    done = read_results(results_path)
    start = time.monotonic()
    state: dict[str, Any] = {}

    def context():  # the optimized float model, made only when there is work
        if not state:
            state["builder"] = Builder(optimized(src, input_shapes), src, scorer, calibration, out / "pruned")
        return scorer, state["builder"]

    todo = [c for c in configs if c.key not in done]
    pending, skipped, new = [], [], 0
    with Bar(len(todo), desc="search", unit="config", enabled=progress) as bar:
        for cfg in todo:
            if (budget_s is not None and time.monotonic() - start >= budget_s) or (trials is not None and new >= trials):
                pending.append(cfg.key)
                continue
            reason = skip_reason(cfg, done, max_drop)
            if reason:
                skipped.append((cfg.key, reason))
                bar.update()
                continue
            bar.note(cfg.label)
            row = _run_one(cfg, context, latency_fn, done.get(BASELINE.key))
            if cfg.is_baseline and "error" in row:  # nothing can be compared with it
                raise GraphoptError(f"search: the float model {src} could not be measured: {row['error']}")
            append_result(results_path, row)
            done[cfg.key] = row
            new += 1
            bar.update()
            if log is not None:
                bar.write(_line(row, max_drop)) if bar.active else log(_line(row, max_drop))
    rows = list(done.values())  # every configuration measured in this directory, also outside this run's space
    baseline = done[BASELINE.key] if BASELINE.key in done else None
    if baseline is None:
        raise GraphoptError(f"search: the budget ended before the float model was measured; rerun with -o {out}")
    best = pick_best(rows, max_drop, objective)
    return SearchResult(rows, baseline, best, pending, skipped, new, max_drop, objective, latency_desc, notes)


def skip_reason(cfg: Config, done: dict[str, dict[str, Any]], max_drop: float) -> str | None:
    """Why ``cfg`` need not be measured, or None. A fallback is measured only when the configuration
    it falls back from is over the budget (else it builds the same model) or was skipped. A pruned
    configuration is skipped when the same pruning at the same or a lower ratio, unquantized, is
    already over the budget (quantizing or pruning more does not win accuracy back); its fallback
    still runs. Decided again on every run (it depends on ``max_drop``)."""
    if cfg.fallback:
        twin = done.get(cfg.twin.key)
        if twin is not None and "error" in twin:
            return f"{cfg.twin.label} failed"
        if twin is not None and within(twin, max_drop):
            return f"{cfg.twin.label} is within budget: the fallback would build the same model"
        if twin is None and skip_reason(cfg.twin, done, max_drop) is None:
            return f"{cfg.twin.label} not measured"
        return None
    if not cfg.pruned:
        return None
    for row in done.values():
        c = Config.from_dict(row["config"])
        if (row["key"] != cfg.key and "error" not in row and not c.fallback and c.quantize == "none" and c.pruned
                and c.reconstruct == cfg.reconstruct and c.prune_layers == cfg.prune_layers and c.prune <= cfg.prune
                and not within(row, max_drop)):
            return f"{c.label} is already over budget (drop {row['drop']:.4f})"
    return None


def _run_one(cfg: Config, context, latency_fn, baseline: dict | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"key": cfg.key, "label": cfg.label, "config": cfg.as_dict()}
    metric, builder = context()
    try:
        model, notes = builder.build(cfg)
        row.update(measure(model, metric, latency_fn))
        row.update(notes)
    except GraphoptError as e:  # this configuration cannot be built (nothing prunable, nothing quantizable)
        row["error"] = " ".join(str(e).split())[:300]
    base = row["score"] if cfg.is_baseline else (baseline or {}).get("score")
    if "score" in row and base is not None:
        row["drop"] = base - row["score"]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def pick_best(rows: list[dict[str, Any]], max_drop: float, objective: str) -> dict[str, Any] | None:
    """The fastest (or smallest) compressed configuration within the budget; None when there is none."""
    key = ("latency_ms", "bytes") if objective == "latency" else ("bytes", "latency_ms")
    candidates = [r for r in rows if r["key"] != BASELINE.key and within(r, max_drop)]
    return min(candidates, key=lambda r: (r[key[0]], r[key[1]], r["drop"]), default=None)


def closest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The compressed configuration with the smallest drop (for the message when none is within budget)."""
    return min((r for r in rows if r["key"] != BASELINE.key and "error" not in r),
               key=lambda r: r["drop"], default=None)


def best_options(result: SearchResult, *, calibration=None, input_shapes=None) -> dict:
    """The best configuration as a ``graphopt optimize --config`` file (keys are its option names).
    A fallback's outcome is written as what it decided (groups left unpruned as ``prune-layer NAME=0``,
    layers kept float as ``exclude``), so the file rebuilds the measured model without the metric."""
    if result.best is None:
        raise GraphoptError("search: no configuration within the budget")
    best = result.best
    cfg = Config.from_dict(best["config"])
    opts: dict[str, Any] = {"opt-level": 2}
    if input_shapes:
        opts["input-shape"] = list(input_shapes)
    opts.update(cfg.options())
    restored = [f"{g}=0" for g in best.get("left_unpruned", [])]
    if restored:
        opts["prune-layer"] = [*opts.get("prune-layer", []), *restored]
    if best.get("kept_float"):
        opts["exclude"] = list(best["kept_float"])
    if calibration is not None and (cfg.needs_calibration or cfg.pruned):
        opts["calibration"] = str(Path(calibration).resolve())
    return opts


def _line(row: dict[str, Any], max_drop: float) -> str:
    if "error" in row:
        return f"{row['label']}: error: {row['error']} ({row['seconds']:.0f} s)"
    mark = "within" if within(row, max_drop) else "over"
    return (f"{row['label']}: score {row['score']:.4f} (drop {row['drop']:+.4f}, {mark} budget), "
            f"{row['latency_ms']:.2f} ms, {row['bytes'] / 1e6:.2f} MB, {(row['flops'] or 0) / 1e9:.3f} GFLOPs "
            f"({row['seconds']:.0f} s)")

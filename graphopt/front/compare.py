"""graphopt -O3 against onnxslim on the same models: node counts, ONNX Runtime latency, accuracy.

For each model, the original, ``onnxslim.slim(model, model_check=False, input_shapes=...)``,
``graphopt.optimize(model, opt_level=3, input_shapes=...)`` (standard ONNX, for any runtime) and the
same with ``target_runtime="ort"`` (adds ONNX Runtime's FusedConv/FusedGemm) are each run in ONNX Runtime on the same
inputs (seeded random inputs of the given shapes): median latency of ``runs`` runs after warm-up, with
``threads`` intra-op threads (the four models' runs interleaved, so background load hits all alike;
thread pools do not spin between runs, so one model's pool does not slow the next one's run),
and the largest absolute difference of any output from the original's.
Node counts include the nodes of subgraphs. A tool that fails on a model leaves its columns empty and
its error in the row; the other columns are still measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import GraphoptError, ModelLoadError, UsageError
from graphopt.core.pipeline.instruments import count_nodes

TOOLS = ("original", "onnxslim", "graphopt", "graphopt-ort")


@dataclasses.dataclass
class ToolResult:
    nodes: int | None = None
    latency_ms: float | None = None
    max_abs_diff: float | None = None
    optimize_seconds: float | None = None
    error: str | None = None


@dataclasses.dataclass
class CompareRow:
    model: str
    input_shapes: list[str]
    results: dict[str, ToolResult]

    def to_dict(self) -> dict:
        return {"model": self.model, "input_shapes": self.input_shapes,
                **{tool: dataclasses.asdict(r) for tool, r in self.results.items()}}


def _resolve(spec: str) -> tuple[Path, list[str]]:
    from graphopt.front.api import input_shapes_for, resolve_model_path

    path = resolve_model_path(spec)
    if not path.exists():
        raise UsageError(f"{spec}: no such file or model name")
    return path, list(input_shapes_for(spec) or [])


def _session(proto: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # The models take turns one run at a time; a pool left spinning after its run competes for the
    # cores with the next model's run. On 2 cores that made run times bimodal (1.6 or 5.6 ms for
    # ShuffleNet) and doubled AlexNet's median, so the pools sleep between runs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(protos: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], *, runs: int, threads: int,
            errors: dict[str, str] | None = None):
    """Outputs and median latency (ms) of each model in ONNX Runtime: ``{name: (outputs, ms)}``.

    The timed runs are interleaved (one run of each model in turn), so that load from elsewhere on
    the machine falls on all of them alike; each model gets 3 warm-up runs first. A model ONNX Runtime
    cannot load or run is left out, with its error in ``errors``.
    """
    sessions, inputs, results, times = {}, {}, {}, {}
    for name, proto in protos.items():
        try:
            sess = _session(proto, threads)
            names = {i.name for i in sess.get_inputs()}
            inputs[name] = {k: v for k, v in feeds.items() if k in names}
            results[name] = sess.run(None, inputs[name])
            for _ in range(min(3, runs)):
                sess.run(None, inputs[name])
        except Exception as e:
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        sessions[name], times[name] = sess, []
    for _ in range(runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, inputs[name])
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (results[name], statistics.median(times[name])) for name in sessions}


def _max_diff(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    if len(outputs) != len(reference):
        return float("inf")
    diffs = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
             for a, b in zip(outputs, reference)]
    return max(diffs, default=0.0)


def _nodes(proto: onnx.ModelProto) -> int:
    return count_nodes(ir.serde.deserialize_model(proto))


def _slim(path: Path, shapes: list[str]) -> onnx.ModelProto:
    import onnxslim

    with contextlib.redirect_stdout(_io.StringIO()):
        return onnxslim.slim(str(path), model_check=False, input_shapes=shapes or None)


def _graphopt(path: Path, shapes: list[str], opt_level: int, options: dict | None,
              target_runtime: str = "onnx") -> onnx.ModelProto:
    from graphopt.front import api

    result = api.optimize(path, opt_level=opt_level, input_shapes=shapes or None, options=options,
                          target_runtime=target_runtime)
    return ir.to_proto(result.model)


def compare_model(
    spec: str,
    *,
    input_shapes: Sequence[str] | None = None,
    runs: int = 20,
    threads: int = 2,
    opt_level: int = 3,
    options: dict | None = None,
    seed: int = 0,
) -> CompareRow:
    """Compare original, onnxslim, graphopt and graphopt for ONNX Runtime on one model (a path or a name like ``rapidocr:rec``)."""
    from graphopt.models import random_inputs

    path, default_shapes = _resolve(spec)
    shapes = list(input_shapes or default_shapes)
    try:
        original = onnx.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a valid ONNX file: {_first_line(e)}") from None
    feeds = random_inputs(original, seed=seed, input_shapes=shapes or None)
    results = {tool: ToolResult() for tool in TOOLS}
    builders = {
        "original": lambda: original,
        "onnxslim": lambda: _slim(path, shapes),
        "graphopt": lambda: _graphopt(path, shapes, opt_level, options),
        "graphopt-ort": lambda: _graphopt(path, shapes, opt_level, options, "ort"),
    }
    protos = {}
    for tool in TOOLS:
        r = results[tool]
        try:
            start = time.perf_counter()
            protos[tool] = builders[tool]()
            if tool != "original":
                r.optimize_seconds = round(time.perf_counter() - start, 3)
            r.nodes = _nodes(protos[tool])
        except Exception as e:
            protos.pop(tool, None)
            if tool == "original":
                raise
            r.error = f"{type(e).__name__}: {_first_line(e)}"
    errors: dict[str, str] = {}
    measured = measure(protos, feeds, runs=runs, threads=threads, errors=errors)
    if "original" in errors:
        raise GraphoptError(f"{spec}: ONNX Runtime cannot run the original model: {errors['original']}")
    for tool, message in errors.items():
        results[tool].error = message
    reference = measured["original"][0]
    for tool, (outputs, ms) in measured.items():
        results[tool].latency_ms = ms
        results[tool].max_abs_diff = _max_diff(outputs, reference)
    return CompareRow(spec, shapes, results)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def compare(models: Sequence[str], **kwargs) -> list[CompareRow]:
    if not models:
        raise UsageError("compare: give at least one model (a path or a name such as rapidocr:rec)")
    return [compare_model(m, **kwargs) for m in models]


HEADER = ["model", "nodes orig", "onnxslim", "graphopt", "graphopt ort", "ORT ms orig", "onnxslim", "graphopt",
          "graphopt ort", "max|diff| onnxslim", "graphopt", "graphopt ort"]


def table_rows(rows: list[CompareRow]) -> list[list[str]]:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    out = []
    for row in rows:
        r = row.results
        out.append([
            row.model,
            *(fmt(r[t].nodes, "d") if not r[t].error else "error" for t in TOOLS),
            *(fmt(r[t].latency_ms, ".2f") for t in TOOLS),
            *(fmt(r[t].max_abs_diff, ".2e") for t in TOOLS[1:]),
        ])
    return out


def to_markdown(rows: list[CompareRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


def errors(rows: list[CompareRow]) -> list[str]:
    return [f"{row.model}: {tool}: {res.error}" for row in rows for tool, res in row.results.items() if res.error]

"""Compression after the -O pipeline: weight conversion, quantization and the accuracy budget.

Order (``compress``): [equalize] -> [prune (+ reconstruct), with its own budget fallback] ->
calibrate -> insert QDQ (or dynamic / weight-only) -> [bias correction] -> [budget: sensitivity
scan and fallback] -> [fp16/bf16 weights]. Pruning and quantization answer to one budget: both
measure their drop against the unpruned float model (``graphopt.compression.pruning``).

* ``quantize="int8"``: static QDQ from calibration data (``passes/quantize_qdq.py``).
* ``quantize="int8-dynamic"``: DynamicQuantizeLinear + MatMulInteger (``passes/quantize_dynamic.py``).
* ``quantize="int8-weights"|"int4-weights"``: block-wise weight-only MatMul/Gemm.
* ``weights="fp16"|"bf16"``: weights stored in half precision.
* ``max_drop`` with ``metric``: when the quantized model scores more than ``max_drop`` below the
  float model, each layer is scored quantized alone (its drop is its sensitivity) and the most
  sensitive layers stay float, as few as the budget allows (doubling, then bisection on their count).
The report says per layer what was done, its sensitivity, and which layers stayed float.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import GraphoptError, UnsupportedError, UsageError

QUANTIZE_MODES = ("int8", "int8-dynamic", "int8-weights", "int4-weights")
WEIGHT_DTYPES = ("fp16", "bf16")


@dataclasses.dataclass
class CompressOptions:
    quantize: str | None = None
    weights: str | None = None
    calibration: str | os.PathLike | None = None
    method: str = "percentile"
    percentile: float = 99.999
    samples: int | None = None
    activation_type: str = "uint8"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    equalize: bool = False
    bias_correction: bool = False
    max_drop: float | None = None
    metric: Any = None  # a name for graphopt.compression.evaluate.resolve_metric, or a callable metric(run) -> float
    block_size: int = 32
    target_runtime: str = "onnx"
    progress: bool = False
    prune: str | None = None  # "channels:R[:l1|l2]" or "magnitude:R[:l1|l2][:global|layer]"
    prune_layers: tuple[str, ...] = ()  # "NAME=R" per-layer ratios
    reconstruct: bool = False
    adaround: bool = False  # learn the rounding of int8 weights on the calibration data
    share_tolerance: float | None = None  # merge float weights equal within this relative tolerance

    def check(self) -> None:
        """Option errors, before any work."""
        from graphopt.compression.calibration import METHODS

        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UsageError(f"--quantize {self.quantize}: expected one of {', '.join(QUANTIZE_MODES)}")
        if self.weights is not None and self.weights not in WEIGHT_DTYPES:
            raise UsageError(f"--weights {self.weights}: expected one of {', '.join(WEIGHT_DTYPES)}")
        if self.weights is not None and self.quantize is not None:
            raise UsageError(f"--weights {self.weights} and --quantize {self.quantize} are alternatives: "
                             "quantized weights keep float32 scales")
        if self.method not in METHODS:
            raise UsageError(f"--calibration-method {self.method}: expected one of {', '.join(METHODS)}")
        if self.activation_type not in ("uint8", "int8"):
            raise UsageError(f"--activation-type {self.activation_type}: expected uint8 or int8")
        if self.quantize == "int8" and self.calibration is None:
            raise UsageError("--quantize int8 needs --calibration FILE.npz|DIR (sample inputs for the ranges)")
        spec = self.prune_spec()
        if self.prune_layers and spec is None:
            raise UsageError("--prune-layer needs --prune")
        if self.reconstruct and (spec is None or spec.kind != "channels" or self.calibration is None):
            raise UsageError("--reconstruct applies to --prune channels:R and needs --calibration")
        if self.calibration is not None and self.quantize != "int8" and (spec is None or spec.kind != "channels"):
            raise UsageError("--calibration is used only by --quantize int8 and --prune channels")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--calibration-samples {self.samples}: must be at least 1")
        if self.max_drop is not None:
            if not 0.0 < self.max_drop < 1.0:
                raise UsageError(f"--max-drop {self.max_drop}: must be between 0 and 1 (exclusive)")
            if self.metric is None:
                raise UsageError("--max-drop needs --metric (the score the budget is measured in)")
            if self.quantize not in ("int8", "int8-dynamic") and spec is None:
                raise UsageError("--max-drop applies to --quantize int8 or int8-dynamic and to --prune")
        elif self.metric is not None:
            raise UsageError("--metric is used only with --max-drop")
        if self.bias_correction and self.quantize != "int8":
            raise UsageError("--bias-correction applies to --quantize int8")
        if self.adaround and self.quantize != "int8":
            raise UsageError("--adaround applies to --quantize int8")
        if self.share_tolerance is not None and not 0.0 < self.share_tolerance < 1.0:
            raise UsageError(f"--share-tolerance {self.share_tolerance}: must be between 0 and 1 (exclusive), "
                             "relative to each weight's largest magnitude")


    def prune_spec(self):
        """The parsed ``--prune`` spec, or None."""
        if self.prune is None:
            return None
        from graphopt.compression.pruning import parse_spec

        return parse_spec(self.prune, self.prune_layers)


@dataclasses.dataclass
class CompressResult:
    model: ir.Model
    report: dict[str, Any]


def copy_model(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def name_nodes(model: ir.Model) -> None:
    """Give every main-graph node a unique name (layers are excluded and reported by name): unnamed
    nodes and repeats of an earlier node's name get ``<op>_<index>``."""
    taken = {n.name for n in model.graph if n.name}
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        seen.add(node.name)


def ort_run(model: ir.Model) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``run(feeds) -> {output name: array}`` over ONNX Runtime for an in-memory model."""
    from graphopt.compression.calibration import ort_session

    sess = ort_session(ir.serde.serialize_model(model).SerializeToString())
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds)))

    return run



def fewest_within_budget(count: int, within: Callable[[int], bool]) -> int:
    """The smallest k in 1..count for which ``within(k)`` holds (k most sensitive layers restored; more
    restored never hurts), by doubling then bisection, or ``count`` when none does."""
    lo, hi = 0, 1
    while hi < count and not within(hi):
        lo, hi = hi, min(2 * hi, count)
    if not within(hi):
        return count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            hi = mid
        else:
            lo = mid
    return hi

def score(metric, model: ir.Model, label: str) -> float:
    """The metric's score of ``model``; a metric that raises or returns a non-score is a GraphoptError."""
    name = getattr(metric, "name", getattr(metric, "__name__", "metric"))
    try:
        value = metric(ort_run(model))
    except GraphoptError:
        raise
    except Exception as e:  # noqa: BLE001 - the metric's own failure
        raise GraphoptError(f"metric {name} raised {type(e).__name__} on the {label} model: {e}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GraphoptError(f"metric {name} returned {value!r}, expected a number in [0, 1]") from None
    if not np.isfinite(value) or not -1e-6 <= value <= 1.0 + 1e-6:  # float rounding of a cosine is no error
        raise GraphoptError(f"metric {name} returned {value}, expected a number in [0, 1]")
    return min(max(value, 0.0), 1.0)


class Quantizer:
    """Quantizes copies of one float model with extra layers kept float (static or dynamic)."""

    def __init__(self, model: ir.Model, opts: CompressOptions, source: str | os.PathLike | None):
        self.float_model = model
        self.opts = opts
        self.data = None
        self.ranges: dict[str, tuple[float, float]] = {}
        self.notes: dict[str, Any] = {}
        if opts.quantize == "int8":
            from graphopt.passes.quantize_qdq import plan

            self.layers = [(n.name, n.op_type) for n in plan(model, opts.exclude).layers]
        else:
            from graphopt.passes.quantize_dynamic import dynamic_layers

            self.layers = [(n.name, n.op_type) for n in dynamic_layers(model, opts.exclude)]
        if not self.layers:
            kinds = "Conv, ConvTranspose, MatMul, Gemm or residual Add" if opts.quantize == "int8" else \
                "MatMul/Gemm with a constant 2-D weight, LSTM, GRU or RNN"
            raise UnsupportedError(f"--quantize {opts.quantize}: {source or 'the model'} has no quantizable op "
                                   f"({kinds}) outside --exclude")
        if opts.quantize == "int8":
            self._calibrate()

    def _calibrate(self) -> None:
        from graphopt.compression import calibration as cal
        from graphopt.passes.quantize_qdq import calibration_targets

        self.data = cal.load_calibration(self.opts.calibration, self.float_model, limit=self.opts.samples)
        targets = calibration_targets(self.float_model, self.opts.exclude)
        hists = cal.collect(self.float_model, targets, self.data, show=self.opts.progress)
        self.ranges = cal.ranges(hists, self.opts.method, self.opts.percentile)
        self.notes.update(samples=len(self.data), tensors=len(targets))

    def build(self, keep_float: Iterable[str] = ()) -> ir.Model:
        exclude = (*self.opts.exclude, *keep_float)
        model = copy_model(self.float_model)
        if self.opts.quantize == "int8":
            from graphopt.passes.bias_correction import BiasCorrectionPass
            from graphopt.passes.quantize_qdq import QuantizeQDQPass

            qpass = QuantizeQDQPass(self.ranges, activation_type=self.opts.activation_type,
                                    per_channel=self.opts.per_channel, exclude=exclude)
            qpass(model)
            self.notes["opset"] = model.opset_imports.get("")
            if qpass.opset_note and self.opts.per_channel:
                self.notes["per_tensor_weights_because"] = qpass.opset_note[:3]
            if self.opts.adaround:  # before bias correction: the bias then corrects what rounding left
                from graphopt.passes.adaround import AdaRoundPass

                ada = AdaRoundPass(self.float_model, self.data, show=self.opts.progress)
                ada(model)
                self.notes["adaround"] = {k: [round(a, 6), round(b, 6)] for k, (a, b) in ada.errors.items()}
            if self.opts.bias_correction:
                BiasCorrectionPass(self.float_model, self.data, show=self.opts.progress)(model)
        else:
            from graphopt.passes.quantize_dynamic import QuantizeDynamicPass

            QuantizeDynamicPass(exclude=exclude, per_channel=self.opts.per_channel)(model)
            self.notes["opset"] = model.opset_imports.get("")
        return model


def _weight_bytes(model: ir.Model, names: set[str]) -> dict[str, int]:
    out = {}
    for node in model.graph:
        if node.name in names:
            out[node.name] = sum(v.const_value.nbytes for v in node.inputs[1:]
                                 if v is not None and v.const_value is not None)
    return out


def budget_fallback(q: Quantizer, metric, max_drop: float,
                    base: float | None = None) -> tuple[ir.Model, dict[str, Any]]:
    """Keep the most sensitive layers float until the metric is within ``max_drop`` of the float model
    (``base``: the float score, when the float model here is already pruned)."""
    base = score(metric, q.float_model, "float") if base is None else base
    model = q.build()
    full = score(metric, model, "quantized")
    info: dict[str, Any] = {"float": base, "all_quantized": full, "max_drop": max_drop, "kept_float": []}
    if base - full <= max_drop:
        info.update(final=full, within_budget=True)
        return model, info
    names = [n for n, _ in q.layers]
    sens = {}
    for name in names:  # each layer quantized alone
        sens[name] = base - score(metric, q.build([m for m in names if m != name]), f"{name}-only quantized")
    ranked = sorted(names, key=lambda n: -sens[n])
    tried: dict[int, tuple[float, ir.Model]] = {}

    def attempt(k: int) -> bool:
        if k not in tried:
            m = q.build(ranked[:k])
            tried[k] = (score(metric, m, f"{k} layers float"), m)
        return base - tried[k][0] <= max_drop

    hi = fewest_within_budget(len(ranked), attempt)
    final, model = tried[hi] if hi in tried else (base, q.float_model)
    info.update(final=final, within_budget=base - final <= max_drop, kept_float=ranked[:hi],
                sensitivity=sens, evaluated={str(k): v[0] for k, v in sorted(tried.items())})
    return model, info


def resolve(metric, source, input_shapes=None):
    if metric is None or callable(metric):
        return metric
    from graphopt.compression.evaluate import resolve_metric

    return resolve_metric(metric, source, reference_path=source, input_shapes=input_shapes)


def compress(model: ir.Model, opts: CompressOptions, *, source: str | os.PathLike | None = None,
             input_shapes=None) -> CompressResult:
    """Compress an (optimized) model in place as ``opts`` says; ``source`` is the original file (metrics)."""
    opts.check()
    report: dict[str, Any] = {"quantize": opts.quantize, "weights": opts.weights}
    name_nodes(model)
    if opts.share_tolerance is not None:
        report["shared"] = share_parameters(model, opts.share_tolerance)
    if opts.equalize:
        from graphopt.passes.equalize import equalize

        model = equalize(model)
        report["equalized"] = True
    metric = resolve(opts.metric, source, input_shapes)
    base = None
    if opts.prune is not None:
        model, report["prune"], base = _prune(model, opts, metric)
    if opts.quantize in ("int8", "int8-dynamic"):
        q = Quantizer(model, opts, source)
        if opts.max_drop is not None:
            model, report["budget"] = budget_fallback(q, metric, opts.max_drop, base)
        else:
            model = q.build()
        report.update(q.notes)
        if opts.quantize == "int8":
            report.update(method=opts.method, activation_type=opts.activation_type)
        report["layers"] = _layer_rows(q, report.get("budget"), model)
    elif opts.quantize in ("int8-weights", "int4-weights"):
        from graphopt.passes.quantize_weights import quantize_weights

        model = quantize_weights(model, bits=8 if opts.quantize == "int8-weights" else 4,
                                 block_size=opts.block_size, target_runtime=opts.target_runtime)
    if opts.weights is not None:
        from graphopt.passes.convert_weights import convert_weights

        model = convert_weights(model, dtype=opts.weights)
    return CompressResult(model, report)


def share_parameters(model: ir.Model, tolerance: float) -> dict[str, Any]:
    """Merge float weights equal within ``tolerance`` (relative to each one's largest magnitude); what merged."""
    from graphopt.passes.parameter_sharing import ParameterSharingPass

    p = ParameterSharingPass(tolerance)
    p(model)
    return {"tolerance": tolerance, "merged": len(p.shared), "bytes_saved": sum(r[3] for r in p.shared),
            "max_abs_diff": max((r[2] for r in p.shared), default=0.0),
            "pairs": [{"kept": k, "removed": r, "max_abs_diff": d, "bytes": b} for k, r, d, b in p.shared]}


def _prune(model: ir.Model, opts: CompressOptions, metric) -> tuple[ir.Model, dict[str, Any], float | None]:
    """Pruning before quantization; the float model's score (the one budget both steps answer to)."""
    from graphopt.compression import pruning

    spec = opts.prune_spec()
    data = None
    if opts.calibration is not None:
        from graphopt.compression.calibration import load_calibration

        data = load_calibration(opts.calibration, model, limit=opts.samples)
    base = score(metric, model, "float") if opts.max_drop is not None else None
    pruned, report = pruning.prune(model, spec, exclude=opts.exclude, data=data, reconstruct=opts.reconstruct,
                                   metric=metric, max_drop=opts.max_drop, base=base, show=opts.progress)
    return pruned, report, base


def _layer_rows(q: Quantizer, budget: dict | None, model: ir.Model) -> list[dict[str, Any]]:
    kept = set((budget or {}).get("kept_float", []))
    sens = (budget or {}).get("sensitivity", {})
    float_bytes = _weight_bytes(q.float_model, kept)
    rows = []
    for name, op in q.layers:
        row = {"layer": name, "op": op, "status": "float (budget)" if name in kept else "int8"}
        if name in sens:
            row["sensitivity"] = sens[name]
        if name in kept:
            row["float_weight_bytes"] = float_bytes.get(name, 0)
        rows.append(row)
    for name in q.opts.exclude:
        rows.append({"layer": name, "op": "", "status": "float (excluded)"})
    return rows

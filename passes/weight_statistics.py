"""Annotate the weights of Conv / ConvTranspose / Gemm / MatMul with their min/max.

For every constant weight (initializer or Constant output) the pass records

* ``graphopt.min`` / ``graphopt.max``: the per-tensor minimum and maximum;
* ``graphopt.channel_min`` / ``graphopt.channel_max``: per output channel, for weights with at most
  ``MAX_CHANNELS`` (4096) output channels.

They are stored twice: as Python values in ``value.meta`` (for passes in the same process) and as
JSON strings in ``value.metadata_props`` (written into the saved model's ``value_info``, so they
survive ``save``/``load``). ``read_statistics`` reads them back from either place, and
``minmax_rescale`` is the quantizer's range mapping. The pass reports ``modified`` only when an
annotation was added or changed.

Output-channel axis of each weight (``_CHANNEL_AXIS``): Conv ``[C_out, C_in/g, k...]`` axis 0;
ConvTranspose ``[C_in, C_out/g, k...]``: channel ``g*C_out/g + j`` (axis 1 within each group);
Gemm axis 0 with ``transB`` else 1; MatMul the last axis.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import const_array, graphs_of

MAX_CHANNELS = 4096
KEYS = ("graphopt.min", "graphopt.max", "graphopt.channel_min", "graphopt.channel_max")


def minmax_rescale(x, lo, hi):
    """``(x - lo) / (hi - lo)``, elementwise and broadcasting; 0 where ``hi == lo`` (zero range)."""
    x, lo, hi = np.asarray(x, dtype=np.float64), np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    span = hi - lo
    zero = span == 0
    return np.where(zero, 0.0, (x - lo) / np.where(zero, 1.0, span))


def _per_channel_conv(w: np.ndarray, node: ir.Node) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def _per_channel_conv_transpose(w: np.ndarray, node: ir.Node) -> np.ndarray | None:
    group = node.attributes.get_int("group", 1)
    if w.ndim < 2 or w.shape[0] % group:
        return None
    c_in_g, c_out_g = w.shape[0] // group, w.shape[1]
    view = w.reshape(group, c_in_g, c_out_g, -1)  # channel (g, j) -> rows over (C_in/g, k...)
    return view.transpose(0, 2, 1, 3).reshape(group * c_out_g, -1)


def _per_channel_gemm(w: np.ndarray, node: ir.Node) -> np.ndarray | None:
    if w.ndim != 2:
        return None
    return w if node.attributes.get_int("transB", 0) else w.T


def _per_channel_matmul(w: np.ndarray, node: ir.Node) -> np.ndarray | None:
    if w.ndim < 2:
        return None
    return np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)


# op -> (weight input index, rows = output channels)
_CHANNEL_AXIS = {
    "Conv": (1, _per_channel_conv),
    "ConvTranspose": (1, _per_channel_conv_transpose),
    "Gemm": (1, _per_channel_gemm),
    "MatMul": (1, _per_channel_matmul),
}


def _number(x: np.generic) -> float | int:
    return x.item() if np.issubdtype(type(x), np.integer) else float(x)


def _statistics(w: np.ndarray, node: ir.Node) -> dict[str, Any] | None:
    if w.size == 0 or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        return None
    stats: dict[str, Any] = {"graphopt.min": _number(w.min()), "graphopt.max": _number(w.max())}
    rows = _CHANNEL_AXIS[node.op_type][1](w, node)
    if rows is not None and 0 < rows.shape[0] <= MAX_CHANNELS and rows.shape[1] > 0:
        stats["graphopt.channel_min"] = [_number(v) for v in rows.min(axis=1)]
        stats["graphopt.channel_max"] = [_number(v) for v in rows.max(axis=1)]
    return stats


def read_statistics(value: ir.Value) -> dict[str, Any]:
    """The recorded statistics of ``value`` (from ``meta``, else from ``metadata_props``); {} if none."""
    out = {k: value.meta[k] for k in KEYS if k in value.meta}
    if out:
        return out
    return {k: json.loads(value.metadata_props[k]) for k in KEYS if k in value.metadata_props}


def _annotate(value: ir.Value, stats: dict[str, Any]) -> bool:
    changed = False
    for key in KEYS:
        if key in stats:
            text = json.dumps(stats[key])
            if value.metadata_props.get(key) != text:
                value.metadata_props[key] = text
                changed = True
            value.meta[key] = stats[key]  # in-memory copy; not a change of the model
        elif key in value.metadata_props or key in value.meta:
            value.metadata_props.pop(key, None)
            value.meta.pop(key, None)
            changed = True
    return changed


class WeightStatisticsPass(ir.passes.InPlacePass):
    """Annotate weights with per-tensor and per-channel min/max."""

    def __init__(self) -> None:
        super().__init__()
        self.annotated = 0  # weights whose annotations changed in the last run

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.annotated = 0
        done: set[int] = set()
        for graph in list(graphs_of(model)):
            for node in graph:
                spec = _CHANNEL_AXIS.get(node.op_type)
                if spec is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= spec[0]:
                    continue
                value = node.inputs[spec[0]]
                if value is None or id(value) in done:
                    continue
                w = const_array(value)
                if w is None:
                    continue
                done.add(id(value))
                stats = _statistics(w, node)
                if stats is not None and _annotate(value, stats):
                    self.annotated += 1
                    # the annotations are saved in a value_info entry, which needs a type
                    if value.type is None:
                        value.type = ir.TensorType(ir.DataType.from_numpy(w.dtype))
                    if value.shape is None:
                        value.shape = ir.Shape(w.shape)
        return ir.passes.PassResult(model, self.annotated > 0)

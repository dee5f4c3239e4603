"""Shared pieces of the quantization passes: scales and zero points, weight quantization, and
bringing a model to an opset where the QDQ form is valid.

* Activations: uint8 asymmetric (``scale = (hi - lo) / 255``, zero point ``round(-lo / scale)``) or
  int8 symmetric (``scale = max(|lo|, |hi|) / 127``, zero point 0); the range always holds 0.
* Weights: int8 symmetric in ``[-127, 127]``, one scale per output channel (``axis``) or per tensor.
* Opset: per-channel ``DequantizeLinear`` (``axis``) needs opset 13, ``QuantizeLinear`` opset 10.
  :func:`prepare_opset` raises the opset through ``opset_upgrade.try_upgrade``; models at opset 9 or
  10 first move to 11 when every node kept its meaning between them (the ops of ``EXACT_TO_11``
  only gained negative axes, optional inputs or attributes whose default is the old behaviour).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import UnsupportedError

PER_CHANNEL_OPSET = 13
QDQ_OPSET = 10
INT32_MAX = np.iinfo(np.int32).max

EXACT_TO_11 = frozenset(
    """Conv ConvTranspose MaxPool AveragePool LpPool Gemm Softmax LogSoftmax Hardmax Concat Flatten
    ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceSumSquare Squeeze Unsqueeze Gather ArgMax ArgMin Split Compress DepthToSpace Scan Equal""".split()
)


def activation_params(lo: float, hi: float, activation_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point scalar of the activation type) for the range [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if activation_type == "int8":
        bound = max(-lo, hi)
        scale = bound / 127.0 if bound > 1e-30 else 1.0
        return np.array(scale, np.float32), np.array(0, np.int8)
    scale = (hi - lo) / 255.0 if hi - lo > 1e-30 else 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zp, np.uint8)


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scales) symmetric in [-127, 127]: one scale per index of ``axis``, or one."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        bound = np.array(np.abs(w).max() if w.size else 0.0, np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        bound = np.abs(w).max(axis=reduce) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(bound > 0, bound / 127.0, 1.0).astype(np.float32)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    q = np.clip(np.round(w / shaped), -127, 127).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias for a product scale ``s_x * s_w`` (scalar or per channel), saturated to int32."""
    q = np.round(np.asarray(b, np.float64) / np.asarray(scale, np.float64))
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32)


def _since(op: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except Exception:  # noqa: BLE001 - the op does not exist at that opset
        return None


def _legacy_blockers(model: ir.Model, old: int) -> list[str]:
    reasons = []
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx") or node.op_type in EXACT_TO_11:
            continue
        if _since(node.op_type, old) != _since(node.op_type, 11):
            reasons.append(f"node {node.name or node.op_type}: {node.op_type} changed between opset {old} and 11")
    return reasons


def prepare_opset(model: ir.Model, *, per_channel: bool) -> tuple[int, list[str]]:
    """Raise the model's opset so QDQ is valid (13 for per-channel weights, else at least 10).

    Returns (the opset now, why it could not reach 13). A model left below 10 is an UnsupportedError.
    """
    from graphopt.passes.opset_upgrade import try_upgrade, upgrade_blockers

    old = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if old >= PER_CHANNEL_OPSET or (not per_channel and old >= QDQ_OPSET):
        return old, []
    why: list[str] = []
    if old < 11:
        why = _legacy_blockers(model, old)
        if not why:
            model.opset_imports[""] = 11
    now = model.opset_imports.get("", old)
    if now >= 11:
        for target in (PER_CHANNEL_OPSET, 11) if per_channel else (QDQ_OPSET,):
            if try_upgrade(model, target):
                break
            why = why or upgrade_blockers(model, target)
    now = model.opset_imports.get("", old)
    if now < QDQ_OPSET:
        model.opset_imports[""] = old
        raise UnsupportedError(f"quantization needs opset {QDQ_OPSET} or newer (QuantizeLinear); the model is at "
                               f"opset {old} and cannot be upgraded exactly: {'; '.join(why[:3])}")
    return now, why

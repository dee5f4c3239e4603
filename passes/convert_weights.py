"""Store float32 weights in half precision (fp16 or bf16), with a Cast back to float32 after each.

Every float32 initializer that is read only as a weight is replaced by its fp16/bf16 copy and a
``Cast(to=FLOAT)`` whose output keeps the original name, so the graph's inputs, outputs and compute
stay float32 in any runtime (ONNX Runtime folds the Casts once, at session start) and the file holds
half the weight bytes. The numbers the model computes change only by the rounding of its weights.

A weight stays float32 when

* it overflows (a finite value above the half type's largest, 65504 for fp16) or loses too much:
  the relative L2 error of the rounded tensor is above ``MAX_RELATIVE_ERROR`` of its dtype (about
  twice the unit roundoff; a tensor of tiny values flushed to zero or to fp16 denormals fails it);
* it feeds an input that the rule table ``KEEP_FP32_INPUTS`` lists: normalization scales and biases,
  exponents and reductions, where a rounding error is amplified (sums of squares, Exp, Pow) or the
  input is read as a parameter rather than data (Resize scales);
* it feeds a node whose op type or name, or it is itself named, in ``keep_float32`` (the user's
  override);
* it has fewer than ``min_elements`` elements (a Cast for a scalar saves nothing), or it is also a
  graph input (an overridable default) or a graph output.

bf16 needs ``Cast`` from bfloat16, which ONNX has since opset 13: an older model is upgraded exactly
(``opset_upgrade.try_upgrade``) or refused with an error that says why. ONNX Runtime's CPU provider
runs Cast from bfloat16 at opset 13 and later.

With ``compute="fp16"`` (for targets that compute in fp16) the whole graph computes in fp16 instead,
except the ops of ``half_compute.COMPUTE_FP32`` and ``keep_float32``, which run in float32 between
Casts; inputs and outputs stay float32 (see ``half_compute``).

Run it last: canonical dtypes and constant folding would undo it (they fold a Cast of a constant).
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import UnsupportedError, UsageError
from graphopt.passes.rewrite_utils import graphs_of

DTYPES: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
# dtype -> tensor-wise relative L2 error above which a weight stays fp32 (2x the unit roundoff)
MAX_RELATIVE_ERROR: dict[str, float] = {"fp16": 2 * 2.0**-11, "bf16": 2 * 2.0**-8}
MIN_CAST_OPSET: dict[str, int] = {"fp16": 6, "bf16": 13}

_ALL = None  # every input of the op
# op type -> input indices whose constants stay float32 (None: all of them)
KEEP_FP32_INPUTS: dict[str, tuple[int, ...] | None] = {
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "BatchNormalization": (1, 2, 3, 4),
    "RMSNormalization": (1,),
    "LpNormalization": _ALL,
    "ReduceSumSquare": _ALL,
    "ReduceSum": _ALL,
    "ReduceLogSumExp": _ALL,
    "ReduceL2": _ALL,
    "CumSum": _ALL,
    "Exp": _ALL,
    "Pow": _ALL,
    "Softmax": _ALL,
    "LogSoftmax": _ALL,
    "Sqrt": _ALL,
    "Reciprocal": _ALL,
    "Resize": (1, 2),
    "Upsample": (1,),
    "Range": _ALL,
}


def rounding_loss(array: np.ndarray, dtype: str) -> tuple[bool, float]:
    """(overflows, relative L2 error) of ``array`` stored in ``dtype`` ("fp16" or "bf16")."""
    target = DTYPES[dtype].numpy()
    finite = np.isfinite(array)
    overflow = bool(np.any(np.abs(array[finite]) > float(ml_dtypes.finfo(target).max)))  # numpy's finfo: not bf16
    a = np.where(finite, array, 0).astype(np.float64)
    with np.errstate(over="ignore"):
        err = np.linalg.norm(a - a.astype(target).astype(np.float64))
    norm = np.linalg.norm(a)
    return overflow, float(err / norm) if norm > 0 else 0.0


def _rule_keeps(value: ir.Value) -> str | None:
    for user, index in value.uses():
        if user.domain not in ("", "ai.onnx"):
            continue
        if user.op_type in KEEP_FP32_INPUTS:
            indices = KEEP_FP32_INPUTS[user.op_type]
            if indices is None or index in indices:
                return f"input {index} of {user.op_type}"
    return None


class ConvertWeightsPass(ir.passes.InPlacePass):
    """Store float32 weights as fp16/bf16 with a Cast to float32 after each (compute stays float32)."""

    def __init__(self, dtype: str = "fp16", keep_float32: Iterable[str] = (), min_elements: int = 16,
                 compute: str = "float32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise UsageError(f"weight dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if compute not in ("float32", "fp16") or (compute == "fp16" and dtype != "fp16"):
            raise UsageError(f"compute {compute!r} with {dtype} weights: expected compute float32, or fp16 with fp16")
        self.compute = compute
        self.dtype = dtype
        self.keep_float32 = frozenset(keep_float32)
        self.min_elements = min_elements
        self.converted: list[str] = []  # names of the weights stored in half precision by the last run
        self.kept: dict[str, str] = {}  # weight name -> why it stayed float32

    def _check_keep_names(self, model: ir.Model) -> None:
        known = set()
        for graph in graphs_of(model):
            known.update(n.name for n in graph if n.name)
            if isinstance(graph, ir.Graph):
                known.update(graph.initializers)
        unknown = sorted(k for k in self.keep_float32 if k not in known and not onnx.defs.has(k))
        if unknown:
            raise UsageError(f"keep_float32: {', '.join(unknown)} is neither an ONNX op type nor a node or "
                             "weight name of the model")

    def _ensure_opset(self, model: ir.Model) -> None:
        from graphopt.passes.opset_upgrade import try_upgrade, upgrade_blockers

        need = MIN_CAST_OPSET[self.dtype]
        if model.opset_imports.get("", 1) >= need or try_upgrade(model, need):
            return
        why = "; ".join(upgrade_blockers(model, need)[:3])
        raise UnsupportedError(
            f"{self.dtype} weights need Cast from {self.dtype} (opset {need}); the model's opset "
            f"{model.opset_imports.get('')} cannot be upgraded exactly: {why}")

    def _why_kept(self, value: ir.Value, array: np.ndarray) -> str | None:
        if array.size < self.min_elements:
            return f"fewer than {self.min_elements} elements"
        if value.name in self.keep_float32:
            return "named in keep_float32"
        for user, _ in value.uses():
            if user.op_type in self.keep_float32 or (user.name and user.name in self.keep_float32):
                return f"feeds {user.name or user.op_type}, kept float32 by keep_float32"
        rule = _rule_keeps(value)
        if rule:
            return f"{rule} stays float32"
        overflow, error = rounding_loss(array, self.dtype)
        if overflow:
            return f"values beyond the {self.dtype} range"
        if error > MAX_RELATIVE_ERROR[self.dtype]:
            return f"relative error {error:.2g} in {self.dtype}"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.converted, self.kept = [], {}
        self._check_keep_names(model)
        if self.compute == "fp16":
            return self._convert_compute(model)
        candidates = []
        for graph in graphs_of(model):
            if not isinstance(graph, ir.Graph):
                continue
            for value in list(graph.initializers.values()):
                if (value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT
                        or value.is_graph_input() or value.is_graph_output() or not value.uses()):
                    continue
                try:
                    array = value.const_value.numpy()
                except Exception:  # data that cannot be read (missing external file)
                    continue
                why = self._why_kept(value, array)
                if why:
                    self.kept[value.name] = why
                else:
                    candidates.append((graph, value, array))
        if candidates:
            self._ensure_opset(model)
        for graph, value, array in candidates:
            self._convert(graph, value, array)
        return ir.passes.PassResult(model, bool(self.converted))

    def _convert_compute(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.passes.half_compute import convert_compute

        def weight_ok(array: np.ndarray) -> bool:
            overflow, error = rounding_loss(array, "fp16")
            return not overflow and error <= MAX_RELATIVE_ERROR["fp16"]

        before = sum(1 for n in model.graph if n.op_type == "Cast")
        self.converted = convert_compute(model, self.keep_float32, weight_ok)
        self.kept = {v.name: "read in float32" for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT}
        changed = bool(self.converted) or sum(1 for n in model.graph if n.op_type == "Cast") != before
        return ir.passes.PassResult(model, changed)

    def _convert(self, graph: ir.Graph, value: ir.Value, array: np.ndarray) -> None:
        name = value.name
        half = DTYPES[self.dtype]
        stored = ir.Value(name=f"{name}__{self.dtype}", shape=ir.Shape(array.shape), type=ir.TensorType(half),
                          const_value=ir.tensor(array.astype(half.numpy()), name=f"{name}__{self.dtype}"))
        cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{name}__cast")
        out = cast.outputs[0]
        ir.convenience.replace_all_uses_with(value, out)
        graph.initializers.pop(name)
        value.name = None
        out.name, out.type, out.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
        out.metadata_props.update(value.metadata_props)  # weight statistics stay on the float32 view
        graph.register_initializer(stored)
        if len(graph):
            graph.insert_before(graph.node(0), cast)
        else:
            graph.append(cast)
        self.converted.append(name)


def convert_weights(model: ir.Model, *, dtype: str, keep_float32: Iterable[str] = (),
                    compute: str = "float32") -> ir.Model:
    """Store the model's float32 weights as ``dtype`` ("fp16" or "bf16") in place; returns the model.

    ``compute="fp16"`` (with fp16) makes the graph compute in fp16 too, except the ops kept float32."""
    return ConvertWeightsPass(dtype, keep_float32, compute=compute)(model).model

"""Fold nodes whose inputs are all constant, shape subgraphs included, bounded by output size.

Built on onnxscript's constant folder (``onnxscript.optimizer.FoldConstantsPass``), which evaluates
nodes with ``onnx.reference``, resolves ``Shape`` of a statically shaped value, propagates partial
shapes through ``Shape → Gather/Slice → Concat → Reshape`` and inlines ``If`` whose condition is a
constant. graphopt replaces its size heuristics with one exact rule and a fixed deny list:

**Size rule.** Let *out* be the bytes of the folded tensor and *freed* the bytes of the node's
constant inputs that have no other use (they disappear with the node). The fold happens when
``out <= max_output_bytes`` or ``out <= freed``: a new tensor larger than what it replaces is
allowed up to ``max_output_bytes`` (default 1 MiB), so folding never grows the model by more than
that per folded node. The rule is checked before evaluating, from the inferred output shape
(an op that can create large tensors, such as ConstantOfShape, Expand, Tile or Range, is skipped
when its output shape cannot be inferred), and again on the evaluated tensor.

**Never folded:** QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear (they carry the
quantization), random ops (RandomNormal, RandomUniform, their -Like forms, Multinomial), and ops
with subgraphs (Loop, Scan, and If unless its condition is constant, in which case the taken branch
is inlined). Constant nodes left without consumers by the folding are removed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding as _cf

DEFAULT_MAX_OUTPUT_BYTES = 1 << 20

# Ops that must keep their node: they carry quantization parameters or are not deterministic.
NEVER_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Loop",
        "Scan",
    }
)

# Ops whose output can be far larger than their inputs: without an inferred shape, do not fold.
GROWING_OPS = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike"}
)


def _value_bytes(value: ir.Value) -> int | None:
    """Bytes of a statically shaped tensor value, from its type and shape; None if unknown."""
    if value.shape is None or value.dtype is None or not value.shape.is_static():
        return None
    if any(d < 0 for d in value.shape.dims):  # exporters write -1 for a dynamic dim
        return None
    if value.dtype == ir.DataType.STRING:
        return None
    return math.prod(value.shape.numpy()) * value.dtype.itemsize


def _freed_bytes(node: ir.Node) -> int:
    """Bytes of constant inputs used only by ``node`` and not graph outputs: folding frees them."""
    seen: set[int] = set()
    total = 0
    for v in node.inputs:
        if v is None or id(v) in seen or v.const_value is None or v.is_graph_output():
            continue
        seen.add(id(v))
        if all(user is node for user, _ in v.uses()):
            total += v.const_value.nbytes
    return total


class _BoundedFolder(_cf.FoldConstantsPass):
    """onnxscript's folder with graphopt's byte rule applied to the evaluated tensor."""

    def __init__(self, max_output_bytes: int) -> None:
        self.max_output_bytes = max_output_bytes
        self.skipped: list[str] = []
        super().__init__(
            shape_inference=True,
            input_size_limit=2**62,
            output_size_limit=2**62,
            should_fold=self._should_fold,
        )

    def _allowed(self, node: ir.Node, out_bytes: int) -> bool:
        return out_bytes <= self.max_output_bytes or out_bytes <= _freed_bytes(node)

    def _should_fold(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLD:
            return False
        if len(node.outputs) != 1:
            return False
        out_bytes = _value_bytes(node.outputs[0])
        if out_bytes is None:
            if node.op_type in GROWING_OPS:
                self.skipped.append(f"{node.name or node.op_type}: output shape unknown")
                return False
            return True  # checked again on the evaluated tensor
        if not self._allowed(node, out_bytes):
            self.skipped.append(f"{node.name or node.op_type}: {out_bytes} bytes over the bound")
            return False
        return True

    def process_node(self, node: ir.Node, is_function: bool):
        replacement = super().process_node(node, is_function)
        saturate = node.attributes.get("saturate") if node.op_type == "CastLike" else None
        if replacement is not None and saturate is not None:
            # onnxscript rewrites CastLike as a Cast without CastLike's saturate (float8 results change)
            for new in replacement.new_nodes:
                if new.op_type == "Cast":
                    new.attributes["saturate"] = ir.AttrInt64("saturate", saturate.as_int())
        return replacement

    def _prepare_folded_tensor(self, node: ir.Node, output_name: str, output_array: Any):
        if isinstance(output_array, np.ndarray) and not self._allowed(node, output_array.nbytes):
            self.skipped.append(f"{node.name or node.op_type}: {output_array.nbytes} bytes over the bound")
            return None
        return super()._prepare_folded_tensor(node, output_name, output_array)


def _remove_dead_constants(model: ir.Model) -> int:
    removed = 0
    for graph in model.graphs():
        for node in reversed(list(graph)):
            if (
                node.op_type == "Constant"
                and node.domain in ("", "ai.onnx")
                and all(not out.uses() and not out.is_graph_output() for out in node.outputs)
            ):
                graph.remove(node, safe=True)
                removed += 1
    return removed


class ConstantFoldingPass(ir.passes.InPlacePass):
    """Fold constant subgraphs, shape subgraphs included, bounded by output size."""

    def __init__(self, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, max_rounds: int = 4) -> None:
        super().__init__()
        if max_output_bytes < 0:
            raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_output_bytes = max_output_bytes
        self.max_rounds = max_rounds
        self.skipped: list[str] = []  # why nodes with constant inputs were left (last round)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # One sweep can expose more (an If inlined once its condition folds, a Cast become an
        # Identity), so sweep again, at most ``max_rounds`` times, until a sweep changes nothing.
        modified = False
        for _ in range(self.max_rounds):
            folder = _BoundedFolder(self.max_output_bytes)
            changed = bool(folder(model).modified)
            self.skipped = folder.skipped
            if not changed:
                break
            modified = True
            _remove_dead_constants(model)
        return ir.passes.PassResult(model, modified)

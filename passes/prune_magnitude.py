"""Magnitude pruning: the smallest weights of Conv/ConvTranspose/Gemm/MatMul layers set to zero.

Unstructured zeros keep every tensor's shape, so no runtime on a CPU runs the model faster for
them (ONNX Runtime's and graphopt's dense kernels multiply zeros like any other number). What they
buy is a smaller file *after compression* (zip/gzip of the .onnx): ``graphopt optimize`` reports
that size beside the raw one, and nothing else is claimed.

``scope="layer"``: each layer loses ``ratio`` of its weights (those of least ``|w|``).
``scope="global"``: one threshold over every layer on ``|w|`` divided by the layer's mean ``|w|``
(``norm="l1"``) or its root mean square (``norm="l2"``), so a layer with small weights is not
emptied just for its scale; layers differ in how much they lose. ``overrides`` gives a layer its
own ratio (outside the global threshold); ``exclude`` (node names or op types) keeps layers whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import UsageError
from graphopt.passes.prune_channels import NORMS, check_names, check_ratio
from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, new_const

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCOPES = ("layer", "global")


class PruneMagnitudePass(ir.passes.InPlacePass):
    """Zero the smallest-magnitude weights of each layer (or below one global, scale-free threshold)."""

    def __init__(self, ratio: float, *, overrides: Mapping[str, float] | None = None, exclude: Iterable[str] = (),
                 norm: str = "l2", scope: str = "layer"):
        super().__init__()
        check_ratio(ratio, "--prune magnitude")
        for name, r in (overrides or {}).items():
            check_ratio(r, f"--prune magnitude layer {name}")
        if norm not in NORMS:
            raise UsageError(f"--prune magnitude: norm {norm!r}: expected l1 or l2")
        if scope not in SCOPES:
            raise UsageError(f"--prune magnitude: scope {scope!r}: expected layer or global")
        self.ratio, self.overrides, self.exclude = ratio, dict(overrides or {}), frozenset(exclude)
        self.norm, self.scope = norm, scope
        self.rows: list[dict] = []

    def layers(self, model: ir.Model) -> list[tuple[ir.Node, np.ndarray]]:
        check_names(model, self.exclude, self.overrides, "--prune magnitude")
        out = []
        for node in model.graph:
            if node.op_type not in LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            if node.name in self.exclude or node.op_type in self.exclude:
                continue
            w = const_array(node.inputs[1])
            if w is not None and w.dtype.kind == "f" and w.ndim >= 2:
                out.append((node, w))
        return out

    def _scale(self, w: np.ndarray) -> float:
        a = np.abs(w.astype(np.float64))
        return float(a.mean() if self.norm == "l1" else np.sqrt((a ** 2).mean())) or 1.0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = self.layers(model)
        thresholds: dict[str, float] = {}
        pool = [(n, w) for n, w in layers if n.name not in self.overrides]
        if self.scope == "global" and pool and self.ratio > 0:
            scores = np.concatenate([np.abs(w).reshape(-1) / self._scale(w) for _, w in pool])
            cut = np.partition(scores, int(len(scores) * self.ratio))[int(len(scores) * self.ratio)]
            thresholds = {n.name: cut * self._scale(w) for n, w in pool}
        self.rows, old = [], []
        for node, w in layers:
            ratio = self.overrides.get(node.name, self.ratio)
            if node.name in thresholds:
                mask = np.abs(w) < thresholds[node.name]
            else:
                k = int(w.size * ratio)
                mask = np.zeros(w.size, bool)
                mask[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = True
                mask = mask.reshape(w.shape)
            zeros = int(mask.sum())
            self.rows.append({"layer": node.name, "op": node.op_type, "weights": int(w.size), "zeroed": zeros,
                              "share": zeros / max(w.size, 1)})
            if zeros:
                old.append(node.inputs[1])
                node.replace_input_with(1, new_const(model.graph, np.where(mask, 0, w).astype(w.dtype),
                                                     f"{node.inputs[1].name}_sparse", node))
        drop_unused_constants(model.graph, old)
        return ir.passes.PassResult(model, modified=bool(old))

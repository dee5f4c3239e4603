"""Structured channel pruning: whole output channels of Conv/ConvTranspose/Gemm/MatMul layers are
removed, with every consumer changed to match, so FLOPs, size and latency drop in any runtime.

:class:`passes.channel_groups.ChannelGroups` finds the groups of channels that must go together
(through BatchNorm, activations, depthwise convs, residual Adds, Concat, Split/Slice, Resize,
Reshape with known shapes). Each group that nothing blocks loses ``ratio`` of its channels (a
per-layer ratio from ``overrides`` wins, the smallest when several layers of a group have one);
the kept count of a group whose width is a multiple of ``multiple`` (16: the fp32 lanes of AVX-512,
graphopt's blocked channel layout) is rounded up to one, so vector-friendly widths stay so; other
groups round to a multiple of 4. A channel's
importance is the L1 or L2 norm of its weights in every layer that produces or reads it, each
layer's norms divided by their mean so no layer dominates by scale, summed over the group.
Groups whose channels reach a graph output keep them (output shapes never change); layers named in
``exclude`` (node names or op types) keep every channel they produce or read.

After the pass, ``rows`` lists each group (layers, channels, kept, why not pruned) and ``kept``
maps each changed layer to its kept input and output channel indices (reconstruction uses them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import UsageError
from graphopt.passes.channel_groups import ChannelGroups, Edit, Layout
from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, new_const

NORMS = ("l1", "l2")


def channel_norms(w: np.ndarray, axis: int, norm: str) -> np.ndarray:
    """Per-index norms of ``w`` along ``axis`` (every other axis reduced)."""
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(moved).sum(axis=1) if norm == "l1" else np.sqrt((moved ** 2).sum(axis=1))


def check_ratio(ratio: float, what: str) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise UsageError(f"{what}: ratio {ratio} is outside [0, 1)")


def check_names(model: ir.Model, exclude: Iterable[str], overrides: Iterable[str], what: str) -> None:
    """Every ``--exclude`` name is a node or an op type of ``model``, every per-layer ratio names a node."""
    names = {n.name for n in model.graph}
    ops = {n.op_type for n in model.graph}
    for name in exclude:
        if name not in names and name not in ops:
            raise UsageError(f"--exclude {name}: no node or op type of that name in the model")
    for name in overrides:
        if name not in names:
            raise UsageError(f"{what}: layer {name} is not a node of the model")


class PruneChannelsPass(ir.passes.InPlacePass):
    """Remove ``ratio`` of the output channels of every prunable channel group."""

    def __init__(self, ratio: float, *, overrides: Mapping[str, float] | None = None, exclude: Iterable[str] = (),
                 norm: str = "l2", multiple: int = 16, data=None, show: bool = False):
        super().__init__()
        check_ratio(ratio, "--prune channels")
        for name, r in (overrides or {}).items():
            check_ratio(r, f"--prune channels layer {name}")
        if norm not in NORMS:
            raise UsageError(f"--prune channels: norm {norm!r}: expected l1 or l2")
        self.ratio, self.overrides, self.exclude = ratio, dict(overrides or {}), frozenset(exclude)
        self.norm, self.multiple = norm, max(int(multiple), 1)
        self.data, self.show = data, show  # calibration samples: importance weighted by activations
        self.rows: list[dict] = []
        self.kept: dict[str, dict[str, np.ndarray]] = {}

    def _activation_rms(self, model: ir.Model, cg: ChannelGroups, edits: list[Edit]) -> dict[str, np.ndarray]:
        """Per-channel root mean square of each consumer's input over the calibration data."""
        from graphopt.compression.calibration import run_outputs

        axes = {e.node.inputs[0].name: e.layout.axis for e in edits}
        sums: dict[str, np.ndarray] = {}
        count = 0
        for values in run_outputs(model, list(axes), self.data, show=self.show, desc="channel importance"):
            count += 1
            for name, x in values.items():
                sq = np.moveaxis(x.astype(np.float64) ** 2, axes[name], 0).reshape(x.shape[axes[name]], -1).mean(1)
                sums[name] = sq + sums.get(name, 0)
        return {name: np.sqrt(s / max(count, 1)) for name, s in sums.items()}

    def _importance(self, model: ir.Model, cg: ChannelGroups) -> dict[int, np.ndarray]:
        """Per root group, a score per channel. Without data: the weights' norms in every layer that
        produces or reads the channel. With calibration data: in every layer that reads it, the norm of
        the weights that read the channel times the channel's RMS activation there (what removing it
        costs that layer's output, ignoring correlations)."""
        imp = {g.gid: np.zeros(g.size) for g in cg.roots()}
        edits = [e for e in cg.edits if e.kind == "const" and e.index == 1 and e.role in ("in", "out", "param")
                 and e.node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
        rms = None
        if self.data is not None:
            edits = [e for e in edits if e.role == "in"]
            rms = self._activation_rms(model, cg, edits)
        for e in edits:
            v = channel_norms(const_array(e.node.inputs[1]), e.axis, self.norm)
            if rms is not None:
                v = v * rms[e.node.inputs[0].name]
            v = v / max(v.mean(), 1e-12)
            pos = 0
            for gid, a, b in e.layout.segments:
                imp[cg.find(gid)][a:b] += v[pos:pos + b - a]
                pos += b - a
        return imp

    def _keep_count(self, size: int, ratio: float) -> int:
        """Channels kept: rounded up to ``multiple`` when ``size`` is a multiple of it (a width that fills
        vector registers stays one), else to a multiple of 4 (or of ``multiple`` when smaller)."""
        keep = size - int(math.floor(size * ratio + 1e-9))
        step = self.multiple if size % self.multiple == 0 else min(4, self.multiple)
        if keep < size:
            keep = min(size, int(math.ceil(keep / step)) * step)
        return max(keep, 1)

    def plan(self, model: ir.Model) -> tuple[ChannelGroups, dict[int, np.ndarray]]:
        """The groups and, per root group, the sorted channel indices kept (model unchanged)."""
        check_names(model, self.exclude, self.overrides, "--prune channels")
        cg = ChannelGroups(model)
        for e in cg.edits:
            if e.node.name in self.exclude or e.node.op_type in self.exclude:
                cg.block(e.layout, f"{e.node.name} excluded")
        imp = self._importance(model, cg)
        keep, self.rows = {}, []
        for g in cg.roots():
            ratios = [self.overrides[n] for n in g.layers if n in self.overrides]
            ratio = min(ratios) if ratios else self.ratio
            kept = g.size if g.blocked else self._keep_count(g.size, ratio)
            if kept < g.size:
                keep[g.gid] = np.sort(np.argsort(-imp[g.gid], kind="stable")[:kept])
            self.rows.append({"group": g.layers[0], "layers": list(dict.fromkeys(g.layers)), "channels": g.size,
                              "kept": kept, "ratio": ratio, "blocked": g.blocked[0] if g.blocked else None})
        return cg, keep

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cg, keep = self.plan(model)
        self.kept = {}
        if not keep:
            return ir.passes.PassResult(model, modified=False)

        def indices(layout: Layout) -> np.ndarray:
            parts, pos = [], 0
            for gid, a, b in layout.segments:
                k = keep.get(cg.find(gid), np.arange(cg.groups[cg.find(gid)].size))
                parts.append(pos + k[(k >= a) & (k < b)] - a)
                pos += b - a
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        old = []
        for e in cg.edits:
            idx = indices(e.layout)
            if len(idx) == e.layout.size:
                continue
            if e.kind == "const":
                value = e.node.inputs[e.index]
                old.append(value)
                arr = np.take(const_array(value), idx, axis=e.axis)
                e.node.replace_input_with(e.index, new_const(model.graph, arr, f"{value.name}_pruned", e.node))
                if e.role in ("in", "out") and e.index == 1:
                    self.kept.setdefault(e.node.name, {})[e.role] = idx
            elif e.kind == "group":
                e.node.attributes["group"] = ir.AttrInt64("group", len(idx))
            else:
                old += _rewrite_bounds(model.graph, e, idx)
        for value, layout in cg.layouts.items():
            if value.shape is not None and len(value.shape) > layout.axis:
                dims = list(value.shape.dims)
                dims[layout.axis] = len(indices(layout))
                value.shape = ir.Shape(dims)
        drop_unused_constants(model.graph, old)
        return ir.passes.PassResult(model, modified=True)


def _set_ints(graph: ir.Graph, node: ir.Node, name: str, index: int, values: list[int]) -> list[ir.Value]:
    """Write an int list to attribute ``name`` (when the node has it) or constant input ``index``."""
    if name in node.attributes:
        node.attributes[name] = ir.AttrInt64s(name, values)
        return []
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    before = node.inputs[index]
    dtype = const_array(before).dtype if before is not None else np.int64
    node.replace_input_with(index, new_const(graph, np.array(values, dtype=dtype), f"{node.name}_{name}", node))
    return [before] if before is not None else []


def _rewrite_bounds(graph: ir.Graph, e: Edit, idx: np.ndarray) -> list[ir.Value]:
    """Slice/Split/Reshape constants after pruning (``idx``: kept channels of the edit's layout)."""
    if e.kind == "reshape":
        shape = const_array(e.node.inputs[e.index]).copy()
        if shape[e.axis] == 0:
            return []
        shape[e.axis] = len(idx)
        before = e.node.inputs[e.index]
        e.node.replace_input_with(e.index, new_const(graph, shape, f"{before.name}_pruned", e.node))
        return [before]
    if e.kind == "split":
        sizes = [int(((idx >= a) & (idx < b)).sum()) for a, b in e.bounds]
        if "num_outputs" in e.node.attributes:
            e.node.attributes.pop("num_outputs")
        if "split" in e.node.attributes or (graph_opset(e.node) < 13):
            e.node.attributes["split"] = ir.AttrInt64s("split", sizes)
            return []
        return _set_ints(graph, e.node, "split", 1, sizes)
    (a, b), k = e.bounds[0], e.axis  # slice
    out = []
    for name, index, bound in (("starts", 1, a), ("ends", 2, b)):
        current = list(e.node.attributes[name].value) if name in e.node.attributes else \
            [int(v) for v in const_array(e.node.inputs[index]).reshape(-1)]
        current[k] = int((idx < bound).sum())
        out += _set_ints(graph, e.node, name, index, current)
    return out


def graph_opset(node: ir.Node) -> int:
    graph = node.graph
    model_opsets = getattr(graph, "opset_imports", {}) if graph is not None else {}
    return model_opsets.get("", 13)

"""Channel dependency groups: which output channels of which layers must be removed together.

A *group* is born at a layer that creates channels (a Conv or ConvTranspose with ``group == 1``, a
Gemm, a MatMul with a constant 2-D weight): its output channels. The analysis walks the main graph
in order and follows every value that carries a group's channels along one axis (its *layout*: the
axis and the list of ``(group, start, stop)`` segments the value's channels come from):

* elementwise and spatial ops (activations, pooling, Resize with scale 1 on channels, Pad without
  channel pads, reductions over other axes) keep the layout; per-channel constants beside them
  (a ``[1, C, 1, 1]`` bias, PRelu slopes) are sliced;
* BatchNormalization / InstanceNormalization keep it and slice their parameters; a depthwise Conv
  (``group == C`` in and out) keeps it, slices its weight and bias and gets the new ``group``;
* residual Add/Mul/Sub/Div/Max/Min/Sum of two values with layouts *ties* their groups (union): all
  producers of an Add prune the same channels or none;
* Concat on the channel axis lines segments up (offsets), Split/Slice on it cut them;
* Transpose, Squeeze/Unsqueeze, Flatten and Reshape move the axis when the static shapes show the
  channel dimension survives whole (the Reshape's shape constant is rewritten), else the group is
  refused;
* a layer that reads a layout consumes it (its weight's input-channel axis is sliced).

Anything else that reads a layout (an unknown op, a reduction or normalization over the channel
axis, attention's non-constant MatMul, a graph output, a subgraph) *blocks* every group in it: those
channels stay. The analysis changes nothing; :mod:`passes.prune_channels` applies it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import const_array, static_shape

Segment = tuple[int, int, int]  # (group id, start, stop)

PASSTHROUGH = frozenset({
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Identity",
    "Dropout", "Cast", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Shrink", "Sign",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow", "PRelu"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                    "ReduceSumSquare", "ReduceLogSumExp"})


@dataclasses.dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(b - a for _, a, b in self.segments)


@dataclasses.dataclass
class Edit:
    """One change pruning makes. ``kind``: ``const`` (slice ``node.inputs[index]`` along ``axis`` by
    ``layout``; ``role`` out/in/param), ``group`` (set the depthwise ``group`` attribute), ``reshape``
    (shape constant ``index``, entry ``axis``), ``slice`` / ``split`` (channel bounds ``bounds``)."""

    kind: str
    node: ir.Node
    layout: Layout
    index: int = 1
    axis: int = 0
    role: str = "param"
    bounds: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass
class Group:
    gid: int
    size: int
    layers: list[str] = dataclasses.field(default_factory=list)  # producers' node names
    blocked: list[str] = dataclasses.field(default_factory=list)  # reasons


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)


def _ints(node: ir.Node, name: str, index: int, opset: int, since: int) -> list[int] | None:
    """An int list given as attribute (before ``since``) or constant input ``index``."""
    if opset < since or name in node.attributes:
        attr = node.attributes.get(name)
        return list(attr.value) if attr is not None else None
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    arr = const_array(node.inputs[index])
    return None if arr is None else [int(v) for v in arr.reshape(-1)]


class ChannelGroups:
    """The dependency groups of ``model``'s main graph, the layout of every value that carries
    prunable channels, and the edits pruning makes (``edits``)."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 13)
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        self.layouts: dict[ir.Value, Layout] = {}
        self.edits: list[Edit] = []
        self.members: dict[str, set[int]] = {}  # node name -> groups it touches
        for node in self.graph:
            self._visit(node)
        for value, layout in self.layouts.items():
            if value.is_graph_output():
                self.block(layout, f"{value.name} is a graph output")
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.block(layout, f"{value.name} is read inside a subgraph")

    # union-find
    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.groups[ra].layers += self.groups[rb].layers
            self.groups[ra].blocked += self.groups[rb].blocked

    def roots(self) -> list[Group]:
        return [g for gid, g in self.groups.items() if self.find(gid) == gid]

    def block(self, layout: Layout | None, reason: str) -> None:
        for gid, _, _ in layout.segments if layout else ():
            self.groups[self.find(gid)].blocked.append(reason)

    def group_of(self, name: str) -> list[Group]:
        """The root groups a node (by name) produces, reads or carries."""
        return [self.groups[r] for r in sorted({self.find(g) for g in self.members.get(name, ())})]

    def _new_group(self, node: ir.Node, size: int, axis: int) -> Layout:
        gid = len(self.groups)
        self.groups[gid] = Group(gid, size, [node.name or node.op_type])
        self.parent[gid] = gid
        return Layout(axis, ((gid, 0, size),))

    def _edit(self, kind: str, node: ir.Node, layout: Layout, **kw) -> None:
        self.edits.append(Edit(kind, node, layout, **kw))
        self.members.setdefault(node.name, set()).update(g for g, _, _ in layout.segments)

    def _unify(self, a: Layout, b: Layout, where: str) -> bool:
        if a == b:
            return True
        whole = all(s == (g, 0, self.groups[g].size) for seg in (a.segments, b.segments) for s in seg for g in [s[0]])
        if a.axis != b.axis or len(a.segments) != len(b.segments) or not whole or \
                any(x[2] != y[2] for x, y in zip(a.segments, b.segments)):
            self.block(a, f"{where}: operands' channels do not line up")
            self.block(b, f"{where}: operands' channels do not line up")
            return False
        for (ga, _, _), (gb, _, _) in zip(a.segments, b.segments):
            self.union(ga, gb)
        return True

    # the walk
    def _visit(self, node: ir.Node) -> None:
        ins = [self.layouts.get(v) if v is not None else None for v in node.inputs]
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        handler = getattr(self, f"_op_{op}", None) if op else None
        if op in PASSTHROUGH:
            handler = self._passthrough
        elif op in ELEMENTWISE:
            handler = self._elementwise
        elif op in REDUCE:
            handler = self._reduce
        out = handler(node, ins) if handler else None
        if out is None:
            for layout in ins:
                self.block(layout, f"{node.op_type} {node.name} reads it")
            out = []
        for value, layout in zip(node.outputs, out):
            if layout is not None:
                self.layouts[value] = layout

    def _passthrough(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
            return None
        return [ins[0]]

    def _op_Resize(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        rank = len(node.inputs[0].shape or ())
        scales = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 3 and node.inputs[3] is not None or scales is None or scales.size != rank \
                or scales[ins[0].axis] != 1:
            return None
        return [ins[0]]

    _op_Upsample = _op_Resize

    def _op_Pad(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        pads = _ints(node, "pads", 1, self.opset, 11)
        rank = len(node.inputs[0].shape or ())
        axis = ins[0].axis
        if pads is None or len(pads) != 2 * rank or pads[axis] or pads[axis + rank]:
            return None
        return [ins[0]]

    def _elementwise(self, node, ins):
        out_shape = static_shape(node.outputs[0])
        layouts = [(v, lay) for v, lay in zip(node.inputs, ins) if lay is not None]
        if not layouts:
            return []
        if out_shape is None:
            return None
        rank = len(out_shape)
        first = None
        for v, lay in layouts:
            if v.shape is None:
                return None
            aligned = Layout(lay.axis + rank - len(v.shape), lay.segments)
            if first is None:
                first = aligned
            elif not self._unify(first, aligned, f"{node.op_type} {node.name}"):
                return None
        for i, v in enumerate(node.inputs):
            if v is None or ins[i] is not None:
                continue
            shape = static_shape(v)
            at = first.axis - (rank - len(shape)) if shape is not None else -1
            dim = shape[at] if shape is not None and at >= 0 else 1
            if dim == 1:
                continue
            if shape is None or dim != first.size or const_array(v) is None:
                self.block(first, f"{node.op_type} {node.name}: operand {v.name} has the channels unpruned")
                return None
            self._edit("const", node, first, index=i, axis=at)
        return [first]

    def _reduce(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        rank = len(node.inputs[0].shape or ())
        axes = _ints(node, "axes", 1, self.opset, 18 if node.op_type != "ReduceSum" else 13)
        if not axes:
            return None
        axes = sorted(a % rank for a in axes)
        axis = ins[0].axis
        if axis in axes:
            return None
        if not _int_attr(node, "keepdims", 1):
            axis -= sum(a < axis for a in axes)
        return [Layout(axis, ins[0].segments)]

    def _op_BatchNormalization(self, node, ins):
        if ins[0] is None or any(ins[1:]) or len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return None
        for i in range(1, len(node.inputs)):
            if const_array(node.inputs[i]) is None:
                return None
            self._edit("const", node, ins[0], index=i, axis=0)
        return [ins[0]]

    _op_InstanceNormalization = _op_BatchNormalization

    def _conv_weight(self, node) -> np.ndarray | None:
        return const_array(node.inputs[1]) if len(node.inputs) > 1 else None

    def _bias(self, node, layout: Layout, index: int) -> bool:
        if len(node.inputs) > index and node.inputs[index] is not None:
            if const_array(node.inputs[index]) is None:
                return False
            self._edit("const", node, layout, index=index, axis=0, role="out")
        return True

    def _op_Conv(self, node, ins, transpose: bool = False):
        w = self._conv_weight(node)
        x = node.inputs[0]
        if w is None or any(ins[1:]) or x.shape is None:
            return None
        group = _int_attr(node, "group", 1)
        c_in = w.shape[0] if transpose else w.shape[1] * group
        c_out = w.shape[1] * group if transpose else w.shape[0]
        if group > 1 and group == c_in == c_out and w.shape[1] == 1:  # depthwise
            if ins[0] is None:
                return []
            self._edit("const", node, ins[0], index=1, axis=0)
            self._edit("group", node, ins[0])
            if not self._bias(node, ins[0], 2):
                return None
            return [ins[0]]
        if group != 1:
            return None
        if ins[0] is not None:
            if ins[0].axis != 1:
                return None
            self._edit("const", node, ins[0], index=1, axis=0 if transpose else 1, role="in")
        out = self._new_group(node, c_out, 1)
        self._edit("const", node, out, index=1, axis=1 if transpose else 0, role="out")
        if not self._bias(node, out, 2):
            self.block(out, f"{node.name}: bias is not constant")
        return [out]

    def _op_ConvTranspose(self, node, ins):
        if node.attributes.get("output_shape") is not None and ins[0] is not None:
            return None
        return self._op_Conv(node, ins, transpose=True)

    def _op_Gemm(self, node, ins):
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2 or ins[1] is not None or (len(ins) > 2 and ins[2] is not None):
            return None
        trans_b = _int_attr(node, "transB", 0)
        if ins[0] is not None:
            if _int_attr(node, "transA", 0) or ins[0].axis != 1:
                return None
            self._edit("const", node, ins[0], index=1, axis=1 if trans_b else 0, role="in")
        n = w.shape[0 if trans_b else 1]
        out = self._new_group(node, n, 1)
        self._edit("const", node, out, index=1, axis=0 if trans_b else 1, role="out")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None:
                self.block(out, f"{node.name}: C is not constant")
            elif c.ndim >= 1 and c.shape[-1] == n and n > 1:
                self._edit("const", node, out, index=2, axis=c.ndim - 1, role="out")
        return [out]

    def _op_MatMul(self, node, ins):
        w = const_array(node.inputs[1])
        shape = node.inputs[0].shape
        if w is None or w.ndim != 2 or ins[1] is not None or shape is None:
            return None
        rank = len(shape)
        if ins[0] is not None:
            if ins[0].axis != rank - 1:
                return None
            self._edit("const", node, ins[0], index=1, axis=0, role="in")
        out = self._new_group(node, w.shape[1], rank - 1)
        self._edit("const", node, out, index=1, axis=1, role="out")
        return [out]

    def _op_Concat(self, node, ins):
        if not any(ins):
            return []
        rank = len(node.outputs[0].shape or ())
        axis = _int_attr(node, "axis", 0) % max(rank, 1)
        if not all(ins):
            return None
        if all(lay.axis == axis for lay in ins):
            return [Layout(axis, tuple(s for lay in ins for s in lay.segments))]
        for lay in ins[1:]:
            if not self._unify(ins[0], lay, f"Concat {node.name}"):
                return None
        return [ins[0]]

    def _sub(self, layout: Layout, a: int, b: int) -> Layout:
        segs, pos = [], 0
        for g, s, e in layout.segments:
            lo, hi = max(a, pos), min(b, pos + e - s)
            if lo < hi:
                segs.append((g, s + lo - pos, s + hi - pos))
            pos += e - s
        return Layout(layout.axis, tuple(segs))

    def _op_Split(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        rank = len(node.inputs[0].shape or ())
        lay = ins[0]
        if _int_attr(node, "axis", 0) % rank != lay.axis:
            return [lay] * len(node.outputs)
        sizes = [static_shape(o)[lay.axis] if static_shape(o) else None for o in node.outputs]
        if None in sizes or sum(sizes) != lay.size:
            return None
        bounds = tuple((sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes)))
        self._edit("split", node, lay, bounds=bounds)
        return [self._sub(lay, a, b) for a, b in bounds]

    def _op_Slice(self, node, ins):
        if ins[0] is None or any(ins[1:]):
            return None if any(ins) else []
        rank = len(node.inputs[0].shape or ())
        lay = ins[0]
        starts, ends = _ints(node, "starts", 1, self.opset, 10), _ints(node, "ends", 2, self.opset, 10)
        axes = _ints(node, "axes", 3, self.opset, 10)
        steps = _ints(node, "steps", 4, self.opset, 10) or [1] * len(starts or ())
        if starts is None or ends is None:
            return None
        axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
        if lay.axis not in axes:
            return [lay]
        k = axes.index(lay.axis)
        if steps[k] != 1:
            return None
        a, b = (min(max(v + lay.size if v < 0 else v, 0), lay.size) for v in (starts[k], ends[k]))
        self._edit("slice", node, lay, axis=k, bounds=((a, b),))
        return [self._sub(lay, a, max(a, b))]

    def _op_Transpose(self, node, ins):
        if ins[0] is None:
            return []
        rank = len(node.inputs[0].shape or ())
        perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
        return [Layout(perm.index(ins[0].axis), ins[0].segments)]

    def _reshaped(self, node, ins):
        """The output layout of a shape-changing op from its static shapes, or None."""
        src, dst = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if src is None or dst is None:
            return None
        axis = ins[0].axis
        before = math.prod(src[:axis])
        for j in range(len(dst)):
            if math.prod(dst[:j]) == before and dst[j] == src[axis] and \
                    math.prod(dst[j + 1:]) == math.prod(src[axis + 1:]):
                return Layout(j, ins[0].segments)
        return None

    def _op_Reshape(self, node, ins):
        if ins[0] is None or ins[1] is not None:
            return None if any(ins) else []
        out = self._reshaped(node, ins)
        shape = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if out is None or shape is None or shape.ndim != 1 or shape.size != len(node.outputs[0].shape):
            return None
        self._edit("reshape", node, out, index=1, axis=out.axis)
        return [out]

    def _op_Flatten(self, node, ins):
        if ins[0] is None:
            return []
        out = self._reshaped(node, ins)
        return None if out is None else [out]

    _op_Squeeze = _op_Flatten
    _op_Unsqueeze = _op_Flatten

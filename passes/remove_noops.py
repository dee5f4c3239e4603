"""Remove nodes that return their (first) input unchanged.

One rule per op, in ``RULES``: each returns the input that the node's output equals, or None (with the
reason it did not fire in the rule's docstring). A node is bypassed by pointing its users at that input;
when its output is a graph output, the input is renamed to keep the graph's interface (as onnx_ir's
identity elimination does), and the node stays where that is impossible (output from an input/initializer).
Broadcasting ops (x*1, x+0, Expand) are removed only when the constant cannot change x's shape or dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import can_bypass, const_array, graphs_of, replace_value, static_shape

INT64_MAX = np.iinfo(np.int64).max


def _input_or_attr(node: ir.Node, index: int, attr: str) -> np.ndarray | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        return const_array(node.inputs[index])
    if attr in node.attributes:
        return np.array(node.attributes[attr].value)
    return None


def _identity(node):
    return node.inputs[0]


def _dropout(node):
    """Inference Dropout only: training_mode absent or constant false, mask unused."""
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = const_array(node.inputs[2])
        if mode is None or bool(mode.any()):
            return None
    return node.inputs[0]


def _cast(node):
    """Cast to the dtype the input already has."""
    x = node.inputs[0]
    return x if x.dtype is not None and x.dtype.value == node.attributes.get_int("to", -1) else None


def _reshape(node):
    """Reshape whose constant target resolves to the input's static shape."""
    x, shape = node.inputs[0], static_shape(node.inputs[0])
    target = _input_or_attr(node, 1, "shape")
    if shape is None or target is None:
        return None
    allowzero = node.attributes.get_int("allowzero", 0)
    dims = [shape[i] if (d == 0 and not allowzero and i < len(shape)) else int(d) for i, d in enumerate(target)]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        if known == 0:
            return None
        dims[dims.index(-1)] = int(np.prod(shape)) // known
    return x if tuple(dims) == shape else None


def _transpose(node):
    """Transpose with the identity permutation (or of a rank <= 1 tensor)."""
    x = node.inputs[0]
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        return x if x.shape is not None and len(x.shape) <= 1 else None
    return x if list(perm) == list(range(len(perm))) else None


def _pad(node):
    """Pad whose pads are all zero."""
    pads = _input_or_attr(node, 1, "pads")
    return node.inputs[0] if pads is not None and pads.size > 0 and not pads.any() else None


def _same_after_broadcast(x: ir.Value, const: np.ndarray) -> bool:
    shape = static_shape(x)
    if shape is None or x.dtype is None or const.ndim > len(shape):
        return False
    if ir.DataType.from_numpy(const.dtype) != x.dtype:
        return False
    tail = shape[len(shape) - const.ndim:]
    return all(c in (1, s) for c, s in zip(const.shape, tail))


def _neutral(value: float, commutative: bool) -> Callable:
    def rule(node):
        """x op c where c is the neutral element and broadcasting keeps x's shape."""
        a, b = node.inputs[0], node.inputs[1]
        pairs = [(a, b), (b, a)] if commutative else [(a, b)]
        for x, c in pairs:
            arr = const_array(c)
            if arr is not None and arr.size > 0 and np.all(arr == value) and _same_after_broadcast(x, arr):
                return x
        return None

    return rule


def _slice(node):
    """Slice that keeps every element: starts 0, ends past the end, steps 1, on a static shape."""
    x, shape = node.inputs[0], static_shape(node.inputs[0])
    starts, ends = _input_or_attr(node, 1, "starts"), _input_or_attr(node, 2, "ends")
    if shape is None or starts is None or ends is None:
        return None
    axes = _input_or_attr(node, 3, "axes")
    axes = np.arange(len(starts)) if axes is None else axes
    steps = _input_or_attr(node, 4, "steps")
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        dim = shape[int(a) % len(shape)]
        if st != 1 or not (s == 0 or s <= -dim) or e < dim:
            return None
    return x


def _expand(node):
    """Expand whose target shape broadcasts to the input's own static shape."""
    x, shape = node.inputs[0], static_shape(node.inputs[0])
    target = const_array(node.inputs[1])
    if shape is None or target is None or len(target) > len(shape):
        return None
    tail = shape[len(shape) - len(target):]
    return x if all(t in (1, s) for t, s in zip(target, tail)) else None


def _concat(node):
    """Concat of a single input."""
    return node.inputs[0] if len(node.inputs) == 1 else None


def _squeeze(node):
    """Squeeze/Unsqueeze/Flatten whose output shape equals the input's (no axis has an effect)."""
    x, shape = node.inputs[0], static_shape(node.inputs[0])
    if shape is None:
        return None
    if node.op_type == "Flatten":
        axis = node.attributes.get_int("axis", 1) % (len(shape) + 1) if shape else 0
        return x if len(shape) == 2 and axis == 1 else None
    axes = _input_or_attr(node, 1, "axes")
    if node.op_type == "Unsqueeze":
        return x if axes is not None and axes.size == 0 else None
    if axes is None or axes.size == 0:
        return x if 1 not in shape else None
    return None


RULES: dict[str, Callable[[ir.Node], ir.Value | None]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Mul": _neutral(1, True),
    "Div": _neutral(1, False),
    "Add": _neutral(0, True),
    "Sub": _neutral(0, False),
    "Slice": _slice,
    "Expand": _expand,
    "Concat": _concat,
    "Squeeze": _squeeze,
    "Unsqueeze": _squeeze,
    "Flatten": _squeeze,
}


class RemoveNoopsPass(ir.passes.InPlacePass):
    """Remove Identity, inference Dropout, same-type Cast, same-shape Reshape, identity Transpose,
    zero Pad, x*1, x/1, x+0, x-0, full Slice, same-shape Expand, one-input Concat, no-op Squeeze."""

    def __init__(self, *, ops: tuple[str, ...] | None = None):
        super().__init__()
        self.ops = frozenset(RULES if ops is None else ops)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = 0
        for graph in list(graphs_of(model)):
            for node in list(graph):
                if node.domain not in ("", "ai.onnx") or node.op_type not in self.ops:
                    continue
                if not node.inputs or node.inputs[0] is None:
                    continue
                source = RULES[node.op_type](node)
                out = node.outputs[0]
                if source is None or not can_bypass(out, source):
                    continue
                if source.dtype is not None and out.dtype is not None and source.dtype != out.dtype:
                    continue
                replace_value(out, source)
                graph.remove(node, safe=True)
                removed += 1
        return ir.passes.PassResult(model, modified=removed > 0)

"""A small numpy evaluator for the tensors that shape computations produce (used by graphopt.core.shapes).

Values of at most ``MAX_ELEMENTS`` elements are computed when all their inputs are known: Shape/Size
of values with static dims, Constant, Gather/Concat/Slice/Squeeze/Unsqueeze/Cast, integer and float
arithmetic, comparisons and Where, Range, ConstantOfShape, Reshape, Expand, Tile, Transpose and the
Reduce ops shape code uses. Anything else is left unknown (never guessed). Nothing here touches a graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MAX_ELEMENTS = 1024


def known_constant(v: ir.Value) -> np.ndarray | None:
    t = v.const_value
    if t is None or t.size > MAX_ELEMENTS or t.dtype == ir.DataType.STRING:
        return None
    try:
        return np.asarray(t.numpy())
    except Exception:
        return None


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _axes(node: ir.Node, inputs: list, index: int):
    """Axes from the attribute (older opsets) or from input ``index`` (newer ones)."""
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in np.asarray(inputs[index]).reshape(-1)]
    a = _attr(node, "axes")
    return None if a is None else [int(x) for x in a]


def _int_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        q = np.abs(a) // np.abs(b)
        return (q * np.sign(a) * np.sign(b)).astype(a.dtype)
    return (a / b).astype(a.dtype)


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _int_div,
    "Pow": np.power, "Min": np.minimum, "Max": np.maximum,
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
}
_UNARY = {"Neg": np.negative, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Sqrt": np.sqrt,
          "Not": np.logical_not, "Identity": lambda x: x, "Sign": np.sign}
_ARITH_KEEPS_DTYPE = {"Add", "Sub", "Mul", "Pow", "Min", "Max"}


def _size_ok(shape) -> bool:
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) <= MAX_ELEMENTS


def _slice(node, x, inputs):
    if len(inputs) > 1:
        starts, ends = inputs[1].reshape(-1), inputs[2].reshape(-1)
        axes = inputs[3].reshape(-1) if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
        steps = inputs[4].reshape(-1) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    else:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes = _attr(node, "axes") or range(len(starts))
        steps = [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a) % x.ndim] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _reshape(node, x, shape):
    target = [int(d) for d in shape]
    if not _attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _reduce(node, inputs, fn):
    axes = _axes(node, inputs, 1)
    if axes is None and _attr(node, "noop_with_empty_axes", 0):
        return inputs[0]
    keep = bool(_attr(node, "keepdims", 1))
    return fn(inputs[0], axis=None if axes is None else tuple(axes), keepdims=keep).astype(inputs[0].dtype)


def _shape_of(node, shape):
    if shape is None:
        return None
    dims = list(shape)[slice(_attr(node, "start", 0), _attr(node, "end", None))]
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return np.array(dims, dtype=np.int64)


def _constant(node):
    for name in ("value", "value_int", "value_ints", "value_float", "value_floats"):
        a = node.attributes.get(name)
        if a is None:
            continue
        if name == "value":
            return None if a.value.size > MAX_ELEMENTS else np.asarray(a.value.numpy())
        return np.array(a.value, dtype=np.int64 if "int" in name else np.float32)
    return None


def _constant_of_shape(node, shape):
    if not _size_ok(shape):
        return None
    value = _attr(node, "value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value.numpy()).reshape(-1)
    return np.full([int(d) for d in shape], fill[0], dtype=fill.dtype)


def evaluate(node: ir.Node, inputs: list, shapes: list) -> list | None:
    """Output arrays of ``node`` when they can be computed from ``inputs`` (known arrays or None)."""
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if op == "Shape":
        return [_shape_of(node, shapes[0])]
    if op == "Size":
        s = shapes[0]
        static = s is not None and all(isinstance(d, int) and d >= 0 for d in s)
        return [np.array(np.prod(list(s)), dtype=np.int64)] if static else None
    if op == "Constant":
        return [_constant(node)]
    if op is None or any(v is not None and a is None for v, a in zip(node.inputs, inputs)):
        return None
    x = inputs[0] if inputs else None
    if op in _BINARY:
        r = _BINARY[op](x, inputs[1])
        return [r.astype(x.dtype) if op in _ARITH_KEEPS_DTYPE else r]
    if op in _UNARY:
        return [np.asarray(_UNARY[op](x))]
    if op == "Mod":
        return [(np.fmod if _attr(node, "fmod", 0) else np.mod)(x, inputs[1])]
    if op == "Cast":
        return [x.astype(ir.DataType(_attr(node, "to")).numpy())]
    if op == "Gather":
        return [np.take(x, inputs[1].astype(np.int64), axis=_attr(node, "axis", 0))]
    if op == "Concat":
        return [np.concatenate([np.asarray(a) for a in inputs if a is not None], axis=_attr(node, "axis"))]
    if op == "Unsqueeze":
        axes = _axes(node, inputs, 1)
        for a in sorted(a % (x.ndim + len(axes)) for a in axes):
            x = np.expand_dims(x, a)
        return [x]
    if op == "Squeeze":
        axes = _axes(node, inputs, 1)
        return [np.squeeze(x, axis=None if axes is None else tuple(axes))]
    if op == "Slice":
        return [_slice(node, x, inputs)]
    if op == "Where":
        return [np.where(x, inputs[1], inputs[2])]
    if op == "Range":
        n = max(int(np.ceil((inputs[1] - x) / inputs[2])), 0)
        return [np.arange(x, inputs[1], inputs[2]).astype(x.dtype)] if n <= MAX_ELEMENTS else None
    if op == "ConstantOfShape":
        return [_constant_of_shape(node, x)]
    if op == "Reshape":
        return [_reshape(node, x, inputs[1])]
    if op == "Expand":
        shape = np.broadcast_shapes(x.shape, tuple(int(d) for d in inputs[1]))
        return [np.broadcast_to(x, shape).copy()] if _size_ok(shape) else None
    if op == "Tile":
        shape = [a * int(r) for a, r in zip(x.shape, inputs[1])]
        return [np.tile(x, [int(r) for r in inputs[1]])] if _size_ok(shape) else None
    if op == "Transpose":
        return [np.transpose(x, _attr(node, "perm"))]
    if op in ("ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax"):
        fn = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMin": np.min, "ReduceMax": np.max}[op]
        return [_reduce(node, inputs, fn)]
    return None

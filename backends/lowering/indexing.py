"""Lowering rules: indexing ops (Gather*, Scatter*, OneHot, TopK, Compress, NonZero)."""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx, topi

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule
from graphopt.backends.lowering.tensor import _dims, _static_dim

R = relax.op


def _norm_indices(ctx, idx, dim):
    """Negative indices wrap (index + dim); left alone for a symbolic dim or unsigned indices."""
    dtype = H.dtype_of(idx)
    if not isinstance(dim, int) or H.is_unsigned(dtype):
        return idx
    c = H.const_value(idx)
    if c is not None:
        return H.const(np.where(c < 0, c + dim, c).astype(c.dtype), dtype)
    return R.where(R.less(idx, H.scalar(0, dtype)), R.add(idx, H.scalar(dim, dtype)), idx)


def _static_or_sym(dim):
    return _static_dim(dim) if _static_dim(dim) is not None else dim


def lower_gather(ctx, ins):
    x, idx = ins
    dims = _dims(ctx, x)
    axis = H.norm_axis(ctx.attr("axis", 0), len(dims))
    return R.take(x, _norm_indices(ctx, idx, _static_or_sym(dims[axis])), axis=axis)


def lower_gather_elements(ctx, ins):
    x, idx = ins
    dims = _dims(ctx, x)
    axis = H.norm_axis(ctx.attr("axis", 0), len(dims))
    return R.gather_elements(x, _norm_indices(ctx, idx, _static_or_sym(dims[axis])), axis=axis)


def _norm_nd_indices(ctx, x, idx, batch_dims: int):
    """Negative entries of GatherND/ScatterND index tuples wrap, per indexed dim (static dims only)."""
    shape, ishape = H.shape_of(x), H.shape_of(idx)
    if ishape is None or ishape[-1] is None:
        return idx
    dims = shape[batch_dims: batch_dims + ishape[-1]]
    if any(d is None for d in dims) or H.is_unsigned(H.dtype_of(idx)):
        return idx
    dtype = H.dtype_of(idx)
    wrap = H.const(np.asarray(dims, dtype=dtype))
    return R.where(R.less(idx, H.scalar(0, dtype)), R.add(idx, wrap), idx)


def lower_gather_nd(ctx, ins):
    batch_dims = ctx.attr("batch_dims", 0)
    return R.gather_nd(ins[0], _norm_nd_indices(ctx, ins[0], ins[1], batch_dims), batch_dims=batch_dims)


_REDUCTIONS = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


def lower_scatter_elements(ctx, ins):
    x, idx, upd = ins
    dims = _dims(ctx, x)
    axis = H.norm_axis(ctx.attr("axis", 0), len(dims))
    red = ctx.attr("reduction", "none")
    return R.scatter_elements(x, _norm_indices(ctx, idx, _static_or_sym(dims[axis])), upd, axis, _REDUCTIONS[red])


def lower_scatter_nd(ctx, ins):
    idx = _norm_nd_indices(ctx, ins[0], ins[1], 0)
    return R.scatter_nd(ins[0], idx, ins[2], _REDUCTIONS[ctx.attr("reduction", "none")])


def lower_one_hot(ctx, ins):
    idx = ins[0]
    depth = int(ctx.require_const(1, "depth").reshape(-1)[0])
    values = ctx.require_const(2, "values").reshape(-1)
    dtype = H.dtype_of(ins[2])
    rank = len(_dims(ctx, idx)) + 1
    axis = H.norm_axis(ctx.attr("axis", -1), rank)
    i64 = R.astype(idx, "int64") if H.dtype_of(idx) != "int64" else idx
    i64 = R.where(R.less(i64, H.scalar(0, "int64")), R.add(i64, H.scalar(depth, "int64")), i64)
    off, on = (relax.prim_value(tirx.const(v.item(), dtype)) for v in values[:2])
    return R.one_hot(i64, on, off, depth, axis)


def lower_topk(ctx, ins):
    x = ins[0]
    rank = len(_dims(ctx, x))
    k = ctx.attr("k") if ctx.opset < 10 else int(ctx.require_const(1, "K").reshape(-1)[0])
    axis = H.norm_axis(ctx.attr("axis", -1), rank)
    largest = bool(ctx.attr("largest", 1))
    if H.dtype_of(x) == "uint64":  # TVM's topk has no uint64: flip the top bit, order as int64
        flipped = ctx.emit(R.bitwise_xor(x, H.scalar(1 << 63, "uint64")))
        keys = ctx.bb.emit_te(topi.reinterpret, flipped, "int64")
        idx = ctx.emit(R.topk(keys, k, axis, "indices", largest, "int64"))
        return [R.gather_elements(x, idx, axis), idx]
    t = ctx.emit(R.topk(x, k, axis, "both", largest, "int64"))
    return [relax.TupleGetItem(t, 0), relax.TupleGetItem(t, 1)]


def lower_compress(ctx, ins):
    x = ins[0]
    cond = ctx.require_const(1, "condition").reshape(-1).astype(bool)
    axis = ctx.attr("axis")
    idx = H.const(np.nonzero(cond)[0].astype(np.int64))
    if axis is None:
        return R.take(R.reshape(x, [-1]), idx, axis=0)
    return R.take(x, idx, axis=H.norm_axis(axis, len(_dims(ctx, x))))


def lower_nonzero(ctx, ins):
    return R.nonzero(ins[0])


def lower_tensor_scatter(ctx, ins):
    """KV-cache update: update[b, ..., i, ...] goes to position write_indices[b] + i (mod length if circular)."""
    past, update = ins[0], ins[1]
    shape, ushape = H.static_shape(past), H.static_shape(update)
    if shape is None or ushape is None:
        ctx.unsupported("needs static cache and update shapes")
    rank = len(shape)
    axis = H.norm_axis(ctx.attr("axis", -2), rank)
    steps = np.arange(ushape[axis], dtype=np.int64).reshape([-1 if a == axis else 1 for a in range(rank)])
    idx = H.const(steps)
    if ctx.has_input(2):
        starts = ins[2] if H.dtype_of(ins[2]) == "int64" else ctx.emit(R.astype(ins[2], "int64"))
        idx = ctx.emit(R.add(R.reshape(starts, [ushape[0]] + [1] * (rank - 1)), idx))
    if ctx.attr("mode", "linear") == "circular":
        idx = ctx.emit(R.floor_mod(idx, H.scalar(shape[axis], "int64")))
    idx = ctx.emit(R.broadcast_to(idx, list(ushape)))
    return R.scatter_elements(past, idx, update, axis, "update")


def lower_non_max_suppression(ctx, ins):
    """relax.vision.all_class_non_max_suppression, cut to the selected count (a run-time length)."""
    boxes, scores = ins[0], ins[1]
    limits = [ctx.require_const(i, name).reshape(-1)[0].item() if ctx.has_input(i) else default
              for i, name, default in ((2, "max_output_boxes_per_class", 0), (3, "iou_threshold", 0.0),
                                       (4, "score_threshold", None))]
    max_out, iou, score = limits
    if ctx.attr("center_point_box", 0):
        parts = ctx.emit(R.split(boxes, 4, axis=2))
        xc, yc, w, h = (relax.TupleGetItem(parts, k) for k in range(4))
        half_w = ctx.emit(R.divide(w, H.scalar(2.0, H.dtype_of(boxes))))
        half_h = ctx.emit(R.divide(h, H.scalar(2.0, H.dtype_of(boxes))))
        boxes = ctx.emit(R.concat([R.subtract(yc, half_h), R.subtract(xc, half_w),
                                   R.add(yc, half_h), R.add(xc, half_w)], axis=2))
    score = float(np.finfo(np.float32).min) if score is None else float(score)
    # ONNX suppresses when IoU > threshold; TVM when IoU >= threshold: move to the next float32 up
    iou = float(np.nextafter(np.float32(iou), np.float32(np.inf)))
    nms = ctx.emit(R.vision.all_class_non_max_suppression(
        boxes, scores, H.const(np.array(int(max_out), np.int64)), H.const(np.array(float(iou), np.float32)),
        H.const(np.array(score, np.float32)), output_format="onnx"))
    selected = ctx.emit(relax.TupleGetItem(nms, 0))
    count = ctx.emit(relax.TupleGetItem(nms, 1))
    end = ctx.emit(R.concat([count, H.const(np.array([3], np.int64))], axis=0))
    return R.dynamic_strided_slice(selected, H.const(np.array([0, 0], np.int64)), end,
                                   H.const(np.array([1, 1], np.int64)))


def lower_unique(ctx, ins):
    """relax.op.unique: values, first indices, inverse indices and counts (run-time lengths)."""
    axis = ctx.attr("axis")
    out = ctx.emit(R.unique(ins[0], bool(ctx.attr("sorted", 1)), True, True, True, axis))
    items = [ctx.emit(relax.TupleGetItem(out, k)) for k in range(4)]
    return [items[0]] + [x if H.dtype_of(x) == "int64" else R.astype(x, "int64") for x in items[1:]]


RULES = (
    OpRule("Unique", lower_unique, since=11, kind="decomposed"),
    OpRule("NonMaxSuppression", lower_non_max_suppression, since=10, kind="decomposed"),
    OpRule("TensorScatter", lower_tensor_scatter, since=24, kind="decomposed"),
    OpRule("Gather", lower_gather),
    OpRule("GatherElements", lower_gather_elements, since=11),
    OpRule("GatherND", lower_gather_nd, since=11),
    OpRule("Scatter", lower_scatter_elements, since=9, until=10),
    OpRule("ScatterElements", lower_scatter_elements, since=11),
    OpRule("ScatterND", lower_scatter_nd, since=11),
    OpRule("OneHot", lower_one_hot, since=9),
    OpRule("TopK", lower_topk),
    OpRule("Compress", lower_compress, since=9),
    OpRule("NonZero", lower_nonzero, since=9),
)

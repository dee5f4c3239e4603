"""Lowering rules: tensor ops (shape manipulation, indexing, scatter/gather, padding, matmul/gemm)."""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule

R = relax.op


def _dims(ctx, x):
    dims = H.dims_of(x)
    if dims is None:
        ctx.unsupported("the input's rank is unknown")
    return dims


def _static_dim(d):
    return int(d) if isinstance(d, tirx.IntImm) else None


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


def _ints_input_or_attr(ctx, i: int, attr: str, since: int, what: str):
    """A list of ints from an attribute (opset < since) or a constant input (opset >= since); None if absent."""
    if ctx.opset < since:
        v = ctx.attr(attr)
        return None if v is None else [int(a) for a in v]
    if not ctx.has_input(i):
        return None
    return [int(a) for a in np.asarray(ctx.require_const(i, what)).reshape(-1)]


# ------------------------------------------------------------------ shapes


def lower_reshape(ctx, ins):
    x = ins[0]
    shape = ctx.attr("shape") if ctx.opset < 5 else [int(v) for v in ctx.require_const(1, "shape").reshape(-1)]
    dims = _dims(ctx, x)
    allowzero = ctx.attr("allowzero", 0)
    out = [dims[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
    if -1 in shape:
        k = shape.index(-1)
        known = _prod([d for i, d in enumerate(out) if i != k])
        out[k] = tirx.floordiv(_prod(dims), known) if not isinstance(known, int) or known else 0
    if any(isinstance(d, int) and d == 0 for d in out):  # Relax reads a literal 0 as "copy the dim"
        return H.full(out, 0, H.dtype_of(x))  # an empty tensor
    return R.reshape(x, out)


def lower_flatten(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    axis = ctx.attr("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    return R.reshape(x, [_prod(dims[:axis]), _prod(dims[axis:])])


def lower_squeeze(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    axes = _ints_input_or_attr(ctx, 1, "axes", 13, "axes")
    if axes is None:
        axes = [i for i, d in enumerate(dims) if _static_dim(d) == 1]
    return R.squeeze(x, H.norm_axes(axes, len(dims)))


def lower_unsqueeze(ctx, ins):
    x = ins[0]
    axes = _ints_input_or_attr(ctx, 1, "axes", 13, "axes")
    if axes is None:
        ctx.unsupported("axes are missing")
    rank = len(_dims(ctx, x)) + len(axes)
    dims = list(_dims(ctx, x))
    for a in sorted(H.norm_axes(axes, rank)):
        dims.insert(a, 1)
    return R.reshape(x, dims)


def lower_transpose(ctx, ins):
    perm = ctx.attr("perm")
    rank = len(_dims(ctx, ins[0]))
    return R.permute_dims(ins[0], perm if perm is not None else list(range(rank))[::-1])


def lower_concat(ctx, ins):
    parts = [x for x in ins if x is not None and (H.static_shape(x) is None or H.numel(H.static_shape(x)) > 0 or
                                                   len(H.static_shape(x)) != 1)]
    axis = H.norm_axis(ctx.attr("axis"), len(_dims(ctx, ins[0])))
    return R.concat(parts or [ins[0]], axis=axis)


def lower_split(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    axis = H.norm_axis(ctx.attr("axis", 0), len(dims))
    if ctx.opset < 13 and ctx.attr("split") is not None:
        split = [int(s) for s in ctx.attr("split")]
    elif ctx.has_input(1):
        split = [int(s) for s in ctx.require_const(1, "split").reshape(-1)]
    else:
        split = None
    n = ctx.num_outputs
    if split is None:
        size = _static_dim(dims[axis])
        if size is None:
            return list(_tuple_items(ctx, R.split(x, n, axis), n))
        chunk = -(-size // n) if ctx.opset >= 18 else size // n
        split = [min(chunk, size - k * chunk) for k in range(n)]
    bounds = [0, *np.cumsum(split).tolist()]
    if 0 in split:  # Relax split wants strictly increasing indices: slice each part (empty parts: constants)
        return [R.strided_slice(x, [axis], [int(b)], [int(e)]) if e > b else
                H.full([0 if a == axis else d for a, d in enumerate(dims)], 0, H.dtype_of(x))
                for b, e in zip(bounds, bounds[1:])]
    return list(_tuple_items(ctx, R.split(x, [int(i) for i in bounds[1:-1]], axis), len(split)))


def _tuple_items(ctx, tup, n):
    t = ctx.emit(tup)
    return [relax.TupleGetItem(t, k) for k in range(n)]


def _norm_slice(start, end, step, dim):
    """Clamp ONNX slice bounds on a static dim (numpy semantics)."""
    return slice(start, end, step).indices(dim)


def lower_slice(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    rank = len(dims)
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes = ctx.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in ctx.require_const(1, "starts").reshape(-1)]
        ends = [int(v) for v in ctx.require_const(2, "ends").reshape(-1)]
        axes = [int(v) for v in ctx.require_const(3, "axes").reshape(-1)] if ctx.has_input(3) else None
        steps = [int(v) for v in ctx.require_const(4, "steps").reshape(-1)] if ctx.has_input(4) else None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
    axes = H.norm_axes(axes, rank)
    out = x
    fwd_axes, fwd_b, fwd_e, fwd_s = [], [], [], []
    for a, b, e, s in zip(axes, starts, ends, steps):
        d = _static_dim(dims[a])
        if d is None:
            fwd_axes.append(a), fwd_b.append(b), fwd_e.append(e), fwd_s.append(s)
            continue
        b, e, s = _norm_slice(b, e, s, d)
        if s < 0:
            idx = np.arange(b, e, s, dtype=np.int64)
            out = ctx.emit(R.take(out, H.const(idx), axis=a))
        elif not (b == 0 and e >= d and s == 1):
            fwd_axes.append(a), fwd_b.append(b), fwd_e.append(max(e, b)), fwd_s.append(s)
    if fwd_axes:
        out = R.strided_slice(out, fwd_axes, fwd_b, fwd_e, fwd_s)
    return out


def lower_shape(ctx, ins):
    x = ins[0]
    rank = len(_dims(ctx, x))
    start, end = ctx.attr("start", 0), ctx.attr("end", rank)
    s, e = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    t = ctx.emit(R.shape_to_tensor(R.shape_of(x)))
    return t if (s, e) == (0, rank) else R.strided_slice(t, [0], [s], [max(e, s)])


def lower_size(ctx, ins):
    dims = _dims(ctx, ins[0])
    t = ctx.emit(R.shape_to_tensor(R.shape_of(ins[0])))
    return R.prod(t) if dims else H.const(np.array(1, np.int64))


def lower_expand(ctx, ins):
    x = ins[0]
    shape = ctx.require_const(1, "shape")
    dims = _dims(ctx, x)
    target = [int(s) for s in shape.reshape(-1)]
    rank = max(len(dims), len(target))
    dims = [1] * (rank - len(dims)) + list(dims)
    target = [1] * (rank - len(target)) + target
    out = [d if t == 1 else t for d, t in zip(dims, target)]
    return R.broadcast_to(x, out)


def lower_tile(ctx, ins):
    return R.tile(ins[0], [int(r) for r in ctx.require_const(1, "repeats").reshape(-1)])


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def lower_pad(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    rank = len(dims)
    mode = ctx.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if ctx.opset < 11:
        pads, value = ctx.attr("pads", ctx.attr("paddings")), ctx.attr("value", 0.0)
        axes = list(range(rank))
    else:
        pads = [int(p) for p in ctx.require_const(1, "pads").reshape(-1)]
        value = ctx.require_const(2, "constant_value").reshape(-1)[0].item() if ctx.has_input(2) else 0
        axes = H.norm_axes([int(a) for a in ctx.require_const(3, "axes").reshape(-1)], rank) \
            if ctx.has_input(3) else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        begin[a], end[a] = int(pads[k]), int(pads[k + n])
    if mode not in _PAD_MODES:
        ctx.unsupported(f"pad mode {mode!r}")
    out = x
    if any(p < 0 for p in begin + end):  # negative pads crop
        sl_axes = [a for a in range(rank) if begin[a] < 0 or end[a] < 0]
        out = ctx.emit(R.strided_slice(
            out, sl_axes, [max(0, -begin[a]) for a in sl_axes],
            [dims[a] - max(0, -end[a]) for a in sl_axes]))
        begin, end = [max(0, p) for p in begin], [max(0, p) for p in end]
    if not any(begin + end):
        return out
    width = [p for a in range(rank) for p in (begin[a], end[a])]
    if mode == "constant":
        return R.nn.pad(out, width, "constant", float(value))
    return R.nn.pad(out, width, _PAD_MODES[mode])


def lower_depth_to_space(ctx, ins):
    x = ins[0]
    n, c, h, w = _dims(ctx, x)
    b = ctx.attr("blocksize")
    if ctx.attr("mode", "DCR") == "DCR":
        t = ctx.emit(R.reshape(x, [n, b, b, tirx.floordiv(c, b * b), h, w]))
        t = ctx.emit(R.permute_dims(t, [0, 3, 4, 1, 5, 2]))
    else:
        t = ctx.emit(R.reshape(x, [n, tirx.floordiv(c, b * b), b, b, h, w]))
        t = ctx.emit(R.permute_dims(t, [0, 1, 4, 2, 5, 3]))
    return R.reshape(t, [n, tirx.floordiv(c, b * b), h * b, w * b])


def lower_space_to_depth(ctx, ins):
    x = ins[0]
    n, c, h, w = _dims(ctx, x)
    b = ctx.attr("blocksize")
    t = ctx.emit(R.reshape(x, [n, c, tirx.floordiv(h, b), b, tirx.floordiv(w, b), b]))
    perm = [0, 3, 5, 1, 2, 4] if ctx.attr("mode", "DCR") == "DCR" else [0, 1, 3, 5, 2, 4]
    t = ctx.emit(R.permute_dims(t, perm))
    return R.reshape(t, [n, c * b * b, tirx.floordiv(h, b), tirx.floordiv(w, b)])


def lower_trilu(ctx, ins):
    k = 0
    if ctx.has_input(1):
        k = int(ctx.require_const(1, "k").reshape(-1)[0])
    return R.triu(ins[0], k) if ctx.attr("upper", 1) else R.tril(ins[0], k)


def _cumulative(fn):
    def lower(ctx, ins):
        x = ins[0]
        rank = len(_dims(ctx, x))
        axis = H.norm_axis(int(ctx.require_const(1, "axis").reshape(-1)[0]), rank)
        rev = ctx.attr("reverse", 0)
        if rev:
            x = ctx.emit(R.flip(x, axis))
        out = fn(x, axis=axis, exclusive=bool(ctx.attr("exclusive", 0)))
        return R.flip(ctx.emit(out), axis) if rev else out

    return lower


def lower_center_crop_pad(ctx, ins):
    x = ins[0]
    dims = _dims(ctx, x)
    rank = len(dims)
    target = [int(v) for v in ctx.require_const(1, "shape").reshape(-1)]
    axes = H.norm_axes(ctx.attr("axes") or list(range(rank)), rank)
    out = x
    for a, t in zip(axes, target):
        d = _static_dim(dims[a])
        if d is None:
            ctx.unsupported(f"CenterCropPad needs a static size on axis {a}")
        if t < d:
            begin = (d - t) // 2
            out = ctx.emit(R.strided_slice(out, [a], [begin], [begin + t]))
        elif t > d:
            width = [0] * (2 * rank)
            width[2 * a], width[2 * a + 1] = (t - d) // 2, t - d - (t - d) // 2
            out = ctx.emit(R.nn.pad(out, width, "constant", 0.0))
    return out


def lower_reverse_sequence(ctx, ins):
    return R.reverse_sequence(ins[0], ins[1], ctx.attr("time_axis", 0), ctx.attr("batch_axis", 1))


def lower_eye_like(ctx, ins):
    dtype = H.relax_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else H.dtype_of(ins[0])
    shape = H.static_shape(ins[0])
    if shape is not None:  # a constant of the input's shape
        return H.const(np.eye(shape[0], shape[1], ctx.attr("k", 0)).astype(H.numpy_dtype(dtype)), dtype)
    return R.astype(R.eye_like(ins[0], ctx.attr("k", 0)), dtype)


def lower_einsum(ctx, ins):
    return R.einsum(relax.Tuple(list(ins)), ctx.attr("equation").replace(" ", ""))


def lower_matmul(ctx, ins):
    return R.matmul(ins[0], ins[1])


def lower_gemm(ctx, ins):
    a, b = ins[0], ins[1]
    if ctx.attr("transA", 0):
        a = ctx.emit(R.permute_dims(a, [1, 0]))
    if ctx.attr("transB", 0):
        b = ctx.emit(R.permute_dims(b, [1, 0]))
    out = R.matmul(a, b)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    dtype = H.dtype_of(ins[0])
    if alpha != 1.0:
        out = R.multiply(ctx.emit(out), H.scalar(alpha, dtype))
    if len(ins) > 2 and ins[2] is not None and beta != 0.0:
        c = ins[2] if beta == 1.0 else R.multiply(ins[2], H.scalar(beta, dtype))
        out = R.add(ctx.emit(out), c)
    return out


RULES = (
    OpRule("Reshape", lower_reshape),
    OpRule("Flatten", lower_flatten),
    OpRule("Squeeze", lower_squeeze),
    OpRule("Unsqueeze", lower_unsqueeze),
    OpRule("Transpose", lower_transpose),
    OpRule("Concat", lower_concat),
    OpRule("Split", lower_split),
    OpRule("Slice", lower_slice),
    OpRule("Shape", lower_shape),
    OpRule("Size", lower_size),
    OpRule("Expand", lower_expand, since=8),
    OpRule("Tile", lower_tile, since=6),
    OpRule("Pad", lower_pad),
    OpRule("DepthToSpace", lower_depth_to_space, kind="decomposed"),
    OpRule("SpaceToDepth", lower_space_to_depth, kind="decomposed"),
    OpRule("Trilu", lower_trilu, since=14),
    OpRule("CumSum", _cumulative(R.cumsum), since=11),
    OpRule("CumProd", _cumulative(R.cumprod), since=26),
    OpRule("CenterCropPad", lower_center_crop_pad, since=18, kind="decomposed"),
    OpRule("ReverseSequence", lower_reverse_sequence, since=10),
    OpRule("EyeLike", lower_eye_like, since=9),
    OpRule("Einsum", lower_einsum, since=12),
    OpRule("MatMul", lower_matmul),
    OpRule("Gemm", lower_gemm),
)

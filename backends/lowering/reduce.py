"""Lowering rules: reductions (Reduce*), ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax."""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering import nan_minmax as NM
from graphopt.backends.lowering.rules import OpRule

R = relax.op

# op -> (opset where axes became an input, the value of a reduction over an empty set)
_REDUCE = {
    "ReduceSum": (13, 0.0),
    "ReduceMean": (18, np.nan),
    "ReduceMax": (18, -np.inf),
    "ReduceMin": (18, np.inf),
    "ReduceProd": (18, 1.0),
    "ReduceL1": (18, 0.0),
    "ReduceL2": (18, 0.0),
    "ReduceLogSum": (18, -np.inf),
    "ReduceLogSumExp": (18, -np.inf),
    "ReduceSumSquare": (18, 0.0),
}


def _s(x, value):
    return H.scalar(value, H.dtype_of(x))


def _axes(ctx, op: str, rank: int) -> list[int] | None:
    """The reduced axes, or None for 'no reduction' (noop_with_empty_axes with no axes)."""
    since, _ = _REDUCE[op]
    if ctx.opset < since:
        axes = ctx.attr("axes")
    elif ctx.has_input(1):
        axes = [int(a) for a in ctx.require_const(1, "axes").reshape(-1)]
    else:
        axes = None
    if not axes:
        return None if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(set(H.norm_axes(axes, rank)))


def _empty_value(x, value):
    if H.is_float(H.dtype_of(x)):
        return value
    info = np.iinfo(H.dtype_of(x)) if H.dtype_of(x) != "bool" else None
    if info is None or not np.isfinite(value):
        return (info.min if value < 0 else info.max) if info is not None else 0
    return value


def _te_reduce_inf(x, axes, keepdims: bool, is_max: bool):
    """Max/min as ONNX Runtime's reduce kernels answer them: NaN when the first element of the
    reduced set is NaN, every later NaN skipped (see ``nan_minmax``); identity -inf/+inf (TVM's
    own starts from the lowest finite value: an all -inf row came out as -3.4e38)."""
    inf = tirx.const(np.inf, x.dtype)
    init = tirx.const(-np.inf if is_max else np.inf, x.dtype)
    pick = NM.tir_max if is_max else NM.tir_min  # NaN-propagating: carries the first element's NaN
    reducer = te.comm_reducer(pick, lambda t: init, name="max_inf" if is_max else "min_inf")
    shape = list(x.shape)
    raxes = {a: te.reduce_axis((0, shape[a]), name=f"k{a}") for a in axes}
    out_shape = [1 if a in raxes else d for a, d in enumerate(shape) if keepdims or a not in raxes]

    def body(*idx):
        it = iter(idx)
        full = []
        for a in range(len(shape)):
            if a in raxes:
                if keepdims:
                    next(it)
                full.append(raxes[a])
            else:
                full.append(next(it))
        v = x[tuple(full)]
        first = tirx.all(*[k.var == 0 for k in raxes.values()])
        # a NaN after the first element is replaced by the identity (skipped)
        v = tirx.Select(tirx.Or(first, v <= inf), v, init)
        return reducer(v, axis=list(raxes.values()))

    return te.compute(out_shape, body, name="reduce_max" if is_max else "reduce_min")


def _reduce_body(op: str, x, axes, keepdims: bool, ctx):
    if op in ("ReduceMax", "ReduceMin") and H.is_float(H.dtype_of(x)):
        return ctx.bb.emit_te(_te_reduce_inf, x, list(axes), keepdims, op == "ReduceMax")
    if op == "ReduceSum":
        return R.sum(x, axes, keepdims)
    if op == "ReduceMean":
        return R.mean(x, axes, keepdims)
    if op == "ReduceMax":
        return R.max(x, axes, keepdims)
    if op == "ReduceMin":
        return R.min(x, axes, keepdims)
    if op == "ReduceProd":
        return R.prod(x, axes, keepdims)
    if op == "ReduceL1":
        return R.sum(R.abs(x) if not H.is_unsigned(H.dtype_of(x)) else x, axes, keepdims)
    if op == "ReduceSumSquare":
        return R.sum(R.multiply(x, x), axes, keepdims)
    if op == "ReduceL2":
        if H.is_float(H.dtype_of(x)):
            return R.sqrt(R.sum(R.multiply(x, x), axes, keepdims))
        xf = ctx.emit(R.astype(x, "float64"))
        return R.astype(R.sqrt(R.sum(R.multiply(xf, xf), axes, keepdims)), H.dtype_of(x))
    if op == "ReduceLogSum":
        return R.log(R.sum(x, axes, keepdims))
    if op == "ReduceLogSumExp":
        m = ctx.emit(R.max(x, axes, True))
        m = ctx.emit(R.where(R.isinf(m), R.zeros_like(m), m)) if H.is_float(H.dtype_of(x)) else m
        out = R.add(R.log(R.sum(R.exp(R.subtract(x, m)), axes, True)), m)
        return out if keepdims else R.squeeze(ctx.emit(out), axes)
    raise AssertionError(op)


def _reduce(op: str):
    def lower(ctx, ins):
        x = ins[0]
        shape = H.shape_of(x)
        if shape is None:
            ctx.unsupported("the input's rank is unknown")
        axes = _axes(ctx, op, len(shape))
        if axes is None:
            return x
        keepdims = bool(ctx.attr("keepdims", 1))
        if any(shape[a] == 0 for a in axes) and all(d is not None for d in shape):
            out_shape = [1 if a in axes else d for a, d in enumerate(shape) if keepdims or a not in axes]
            value = _empty_value(x, _REDUCE[op][1])
            return H.full(out_shape, value, H.dtype_of(x))
        if H.dtype_of(x) == "bool" and op in ("ReduceMax", "ReduceMin"):  # any / all
            out = _reduce_body(op, ctx.emit(R.astype(x, "int8")), axes, keepdims, ctx)
            return R.astype(out, "bool")
        return _reduce_body(op, x, axes, keepdims, ctx)

    return lower


def _arg(fn):
    def lower(ctx, ins):
        x = ins[0]
        shape = H.shape_of(x)
        axis = H.norm_axis(ctx.attr("axis", 0), len(shape))
        keepdims = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            if shape[axis] is None:
                ctx.unsupported("select_last_index needs a static size on the reduced axis")
            idx = ctx.emit(fn(ctx.emit(R.flip(x, axis)), axis, keepdims))
            idx = ctx.emit(R.astype(idx, "int64"))
            return R.subtract(H.scalar(shape[axis] - 1, "int64"), idx)
        idx = ctx.emit(fn(x, axis, keepdims))
        return idx if H.dtype_of(idx) == "int64" else R.astype(idx, "int64")

    return lower


def _coerced_2d(ctx, x, fn):
    """opset < 13: flatten to 2-D at ``axis`` (default 1), apply fn on axis 1, restore the shape."""
    dims = H.dims_of(x)
    axis = ctx.attr("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    lead, tail = 1, 1
    for d in dims[:axis]:
        lead = lead * d
    for d in dims[axis:]:
        tail = tail * d
    flat = ctx.emit(R.reshape(x, [lead, tail]))
    return R.reshape(ctx.emit(fn(flat, 1)), dims)


def _softmax_family(fn):
    def lower(ctx, ins):
        x = ins[0]
        if ctx.opset < 13:
            return _coerced_2d(ctx, x, fn(ctx))
        return fn(ctx)(x, H.norm_axis(ctx.attr("axis", -1), len(H.dims_of(x))))

    return lower


def _hardmax(ctx):
    def apply(x, axis):
        dims = H.dims_of(x)
        size = dims[axis]
        if not isinstance(size, tirx.IntImm):
            ctx.unsupported("Hardmax needs a static size on its axis")
        idx = ctx.emit(R.argmax(x, axis, True))
        iota_shape = [1] * len(dims)
        iota_shape[axis] = int(size)
        iota = H.const(np.arange(int(size), dtype=H.dtype_of(idx)).reshape(iota_shape))
        return R.astype(R.equal(iota, idx), H.dtype_of(x))

    return apply


def lower_det(ctx, ins):
    """Leibniz formula over the last two (static, at most 4x4) dims."""
    import itertools

    x = ins[0]
    shape = H.shape_of(x)
    m = shape[-1] if shape else None
    if m is None or shape[-2] != m or m > 4:
        ctx.unsupported(f"Det of {shape}: square static matrices up to 4x4 only")
    rank = len(shape)
    flat = ctx.emit(R.reshape(x, [*H.dims_of(x)[:-2], m * m]))
    entries = [ctx.emit(R.take(flat, H.const(np.array(k, np.int64)), axis=rank - 2)) for k in range(m * m)]
    total = None
    for perm in itertools.permutations(range(m)):
        term = entries[perm[0]]
        for i in range(1, m):
            term = R.multiply(term, entries[i * m + perm[i]])
        inversions = sum(1 for a in range(m) for b in range(a + 1, m) if perm[a] > perm[b])
        term = ctx.emit(term)
        total = term if total is None else ctx.emit(
            R.subtract(total, term) if inversions % 2 else R.add(total, term))
    return total


RULES = (
    OpRule("Det", lower_det, since=11, kind="decomposed"),
    *(OpRule(op, _reduce(op), kind="native" if op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                                                      "ReduceProd") else "decomposed") for op in _REDUCE),
    OpRule("ArgMax", _arg(R.argmax)),
    OpRule("ArgMin", _arg(R.argmin)),
    OpRule("Softmax", _softmax_family(lambda ctx: R.nn.softmax)),
    OpRule("LogSoftmax", _softmax_family(lambda ctx: R.nn.log_softmax)),
    OpRule("Hardmax", _softmax_family(_hardmax), kind="decomposed"),
)

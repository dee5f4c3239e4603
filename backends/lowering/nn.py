"""Lowering rules: nn (convolutions, pooling, normalizations); ConvTranspose, Resize, attention and sampling
ops live in conv_transpose.py, resize.py, attention.py and image.py, whose rules are part of this family."""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import attention, conv_transpose, helpers, image, resize
from graphopt.backends.lowering.helpers import const, scalar
from graphopt.backends.lowering.rules import OpRule

op = relax.op

_CONV = {1: op.nn.conv1d, 2: op.nn.conv2d, 3: op.nn.conv3d}
_LAYOUT = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}
_MAX_POOL = {1: op.nn.max_pool1d, 2: op.nn.max_pool2d, 3: op.nn.max_pool3d}
_AVG_POOL = {1: op.nn.avg_pool1d, 2: op.nn.avg_pool2d, 3: op.nn.avg_pool3d}


# ---------------------------------------------------------------- shared small helpers


def _static_shape(ctx, i: int) -> tuple[int, ...]:
    shape = ctx.shape(i)
    ctx.check(shape is not None and all(d is not None for d in shape), lambda: f"input {i} needs a static shape, got {shape}")
    return tuple(shape)


def _window(ctx, kernel) -> tuple[list[int], list[int], list[int]]:
    """strides, dilations, resolved pads (begins then ends) of a sliding-window node."""
    n = len(kernel)
    strides = list(ctx.attr("strides") or [1] * n)
    dilations = list(ctx.attr("dilations") or [1] * n)
    in_sizes = _static_shape(ctx, 0)[2:]
    try:
        pads = helpers.window_pads(ctx.attr("auto_pad", "NOTSET"), in_sizes, kernel, strides, dilations, ctx.attr("pads"))
    except ValueError as e:
        ctx.unsupported(str(e))
    return strides, dilations, pads


def _channel_vec(x: relax.Expr, rank: int) -> relax.Expr:
    """A per-channel vector (C,) reshaped to broadcast against an (N, C, ...) tensor."""
    return op.expand_dims(x, [0] + list(range(2, rank)))


def _add_bias(y: relax.Expr, bias, rank: int) -> relax.Expr:
    return y if bias is None else op.add(y, _channel_vec(bias, rank))


# ---------------------------------------------------------------- convolutions


def conv(ctx, x, w, out_dtype: str | None = None) -> relax.Expr:
    """The node's convolution of x by w (its attributes: pads, strides, dilations, group); no bias."""
    rank = len(_static_shape(ctx, 0))
    n = rank - 2
    ctx.check(n in _CONV, lambda: f"{n}-D convolution is not supported (1-D, 2-D and 3-D are)")
    kernel = list(ctx.attr("kernel_shape") or helpers.static_shape(w)[2:])
    strides, dilations, pads = _window(ctx, kernel)
    data_layout, kernel_layout = _LAYOUT[n]
    dtype = helpers.dtype_of(x)
    wide = out_dtype is None and dtype in ("float16", "bfloat16")  # accumulate 16-bit floats in float32
    if n == 1:  # as a 2-D conv of height 1: the conv2d schedules serve it (1-D convs ran as scalar loops:
        # Moonshine's audio stem, 2.6 of 3.5 s)
        y = op.nn.conv2d(
            ctx.emit(op.expand_dims(x, [2])), ctx.emit(op.expand_dims(w, [2])), strides=[1, strides[0]],
            padding=[0, pads[0], 0, pads[1]], dilation=[1, dilations[0]], groups=int(ctx.attr("group", 1)),
            out_dtype="float32" if wide else out_dtype,
        )
        y = op.squeeze(ctx.emit(y), [2])
    else:
        y = _CONV[n](
            x, w, strides=strides, padding=pads, dilation=dilations, groups=int(ctx.attr("group", 1)),
            data_layout=data_layout, kernel_layout=kernel_layout, out_dtype="float32" if wide else out_dtype,
        )
    return op.astype(y, dtype) if wide else y


def lower_conv(ctx, inputs):
    bias = inputs[2] if len(inputs) > 2 else None
    return _add_bias(conv(ctx, inputs[0], inputs[1]), bias, len(_static_shape(ctx, 0)))


# ---------------------------------------------------------------- pooling


def _pool_geometry(ctx, kernel, ceil_mode):
    """(strides, dilations, pads, extra_end): extra_end > 0 where ceil_mode needs windows past the end."""
    strides, dilations, pads = _window(ctx, kernel)
    in_sizes = _static_shape(ctx, 0)[2:]
    n = len(kernel)
    extra = [0] * n
    for i in range(n):
        span = in_sizes[i] + pads[i] + pads[n + i] - (kernel[i] - 1) * dilations[i] - 1
        out = span // strides[i] + 1
        if ceil_mode:
            out = -(-span // strides[i]) + 1
            if (out - 1) * strides[i] >= in_sizes[i] + pads[i]:
                out -= 1  # the last window must start inside the input or its left padding
        needed = (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        extra[i] = max(0, needed - (in_sizes[i] + pads[i] + pads[n + i]))
    return strides, dilations, pads, extra


def _pad_spatial(x, begins, ends, value):
    pairs = [0, 0, 0, 0] + [v for pair in zip(begins, ends) for v in pair]
    return op.nn.pad(x, pairs, pad_value=value)


def _lowest(dtype: str):
    return float("-inf") if helpers.is_float(dtype) else int(np.iinfo(np.dtype(dtype)).min)


def _max_pool(ctx, inputs):
    x = inputs[0]
    rank = len(_static_shape(ctx, 0))
    n = rank - 2
    ctx.check(n in _MAX_POOL, lambda: f"{n}-D pooling is not supported")
    if ctx.output_used(1):
        return [_max_pool_values(ctx, x, n), _max_pool_indices(ctx, x, n)]
    return _max_pool_values(ctx, x, n)


def _max_pool_values(ctx, x, n):
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations, pads, extra = _pool_geometry(ctx, kernel, int(ctx.attr("ceil_mode", 0)))
    if any(extra):
        x = ctx.emit(_pad_spatial(x, pads[:n], [p + e for p, e in zip(pads[n:], extra)], _lowest(ctx.dtype(0))))
        pads = [0] * (2 * n)
    return _MAX_POOL[n](x, kernel, strides, pads, dilations, False)


def _max_pool_indices(ctx, x, n):
    """Flat (NCHW row-major, or column-major with storage_order=1) indices of each window's max."""
    shape = _static_shape(ctx, 0)
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations, pads, extra = _pool_geometry(ctx, kernel, int(ctx.attr("ceil_mode", 0)))
    # Index of every input element, gathered per window position with the same geometry as the values.
    spatial = shape[2:]
    if int(ctx.attr("storage_order", 0)) == 1:
        flat = np.arange(helpers.numel(spatial)).reshape(spatial[::-1]).T
    else:
        flat = np.arange(helpers.numel(spatial)).reshape(spatial)
    ends = [p + e for p, e in zip(pads[n:], extra)]
    padded_shape = [s + b + e for s, b, e in zip(spatial, pads[:n], ends)]
    out_sizes = [(p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(padded_shape, kernel, dilations, strides)]
    xp = ctx.emit(_pad_spatial(x, pads[:n], ends, _lowest(ctx.dtype(0))))
    idx_p = np.pad(flat, list(zip(pads[:n], ends)), constant_values=-1)
    best = best_idx = None
    for offs in np.ndindex(*kernel):
        begin = [o * d for o, d in zip(offs, dilations)]
        end = [b + (m - 1) * s + 1 for b, m, s in zip(begin, out_sizes, strides)]
        win = ctx.emit(op.strided_slice(xp, axes=list(range(2, 2 + n)), begin=begin, end=end, strides=strides))
        sl = tuple(slice(b, e, s) for b, e, s in zip(begin, end, strides))
        cand = const(idx_p[sl].astype("int64"))
        if best is None:
            best, best_idx = win, op.broadcast_to(cand, helpers.shape_of(win))
            continue
        take = op.greater(win, best)
        best = ctx.emit(op.maximum(best, win))
        best_idx = ctx.emit(op.where(take, cand, best_idx))
    c_stride = helpers.numel(spatial)
    base = np.arange(shape[0] * shape[1], dtype="int64").reshape([shape[0], shape[1]] + [1] * n) * c_stride
    return op.add(best_idx, const(base))


def _window_counts(in_sizes, kernel, strides, dilations, pads, extra, include_pad):
    """How many elements each window covers: real ones, or real plus explicit padding."""
    n = len(kernel)
    total = np.ones([1], dtype="float64")
    for i in range(n):
        lo, hi = pads[i], pads[n + i]
        valid = np.zeros(in_sizes[i] + lo + hi + extra[i])
        if include_pad:
            valid[: lo + in_sizes[i] + hi] = 1
        else:
            valid[lo : lo + in_sizes[i]] = 1
        span = (kernel[i] - 1) * dilations[i] + 1
        out = (len(valid) - span) // strides[i] + 1
        cnt = np.array([valid[o * strides[i] : o * strides[i] + span : dilations[i]].sum() for o in range(out)])
        total = np.multiply.outer(total, cnt)
    return total.reshape(total.shape[1:])


def _window_sum(ctx, x, kernel, strides, dilations, pads, extra):
    """Sum over each window (zeros outside the input), padding explicitly where ceil_mode needs it."""
    n = len(kernel)
    if any(pads) or any(extra):
        x = ctx.emit(_pad_spatial(x, pads[:n], [p + e for p, e in zip(pads[n:], extra)], 0.0))
    avg = _AVG_POOL[n](x, kernel, strides, [0] * (2 * n), dilations, False, True)
    return op.multiply(avg, scalar(float(np.prod(kernel)), ctx.dtype(0)))


def _avg_pool(ctx, inputs):
    x = inputs[0]
    shape = _static_shape(ctx, 0)
    n = len(shape) - 2
    ctx.check(n in _AVG_POOL, lambda: f"{n}-D pooling is not supported")
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations, pads, extra = _pool_geometry(ctx, kernel, int(ctx.attr("ceil_mode", 0)))
    include = bool(ctx.attr("count_include_pad", 0))
    if not any(extra) and (include or not any(pads)):
        return _AVG_POOL[n](x, kernel, strides, pads, dilations, False, include)
    total = ctx.emit(_window_sum(ctx, x, kernel, strides, dilations, pads, extra))
    counts = _window_counts(shape[2:], kernel, strides, dilations, pads, extra, include)
    return op.divide(total, const(counts, ctx.dtype(0)))


def _lp_pool(ctx, inputs):
    x = inputs[0]
    n = len(_static_shape(ctx, 0)) - 2
    ctx.check(n in _AVG_POOL, lambda: f"{n}-D pooling is not supported")
    dtype = ctx.dtype(0)
    p = float(ctx.attr("p", 2))
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations, pads, extra = _pool_geometry(ctx, kernel, int(ctx.attr("ceil_mode", 0)))
    xp = ctx.emit(op.power(op.abs(x), scalar(p, dtype)))
    total = ctx.emit(_window_sum(ctx, xp, kernel, strides, dilations, pads, extra))
    return op.power(total, scalar(1.0 / p, dtype))


def _spatial_axes(ctx) -> list[int]:
    return list(range(2, len(_static_shape(ctx, 0))))


def _global_avg_pool(ctx, inputs):
    return op.mean(inputs[0], axis=_spatial_axes(ctx), keepdims=True)


def _global_max_pool(ctx, inputs):
    return op.max(inputs[0], axis=_spatial_axes(ctx), keepdims=True)


def _global_lp_pool(ctx, inputs):
    dtype = ctx.dtype(0)
    p = float(ctx.attr("p", 2))
    s = op.sum(op.power(op.abs(inputs[0]), scalar(p, dtype)), axis=_spatial_axes(ctx), keepdims=True)
    return op.power(s, scalar(1.0 / p, dtype))


# ---------------------------------------------------------------- normalizations


# float32 reductions over more elements than this accumulate in float64: a sequential float32 sum over
# Moonshine's GroupNorm (519,584 values) was off by 6e-5 relative, and 8 layers carried it to 3e-4
LONG_REDUCTION = 1 << 14


def _moments(x, axes):
    try:
        shape = helpers.static_shape(x)
    except AttributeError:  # an expression not emitted yet has no tensor type
        shape = None
    wide = (shape is not None and helpers.dtype_of(x) == "float32"
            and helpers.numel([shape[a] for a in axes]) > LONG_REDUCTION)
    xs = op.astype(x, "float64") if wide else x
    mean = op.mean(xs, axis=axes, keepdims=True)
    centered = op.subtract(xs, mean)
    var = op.mean(op.multiply(centered, centered), axis=axes, keepdims=True)
    if wide:
        mean, centered, var = (op.astype(t, "float32") for t in (mean, centered, var))
    return mean, centered, var


def _batch_norm(ctx, inputs):
    x, scale, bias, mean, var = inputs[:5]
    rank = len(_static_shape(ctx, 0))
    dtype = ctx.dtype(0)
    eps = scalar(float(ctx.attr("epsilon", 1e-5)), dtype)
    training = int(ctx.attr("training_mode", 0)) and ctx.opset >= 14
    if training:
        momentum = float(ctx.attr("momentum", 0.9))
        axes = [0] + list(range(2, rank))
        bmean, centered, bvar = _moments(x, axes)
        bmean, bvar = ctx.emit(bmean), ctx.emit(bvar)
        inv = op.rsqrt(op.add(bvar, eps))
        y = op.add(op.multiply(op.multiply(centered, inv), _channel_vec(scale, rank)), _channel_vec(bias, rank))
        m, v = (op.reshape(t, [-1]) for t in (bmean, bvar))  # emitted, so typed
        run_mean = op.add(op.multiply(mean, scalar(momentum, dtype)), op.multiply(m, scalar(1 - momentum, dtype)))
        run_var = op.add(op.multiply(var, scalar(momentum, dtype)), op.multiply(v, scalar(1 - momentum, dtype)))
        return [y, run_mean, run_var][: max(1, ctx.num_outputs)]
    consts = [ctx.const(i) for i in range(1, 5)]
    if all(c is not None for c in consts):  # fold into one multiply-add
        s, b, m, v = (c.astype("float64") for c in consts)
        a = s / np.sqrt(v + float(ctx.attr("epsilon", 1e-5)))
        y = op.add(op.multiply(x, _channel_vec(const(a, dtype), rank)), _channel_vec(const(b - m * a, dtype), rank))
    else:
        inv = op.multiply(scale, op.rsqrt(op.add(var, eps)))
        shift = op.subtract(bias, op.multiply(mean, inv))
        y = op.add(op.multiply(x, _channel_vec(inv, rank)), _channel_vec(shift, rank))
    outs = [y] + [None] * (ctx.num_outputs - 1)
    return outs if ctx.num_outputs > 1 else y


def _instance_norm(ctx, inputs):
    x, scale, bias = inputs[:3]
    rank = len(_static_shape(ctx, 0))
    _, centered, var = _moments(x, list(range(2, rank)))
    y = op.multiply(centered, op.rsqrt(op.add(var, scalar(float(ctx.attr("epsilon", 1e-5)), ctx.dtype(0)))))
    return op.add(op.multiply(y, _channel_vec(scale, rank)), _channel_vec(bias, rank))


def layer_norm(ctx, x, scale, bias, axis: int, epsilon: float, stash_float: bool, need_stats: bool = True):
    """ONNX LayerNormalization-17 (Y, Mean, InvStdDev); shared with the graphopt-domain op.

    Without the statistics outputs, float32/64 use Relax's layer_norm (one fused kernel: 5.5 vs 8.4 ms
    for 8x197x768, untuned llvm)."""
    dtype = helpers.dtype_of(x)
    rank = helpers.rank_of(x)
    axes = list(range(helpers.norm_axis(axis, rank), rank))
    shape = helpers.shape_of(x)  # leading dims may be symbolic (a sequence length): normalized ones static
    if not need_stats and dtype in ("float32", "float64") and shape is not None and all(shape[a] for a in axes):
        norm_shape = [shape[a] for a in axes]

        def full(t):
            if t is None:
                return helpers.const(np.zeros(norm_shape), dtype)
            return t if list(helpers.static_shape(t) or []) == norm_shape else ctx.emit(op.broadcast_to(t, norm_shape))

        return [op.nn.layer_norm(x, full(scale), full(bias), axes=axes, epsilon=epsilon), None, None]
    compute = "float32" if stash_float and dtype in ("float16", "bfloat16") else dtype
    xc = x if compute == dtype else op.astype(x, compute)
    mean, centered, var = _moments(xc, axes)
    mean, var = ctx.emit(mean), ctx.emit(var)
    inv = ctx.emit(op.rsqrt(op.add(var, scalar(epsilon, compute))))
    y = op.multiply(centered, inv)
    if compute != dtype:
        y = op.astype(y, dtype)
    y = op.multiply(y, scale)
    if bias is not None:
        y = op.add(y, bias)
    return [y, mean, inv]


def _layer_norm(ctx, inputs):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    outs = layer_norm(
        ctx, x, scale, bias, int(ctx.attr("axis", -1)), float(ctx.attr("epsilon", 1e-5)),
        int(ctx.attr("stash_type", 1)) == 1, need_stats=ctx.output_used(1) or ctx.output_used(2),
    )
    return outs[: ctx.num_outputs] if ctx.num_outputs > 1 else outs[0]


def _rms_norm(ctx, inputs):
    x, scale = inputs[0], inputs[1]
    dtype = ctx.dtype(0)
    rank = len(_static_shape(ctx, 0))
    axes = list(range(helpers.norm_axis(int(ctx.attr("axis", -1)), rank), rank))
    compute = "float32" if int(ctx.attr("stash_type", 1)) == 1 and dtype in ("float16", "bfloat16") else dtype
    xc = x if compute == dtype else op.astype(x, compute)
    ms = op.mean(op.multiply(xc, xc), axis=axes, keepdims=True)
    y = op.multiply(xc, op.rsqrt(op.add(ms, scalar(float(ctx.attr("epsilon", 1e-5)), compute))))
    return op.multiply(y if compute == dtype else op.astype(y, dtype), scale)


def _group_norm(ctx, inputs):
    x, scale, bias = inputs[:3]
    shape = _static_shape(ctx, 0)
    dtype = ctx.dtype(0)
    groups = int(ctx.attr("num_groups"))
    n, c = shape[0], shape[1]
    ctx.check(c % groups == 0, lambda: f"{c} channels do not split into {groups} groups")
    compute = "float32" if int(ctx.attr("stash_type", 1)) == 1 and dtype in ("float16", "bfloat16") else dtype
    xg = op.reshape(x, [n, groups, -1])
    if compute != dtype:
        xg = op.astype(xg, compute)
    _, centered, var = _moments(ctx.emit(xg), [2])
    y = op.multiply(centered, op.rsqrt(op.add(var, scalar(float(ctx.attr("epsilon", 1e-5)), compute))))
    y = op.reshape(op.astype(y, dtype) if compute != dtype else y, shape)
    if ctx.opset < 21:  # scale and bias are per group before opset 21
        scale, bias = (op.repeat(t, c // groups, axis=0) for t in (scale, bias))
    rank = len(shape)
    return op.add(op.multiply(y, _channel_vec(scale, rank)), _channel_vec(bias, rank))


def _lp_norm(ctx, inputs):
    x = inputs[0]
    dtype = ctx.dtype(0)
    axis = helpers.norm_axis(int(ctx.attr("axis", -1)), len(_static_shape(ctx, 0)))
    p = int(ctx.attr("p", 2))
    ctx.check(p in (1, 2), lambda: f"p={p} (only 1 and 2 are defined)")
    if p == 1:
        norm = op.sum(op.abs(x), axis=[axis], keepdims=True)
    else:
        norm = op.sqrt(op.sum(op.multiply(x, x), axis=[axis], keepdims=True))
    norm = ctx.emit(norm)
    zero = scalar(0, dtype)
    safe = op.where(op.equal(norm, zero), scalar(1, dtype), norm)
    return op.where(op.equal(norm, zero), zero, op.divide(x, safe))


def _mvn(ctx, inputs):
    x = inputs[0]
    dtype = ctx.dtype(0)
    axes = helpers.norm_axes(ctx.attr("axes", [0, 2, 3]), len(_static_shape(ctx, 0)))
    mean = op.mean(x, axis=axes, keepdims=True)
    var = op.subtract(op.mean(op.multiply(x, x), axis=axes, keepdims=True), op.multiply(mean, mean))
    return op.divide(op.subtract(x, mean), op.add(op.sqrt(var), scalar(1e-9, dtype)))


def _lrn(ctx, inputs):
    x = inputs[0]
    shape = _static_shape(ctx, 0)
    dtype = ctx.dtype(0)
    size = int(ctx.attr("size"))
    alpha, beta, bias = (float(ctx.attr(k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = op.reshape(op.multiply(x, x), [shape[0], 1, shape[1], helpers.numel(shape[2:])])
    win = _AVG_POOL[2](sq, [size, 1], [1, 1], [lo, 0, hi, 0], [1, 1], False, True)
    square_sum = op.reshape(op.multiply(win, scalar(float(size), dtype)), shape)
    denom = op.power(op.add(scalar(bias, dtype), op.multiply(square_sum, scalar(alpha / size, dtype))), scalar(beta, dtype))
    return op.divide(x, denom)


def _causal_conv_with_state(ctx, inputs):
    """Depthwise causal conv1d over [past_state | input] (zeros without a state), optional SiLU;
    present_state is the last k-1 positions of that concatenation."""
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    past = inputs[3] if len(inputs) > 3 else None
    b, c, length = _static_shape(ctx, 0)
    k = _static_shape(ctx, 1)[2]
    dtype = ctx.dtype(0)
    if past is None:
        past = helpers.const(np.zeros((b, c, k - 1)), dtype)
    padded = ctx.emit(op.concat([past, x], axis=2)) if k > 1 else x
    if dtype in ("float16", "bfloat16"):  # accumulate in float32, round once (as the reference does)
        bias32 = op.astype(bias, "float32") if bias is not None else None
        y = op.astype(_add_bias(op.nn.conv1d(padded, w, groups=c, out_dtype="float32"), bias32, 3), dtype)
    else:
        y = _add_bias(op.nn.conv1d(padded, w, groups=c), bias, 3)
    act = ctx.attr("activation", "none")
    ctx.check(act in ("none", "silu", "swish"), lambda: f"activation {act!r}")
    if act != "none":
        y = ctx.emit(y)
        yf = y if dtype == "float32" else op.astype(y, "float32")
        y = op.multiply(yf, op.sigmoid(yf))
        y = y if dtype == "float32" else op.astype(y, dtype)
    present = op.strided_slice(padded, axes=[2], begin=[length], end=[length + k - 1])
    return [y, present]


RULES = (
    OpRule("Conv", lower_conv, kind="native"),
    OpRule("ConvTranspose", conv_transpose.lower_conv_transpose, kind="native"),
    OpRule("MaxPool", _max_pool, kind="native"),
    OpRule("AveragePool", _avg_pool, kind="native"),
    OpRule("LpPool", _lp_pool, kind="decomposed"),
    OpRule("GlobalAveragePool", _global_avg_pool, kind="native"),
    OpRule("GlobalMaxPool", _global_max_pool, kind="native"),
    OpRule("GlobalLpPool", _global_lp_pool, kind="decomposed"),
    OpRule("BatchNormalization", _batch_norm, kind="decomposed"),
    OpRule("InstanceNormalization", _instance_norm, kind="decomposed"),
    OpRule("LayerNormalization", _layer_norm, since=17, kind="decomposed"),
    OpRule("GroupNormalization", _group_norm, since=18, kind="decomposed"),
    OpRule("RMSNormalization", _rms_norm, since=23, kind="decomposed"),
    OpRule("LpNormalization", _lp_norm, kind="decomposed"),
    OpRule("MeanVarianceNormalization", _mvn, kind="decomposed"),
    OpRule("LRN", _lrn, kind="decomposed"),
    OpRule("CausalConvWithState", _causal_conv_with_state, kind="decomposed"),
    *resize.RULES,
    *attention.RULES,
    *image.RULES,
)

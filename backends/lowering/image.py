"""Lowering rules: sampling and scattering ops on images (GridSample, AffineGrid, RoiAlign, MaxUnpool, Col2Im)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering.helpers import const
from graphopt.backends.lowering.rules import OpRule

op = relax.op


_GRID_METHODS = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic", "bicubic": "bicubic"}


def _grid_sample(ctx, inputs):
    x, grid = inputs[0], inputs[1]
    rank = len(helpers.static_shape(inputs[0]))
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    ctx.check(mode in _GRID_METHODS, lambda: f"mode {mode!r}")
    layout = {4: "NCHW", 5: "NCDHW"}.get(rank)
    ctx.check(layout is not None, lambda: f"rank-{rank} input (4-D and 5-D are supported)")
    grid = op.permute_dims(grid, [0, rank - 1] + list(range(1, rank - 1)))  # Relax wants [N, 2|3, *spatial]
    return op.image.grid_sample(
        x, grid, method=_GRID_METHODS[mode], layout=layout,
        padding_mode=ctx.attr("padding_mode", "zeros"), align_corners=bool(ctx.attr("align_corners", 0)),
    )


def _affine_grid(ctx, inputs):
    """grid[n, *pos, :] = theta[n] · (x, y[, z], 1) over the normalized output positions."""
    theta = inputs[0]
    size = [int(v) for v in np.asarray(ctx.require_const(1, "size")).reshape(-1)]
    ctx.check(len(size) in (4, 5), lambda: f"size {size} must be [N, C, H, W] or [N, C, D, H, W]")
    align = bool(ctx.attr("align_corners", 0))
    spatial = size[2:]

    def axis(n):
        if align:
            return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
        return (np.arange(n) * 2.0 + 1.0) / n - 1.0

    mesh = np.meshgrid(*[axis(n) for n in spatial], indexing="ij")  # D, H, W order
    coords = [m.reshape(-1) for m in mesh[::-1]]  # x (W) first, then y, z
    base = np.stack(coords + [np.ones_like(coords[0])], axis=1)  # [P, nd + 1]
    dtype = ctx.dtype(0)
    grid = op.matmul(const(base, dtype), op.permute_dims(theta, [0, 2, 1]))  # [N, P, nd]
    return op.reshape(grid, [size[0]] + spatial + [len(spatial)])


def _roi_axis(ctx, start, end, pooled: int, grid: int, size: int, clamp_one: bool, dtype: str):
    """Bilinear taps of one axis for every (roi, bin, sample): (low, high) int32 indices and their weights,
    all [R, pooled * grid]; samples outside [-1, size] get zero weights (ONNX RoiAlign)."""
    f = lambda v: helpers.scalar(v, dtype)  # noqa: E731
    length = op.subtract(end, start)
    if clamp_one:
        length = op.maximum(length, f(1.0))
    bin_size = ctx.emit(op.divide(length, f(float(pooled))))  # [R, 1]
    steps = np.array([p + (g + 0.5) / grid for p in range(pooled) for g in range(grid)])
    pos = ctx.emit(op.add(start, op.multiply(bin_size, const(steps.reshape(1, -1), dtype))))  # [R, S]
    outside = op.logical_or(op.less(pos, f(-1.0)), op.greater(pos, f(float(size))))
    pos = op.maximum(pos, f(0.0))
    low = ctx.emit(op.astype(op.floor(pos), "int32"))
    at_end = op.greater_equal(low, relax.const(size - 1, "int32"))
    low = ctx.emit(op.where(at_end, relax.const(size - 1, "int32"), low))
    high = op.where(at_end, low, op.add(low, relax.const(1, "int32")))
    pos = op.where(at_end, op.astype(low, dtype), pos)
    frac = ctx.emit(op.subtract(pos, op.astype(low, dtype)))
    keep = op.where(outside, f(0.0), f(1.0))
    return low, ctx.emit(high), ctx.emit(op.multiply(op.subtract(f(1.0), frac), keep)), ctx.emit(op.multiply(frac, keep))


def _roi_align_max(ctx, x, rois, batch_idx, ctm: str, scale: float):
    """RoiAlign mode='max' as ONNX defines it: per bin, the max over samples of the max of the four
    weighted bilinear corners (sampling_ratio must be positive: a static sample grid)."""
    n, c, h, w = helpers.static_shape(x)
    r = helpers.static_shape(rois)[0]
    ph, pw = int(ctx.attr("output_height", 1)), int(ctx.attr("output_width", 1))
    grid = int(ctx.attr("sampling_ratio", 0))
    ctx.check(grid > 0, "mode 'max' needs sampling_ratio > 0 (an adaptive grid depends on run-time boxes)")
    dtype = helpers.dtype_of(x)
    off = 0.5 if ctm == "half_pixel" else 0.0
    box = ctx.emit(op.subtract(op.multiply(rois, helpers.scalar(scale, dtype)), helpers.scalar(off, dtype)))
    col = lambda i: ctx.emit(op.strided_slice(box, axes=[1], begin=[i], end=[i + 1]))  # noqa: E731
    clamp = ctm != "half_pixel"
    y0, y1, wy0, wy1 = _roi_axis(ctx, col(1), col(3), ph, grid, h, clamp, dtype)
    x0, x1, wx0, wx1 = _roi_axis(ctx, col(0), col(2), pw, grid, w, clamp, dtype)
    data = ctx.emit(op.reshape(op.take(x, op.astype(batch_idx, "int64"), axis=0), [r, c, h * w]))
    sy, sx = ph * grid, pw * grid
    best = None
    for yi, wy in ((y0, wy0), (y1, wy1)):
        for xi, wx in ((x0, wx0), (x1, wx1)):
            flat = op.add(op.multiply(op.expand_dims(yi, [2]), relax.const(w, "int32")), op.expand_dims(xi, [1]))
            idx = op.broadcast_to(op.reshape(op.astype(flat, "int64"), [r, 1, sy * sx]), [r, c, sy * sx])
            vals = op.gather_elements(data, idx, axis=2)
            weight = op.reshape(op.multiply(op.expand_dims(wy, [2]), op.expand_dims(wx, [1])), [r, 1, sy * sx])
            term = ctx.emit(op.multiply(vals, weight))
            best = term if best is None else ctx.emit(op.maximum(best, term))
    return op.max(op.reshape(best, [r, c, ph, grid, pw, grid]), axis=[3, 5])


def _roi_align(ctx, inputs):
    x, rois, batch_idx = inputs[:3]
    mode = ctx.attr("mode", "avg")
    ctx.check(mode in ("avg", "max"), lambda: f"mode {mode!r}")
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 16 else "output_half_pixel")
    ctx.check(ctm in ("half_pixel", "output_half_pixel"), lambda: f"coordinate_transformation_mode {ctm!r}")
    dtype = helpers.dtype_of(rois)
    scale = float(ctx.attr("spatial_scale", 1.0))
    if mode == "max":  # ONNX's max is over weighted corners, which Relax's roi_align does not compute
        return _roi_align_max(ctx, x, rois, batch_idx, ctm, scale)
    if ctm == "half_pixel":  # ONNX shifts the scaled box by -0.5; Relax's `aligned` only skips the 1-pixel minimum
        rois = op.subtract(rois, helpers.scalar(0.5 / scale, dtype))
    boxes = op.concat([op.astype(op.expand_dims(batch_idx, [1]), dtype), rois], axis=1)
    return op.vision.roi_align(
        x, boxes, pooled_size=(int(ctx.attr("output_height", 1)), int(ctx.attr("output_width", 1))),
        spatial_scale=scale, sample_ratio=int(ctx.attr("sampling_ratio", 0)),
        aligned=ctm == "half_pixel", layout="NCHW", mode=mode,
    )


def _max_unpool(ctx, inputs):
    """Scatter X's values to the flat positions in I (as MaxPool's Indices give them) of a zero tensor."""
    x, idx = inputs[0], inputs[1]
    shape = helpers.static_shape(x)
    n = len(shape) - 2
    kernel = list(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides") or [1] * n)
    pads = list(ctx.attr("pads") or [0] * (2 * n))
    inferred = list(shape[:2]) + [
        (d - 1) * s + k - pads[i] - pads[n + i] for i, (d, s, k) in enumerate(zip(shape[2:], strides, kernel))
    ]
    zeros = const(np.zeros(helpers.numel(inferred)), helpers.dtype_of(x))
    count = helpers.numel(shape)
    flat = op.scatter_elements(zeros, op.reshape(op.astype(idx, "int64"), [count]), op.reshape(x, [count]), axis=0)
    y = op.reshape(flat, inferred)
    if ctx.has_input(2):  # a larger output_shape: the unpooled values sit at its start, zeros after
        out_shape = [int(v) for v in np.asarray(ctx.require_const(2, "output_shape")).reshape(-1)]
        extra = [o - i for o, i in zip(out_shape, inferred)]
        ctx.check(all(e >= 0 for e in extra), lambda: f"output_shape {out_shape} is smaller than {inferred}")
        if any(extra):
            y = op.nn.pad(ctx.emit(y), [v for e in extra for v in (0, e)])
    return y


def _col2im(ctx, inputs):
    """Sum each column's block back into the image: one scatter-add with constant target positions."""
    x = inputs[0]
    image = [int(v) for v in np.asarray(ctx.require_const(1, "image_shape")).reshape(-1)]
    block = [int(v) for v in np.asarray(ctx.require_const(2, "block_shape")).reshape(-1)]
    n = len(image)
    dil = list(ctx.attr("dilations") or [1] * n)
    pads = list(ctx.attr("pads") or [0] * (2 * n))
    strides = list(ctx.attr("strides") or [1] * n)
    batch, ck, length = helpers.static_shape(x)
    k = helpers.numel(block)
    channels = ck // k
    padded = [i + pads[d] + pads[n + d] for d, i in enumerate(image)]
    counts = [(p - (b - 1) * dd - 1) // s + 1 for p, b, dd, s in zip(padded, block, dil, strides)]
    ctx.check(helpers.numel(counts) == length, lambda: f"{length} columns, but the geometry gives {counts}")
    offs = np.stack(np.meshgrid(*[np.arange(b) for b in block], indexing="ij"), -1).reshape(k, 1, n)
    pos = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), -1).reshape(1, length, n)
    coords = pos * np.array(strides) + offs * np.array(dil)  # [k, L, n] in the padded image
    target = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), padded).reshape(-1)
    cols = op.reshape(x, [batch, channels, k * length])
    idx = const(np.broadcast_to(target, (batch, channels, k * length)).astype("int64"))
    zeros = const(np.zeros((batch, channels, helpers.numel(padded))), helpers.dtype_of(x))
    img = op.reshape(op.scatter_elements(zeros, idx, cols, axis=2, reduction="add"), [batch, channels] + padded)
    if any(pads):
        img = op.strided_slice(img, axes=list(range(2, 2 + n)), begin=pads[:n],
                               end=[p + i for p, i in zip(pads[:n], image)])
    return img


def _deform_conv(ctx, inputs):
    """2-D deformable conv: bilinear samples (zeros outside) at kernel taps moved by ``offset``, weighted by
    ``mask``, gathered per offset group with Relax grid_sample, then a grouped matmul with W."""
    get = lambda i: inputs[i] if len(inputs) > i and inputs[i] is not None else None  # noqa: E731
    x, w, off, bias, mask = inputs[0], inputs[1], inputs[2], get(3), get(4)
    xs, ws, offs = (helpers.static_shape(t) for t in (x, w, off))
    ctx.check(xs is not None and len(xs) == 4, "only 2-D DeformConv (rank-4 X) is supported")
    n, c, ih, iw = xs
    oc, cpg, kh, kw = ws
    oh, ow = offs[2:]
    strides = list(ctx.attr("strides") or [1, 1])
    dil = list(ctx.attr("dilations") or [1, 1])
    pads = list(ctx.attr("pads") or [0, 0, 0, 0])
    group, og = int(ctx.attr("group", 1)), int(ctx.attr("offset_group", 1))
    k, p = kh * kw, oh * ow
    dtype = helpers.dtype_of(x)
    taps_h = np.repeat(np.arange(kh) * dil[0], kw)
    taps_w = np.tile(np.arange(kw) * dil[1], kh)
    base_h = (taps_h[:, None, None] - pads[0] + strides[0] * np.arange(oh)[None, :, None]).astype("float64")
    base_w = (taps_w[:, None, None] - pads[1] + strides[1] * np.arange(ow)[None, None, :]).astype("float64")
    off6 = ctx.emit(op.reshape(off, [n, og, k, 2, oh, ow]))
    mask4 = ctx.emit(op.reshape(mask, [n, og, k, p])) if mask is not None else None
    per = c // og
    cols = []
    for g in range(og):
        def comp(j):
            return op.squeeze(op.strided_slice(off6, axes=[1, 3], begin=[g, j], end=[g + 1, j + 1]), [1, 3])
        # align_corners normalization: -1 at pixel 0, +1 at the last pixel
        ynorm = op.add(op.multiply(op.add(comp(0), const(base_h, dtype)), helpers.scalar(2.0 / max(ih - 1, 1), dtype)),
                       helpers.scalar(-1.0, dtype))
        xnorm = op.add(op.multiply(op.add(comp(1), const(base_w, dtype)), helpers.scalar(2.0 / max(iw - 1, 1), dtype)),
                       helpers.scalar(-1.0, dtype))
        grid = ctx.emit(op.reshape(op.stack([xnorm, ynorm], axis=1), [n, 2, k * oh, ow]))
        xg = op.strided_slice(x, axes=[1], begin=[g * per], end=[(g + 1) * per]) if og > 1 else x
        sampled = op.image.grid_sample(xg, grid, method="bilinear", layout="NCHW", padding_mode="zeros", align_corners=True)
        sampled = op.reshape(sampled, [n, per, k, p])
        if mask4 is not None:
            sampled = op.multiply(sampled, op.strided_slice(mask4, axes=[1], begin=[g], end=[g + 1]))
        cols.append(ctx.emit(sampled))
    col = op.concat(cols, axis=1) if og > 1 else cols[0]
    col = op.reshape(col, [n, group, cpg * k, p])
    wm = op.reshape(w, [1, group, oc // group, cpg * k])
    y = op.reshape(op.matmul(wm, col), [n, oc, oh, ow])
    if bias is not None:
        y = op.add(y, op.reshape(bias, [1, oc, 1, 1]))
    return y


RULES = (
    OpRule("DeformConv", _deform_conv, since=19, kind="decomposed"),
    OpRule("GridSample", _grid_sample, since=16, kind="native"),
    OpRule("AffineGrid", _affine_grid, since=20, kind="decomposed"),
    OpRule("RoiAlign", _roi_align, since=10, kind="native"),
    OpRule("MaxUnpool", _max_unpool, since=9, kind="decomposed"),
    OpRule("Col2Im", _col2im, since=18, kind="decomposed"),
)

"""Lowering rule: ConvTranspose (part of the nn family, listed in nn.RULES).

Relax's conv2d_transpose legalizes to a convolution over the zero-dilated input: a stride-s transposed
conv does s*s times the multiply-adds it needs, most of them on zeros (ViT-S's 4x4 stride-2 decoder
head: 120 of 460 ms). Two float32 2-D forms avoid that:

* stride == kernel (patches do not overlap): a 1x1 conv to O*kh*kw channels, then depth-to-space;
* any other stride > 1 (``_phase_conv_transpose``): a matmul of the pixels by the weight
  ``[C, kh*kw*O]`` (every input pixel's contribution to each kernel tap: the packed matmul), then a
  col2im that adds, for each output pixel, the taps that reach it. Output row ``y`` of phase
  ``a = (y + pad) % s`` reads taps ``a, a + s, ...`` of input rows ``(y + pad) // s - t``; the kernel
  is padded with zero taps to a multiple of the stride, so every output pixel sums the same
  ``ceil(kh/s) * ceil(kw/s)`` terms with no branch.

Everything else (groups, dilation, stride 1, negative pads, other dtypes) keeps Relax's op.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers

op = relax.op

_CONV_T = {1: op.nn.conv1d_transpose, 2: op.nn.conv2d_transpose, 3: op.nn.conv3d_transpose}
_LAYOUT = {1: ("NCW", "IOW"), 2: ("NCHW", "IOHW"), 3: ("NCDHW", "IODHW")}


def _static_shape(ctx, i: int) -> tuple[int, ...]:
    shape = ctx.shape(i)
    ctx.check(shape is not None and all(d is not None for d in shape), lambda: f"input {i} needs a static shape, got {shape}")
    return tuple(shape)


def _add_bias(y: relax.Expr, bias, rank: int) -> relax.Expr:
    return y if bias is None else op.add(y, op.expand_dims(bias, [0] + list(range(2, rank))))


def _patch_conv_transpose(ctx, x, w, xshape, kernel) -> relax.Expr:
    """A 2-D transposed conv whose stride equals its kernel (no pads, dilation or output padding).

    Each input pixel writes its own kh x kw patch and patches do not overlap, so it is a 1x1 conv to
    O*kh*kw channels followed by depth-to-space: 1/(kh*kw) of the multiply-adds of the conv over the
    zero-dilated input that conv2d_transpose computes, and a conv the CPU schedules vectorize well
    (PP-OCRv4 det's 2x2/2 upsampling heads).
    """
    c, o = _static_shape(ctx, 1)[:2]
    kh, kw = kernel
    batch, _, h, wd = xshape
    w1 = ctx.emit(op.reshape(op.permute_dims(w, [1, 2, 3, 0]), [o * kh * kw, c, 1, 1]))
    y = ctx.emit(op.nn.conv2d(x, w1))  # [N, O*kh*kw, H, W], channel (o, a, b)
    y = ctx.emit(op.reshape(y, [batch, o, kh, kw, h, wd]))
    y = ctx.emit(op.permute_dims(y, [0, 1, 4, 2, 5, 3]))  # [N, O, H, kh, W, kw]
    return op.reshape(y, [batch, o, h * kh, wd * kw])


def _phase_weight(ctx, w, strides, count) -> relax.Expr:
    """The weight ``[C, O, kh, kw]`` as the phase conv's ``[O*sh*sw, C, th, tw]``: output channel
    (o, a, b) takes taps ``a + sh*j`` (rows) and ``b + sw*i`` (columns), ``j`` and ``i`` reversed
    (a correlation), and zero taps past the kernel; in numpy when the weight is constant."""
    c, o, kh, kw = _static_shape(ctx, 1)
    (sh, sw), (th, tw) = strides, count
    pad = [0, 0, 0, 0, 0, th * sh - kh, 0, tw * sw - kw]
    value = ctx.const(1)
    if value is not None:
        wp = np.pad(np.asarray(value, np.float32), list(zip(pad[::2], pad[1::2])))
        wp = wp.reshape(c, o, th, sh, tw, sw)[:, :, ::-1, :, ::-1, :]
        return helpers.const(np.ascontiguousarray(wp.transpose(1, 3, 5, 0, 2, 4)).reshape(o * sh * sw, c, th, tw))
    if any(pad):
        w = ctx.emit(op.nn.pad(w, pad))
    wp = ctx.emit(op.flip(op.flip(op.reshape(w, [c, o, th, sh, tw, sw]), 2), 4))
    return ctx.emit(op.reshape(op.permute_dims(wp, [1, 3, 5, 0, 2, 4]), [o * sh * sw, c, th, tw]))


def _phase_conv_transpose(ctx, x, w, xshape, kernel, strides, pads, out_hw) -> relax.Expr:
    """A 2-D, group-1, undilated float32 transposed conv with a stride > 1 and pads >= 0.

    Output row ``y`` is full row ``f = y + pad``, of phase ``a = f % s``, and sums taps
    ``a + s*j`` of input rows ``f // s - j``: for each phase a stride-1 correlation of the input
    (padded by ``th - 1``) with a ``th x tw`` kernel. All ``sh*sw`` phases are one conv2d to
    ``O*sh*sw`` channels (the conv schedules, no multiply by an inserted zero), then depth-to-space
    and the crop of the pads.
    """
    batch, _, h, wd = xshape
    o = _static_shape(ctx, 1)[1]
    count = [math.ceil(k / s) for k, s in zip(kernel, strides)]
    # phase rows: enough for the last output row (output padding past the kernel reads zero rows)
    rows = [max(n + c - 1, -(-(p + size) // s)) for n, c, p, size, s in zip((h, wd), count, pads, out_hw, strides)]
    conv_pads = [count[0] - 1, count[1] - 1, rows[0] - h, rows[1] - wd]
    y = ctx.emit(op.nn.conv2d(x, _phase_weight(ctx, w, strides, count), padding=conv_pads))
    y = ctx.emit(op.reshape(y, [batch, o, strides[0], strides[1], rows[0], rows[1]]))
    y = ctx.emit(op.permute_dims(y, [0, 1, 4, 2, 5, 3]))  # [N, O, rows, sh, cols, sw]
    y = ctx.emit(op.reshape(y, [batch, o, rows[0] * strides[0], rows[1] * strides[1]]))
    return op.strided_slice(y, axes=[2, 3], begin=list(pads), end=[p + size for p, size in zip(pads, out_hw)])


def _resolved_pads(ctx, n, xshape, kernel, strides, dilations, out_pad) -> list[int]:
    """Begin then end pads from pads / auto_pad / output_shape (negative where the output grows)."""
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    out_shape = ctx.attr("output_shape")
    if out_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return [0] * (2 * n) if auto_pad == "VALID" else list(ctx.attr("pads") or [0] * (2 * n))
    full = [s * (i - 1) + (k - 1) * d + 1 for i, s, k, d in zip(xshape[2:], strides, kernel, dilations)]
    target = list(out_shape)[-n:] if out_shape is not None else [i * s for i, s in zip(xshape[2:], strides)]
    begins, ends = [], []
    for f, op_, t in zip(full, out_pad, target):
        total = f + op_ - t
        small, big = total // 2, total - total // 2
        upper = auto_pad == "SAME_UPPER"
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def lower_conv_transpose(ctx, inputs):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    xshape = _static_shape(ctx, 0)
    rank = len(xshape)
    n = rank - 2
    ctx.check(n in _CONV_T, lambda: f"{n}-D transposed convolution is not supported")
    group = int(ctx.attr("group", 1))
    kernel = list(ctx.attr("kernel_shape") or _static_shape(ctx, 1)[2:])
    strides = list(ctx.attr("strides") or [1] * n)
    dilations = list(ctx.attr("dilations") or [1] * n)
    out_pad = list(ctx.attr("output_padding") or [0] * n)
    pads = _resolved_pads(ctx, n, xshape, kernel, strides, dilations, out_pad)
    full = [s * (i - 1) + (k - 1) * d + 1 for i, s, k, d in zip(xshape[2:], strides, kernel, dilations)]
    sizes = [f + o - b - e for f, o, b, e in zip(full, out_pad, pads[:n], pads[n:])]
    plain = n == 2 and group == 1 and all(d == 1 for d in dilations) and helpers.dtype_of(x) == "float32"
    if plain and strides == kernel and not any(pads) and not any(out_pad):
        return _add_bias(_patch_conv_transpose(ctx, x, w, xshape, kernel), bias, rank)
    if plain and max(strides) > 1 and min(pads) >= 0:
        return _add_bias(_phase_conv_transpose(ctx, x, w, xshape, kernel, strides, pads[:n], sizes), bias, rank)
    data_layout, kernel_layout = _LAYOUT[n]
    native = all(p >= 0 for p in pads) and all(0 <= o < max(s, d) for o, s, d in zip(out_pad, strides, dilations))
    if native:
        y = _CONV_T[n](
            x, w, strides=strides, padding=pads, output_padding=out_pad, dilation=dilations, groups=group,
            data_layout=data_layout, kernel_layout=kernel_layout,
        )
        return _add_bias(y, bias, rank)
    # General case: the full transposed convolution, then crop (positive pads) or zero-extend
    # (negative pads, output_padding) each spatial axis.
    y = ctx.emit(_CONV_T[n](
        x, w, strides=strides, padding=[0] * (2 * n), dilation=dilations, groups=group,
        data_layout=data_layout, kernel_layout=kernel_layout,
    ))
    lo = [max(p, 0) for p in pads[:n]]
    extend_lo = [max(-p, 0) for p in pads[:n]]
    hi = [min(f, lo_ + s - el) for f, lo_, s, el in zip(full, lo, sizes, extend_lo)]
    y = ctx.emit(op.strided_slice(y, axes=list(range(2, rank)), begin=lo, end=hi))
    extend_hi = [s - el - (h - l) for s, el, h, l in zip(sizes, extend_lo, hi, lo)]
    if any(extend_lo) or any(extend_hi):
        y = op.nn.pad(y, [0, 0, 0, 0] + [v for pair in zip(extend_lo, extend_hi) for v in pair])
    return _add_bias(y, bias, rank)

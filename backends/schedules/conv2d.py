"""conv2d in NCHW (plain, grouped, depthwise, dilated) and conv2d-transpose (a conv over the dilated input).

Three plans:

* width-vector: vector over output width (contiguous in the input row for stride 1); register
  axis = output channels, so one input vector feeds ``reg_tile`` channels (``tiling.py``). Used
  when the width fills whole vectors (16, 32, 112 columns on AVX-512).
* channel-vector: vector over output channels, each input pixel broadcast into ``reg_tile``
  output columns. The weight is read as ``[O/L, I, KH, KW, L]`` (the ``L`` channels of one tap
  contiguous): a constant weight is repacked once at compile time (``prepack.py``), any other is
  repacked inside the function on every call, which only pays for strided widths. Used for
  strided widths and for widths that leave lanes empty (7, 14, 28, 56): 1x1 convs on 7x7/14x14
  maps ran 2.5-5x faster than with 7- or 14-lane width vectors.
* row accumulation (depthwise: the vector loads move with every other axis, nothing to reuse from
  registers): loops (rows..., taps, width), each tap adds a vector row into the output row in L1.

Grouped/depthwise convs with a strided width keep the generic schedule (parallel rows).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx

from .analysis import KEEP_ATTR, block_axes, buffer_uses, coefficient, main_reduction
from .features import RuleContext
from .prepack import REPACK_ATTR, layout_name
from .tiling import (
    PARALLEL_MIN_MACS,
    _inline_epilogue,
    _try,
    accumulator_tile,
    apply_contraction,
    divisors,
    pad_into_tiles,
    parallelize_outer,
    plan_contraction,
    register_tiles,
)


CHANNEL_VECTORS = 2  # output-channel vectors per register tile (fewer broadcasts per multiply-add)


def is_conv(sch: s_tir.Schedule, block) -> bool:
    """A reduction block with at least two reduction axes (channels x kernel window) and a 3-D+ output."""
    stmt = sch.get(block)
    nred = sum(1 for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return nred >= 2 and len(stmt.writes) == 1 and len(stmt.writes[0].region) >= 3 and len(stmt.reads) >= 2


def schedule_conv2d(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    feats, knobs = ctx.feats, ctx.knobs
    sch = s_tir.Schedule(func)
    block = main_reduction(sch)
    if block is None or not is_conv(sch, block):
        return None
    plan = plan_contraction(sch, block, feats, knobs=knobs)
    lanes = feats.lanes(sch.get(block).writes[0].source.dtype.bits)
    if plan is not None and plan.reg_axis is not None and _no_reuse(sch, block, plan):
        # depthwise: nothing to hold in registers across taps; accumulate rows in L1 instead
        return sch if apply_row_accumulate(sch, block, feats, plan, knobs) else None
    # a strided width, or one that leaves lanes empty (7, 14, 28): vector over channels, with the
    # weight repacked at compile time when it is a constant
    default = "channel" if plan is None or plan.vec_tile % lanes else "width"
    if knobs.pick("plan", default, ("channel", "width") if plan is not None else ()) == "channel":
        if apply_channel_vector(sch, block, ctx, runtime_repack=plan is None):
            return sch
        sch = s_tir.Schedule(func)
        block = main_reduction(sch)
    if plan is not None and apply_contraction(sch, block, feats, plan, knobs):
        return sch
    return None


def apply_channel_vector(sch: s_tir.Schedule, block, ctx: RuleContext, runtime_repack: bool = True) -> bool:
    """The channel-vector plan; False (before any change to ``sch``) when the block does not fit it.

    A constant weight is repacked at compile time (``ctx.attrs`` records it for ``prepack``); any
    other weight is repacked inside the function on every call, only if ``runtime_repack``.
    """
    feats = ctx.feats
    axes = block_axes(sch, block)
    stmt = sch.get(block)
    if axes is None or len(stmt.reads) != 2:
        return False
    out_idx = [r.min for r in stmt.writes[0].region]
    spatial = [i for i, a in enumerate(axes) if not a.reduce]
    x = next((i for i in spatial if coefficient(out_idx[-1], axes[i].var) == 1), None)
    if x is None:
        return False
    data_i = next((k for k, r in enumerate(stmt.reads) if buffer_uses(r, axes[x].var)), None)
    if data_i is None:
        return False
    w_i = 1 - data_i
    data, weight = stmt.reads[data_i], stmt.reads[w_i]
    # the output channel: in the weight's first index only, absent from the data read
    f = next((i for i in spatial if i != x and coefficient(weight.region[0].min, axes[i].var) == 1
              and not buffer_uses(data, axes[i].var)
              and not any(buffer_uses_expr(r.min, axes[i].var) for r in list(weight.region)[1:])), None)
    if f is None or len(weight.region) != 4:
        return False
    lanes = feats.lanes(stmt.writes[0].source.dtype.bits)
    ft = max(d for d in divisors(axes[f].extent) if d <= lanes)
    if ft < min(lanes, 4):
        return False
    # channel vectors and columns per register tile, chosen together for the most accumulators (ties:
    # two vectors, fewer broadcasts): 7 columns on AVX2 take one vector x 7, not two vectors x 1
    nvecs = (2, 1) if axes[f].extent % (2 * lanes) == 0 and CHANNEL_VECTORS == 2 else (1,)
    nvec, rt = max(((n, accumulator_tile(feats, axes[x].extent, n)) for n in nvecs), key=lambda p: p[0] * p[1])
    knobs = ctx.knobs
    picked = knobs.pick("nvec", nvec, nvecs)
    if picked != nvec:
        nvec, rt = picked, accumulator_tile(feats, axes[x].extent, picked)
    rt = knobs.pick("rt", rt, register_tiles(feats, axes[x].extent, nvec))
    ft = ft * nvec
    params = list(sch.mod["main"].params)
    w_param = next((k for k, p in enumerate(params) if p.same_as(weight.source)), None)
    prepacked = w_param is not None and w_param in ctx.constants
    if not prepacked and not runtime_repack:
        return False
    blocked = lambda o, i, h, w: (o // ft, i, h, w, o % ft)  # noqa: E731
    if prepacked:  # the constant is repacked at compile time (prepack.repack_constants)
        sch.transform_layout(block, ("read", w_i), blocked)
        ctx.attrs.setdefault(REPACK_ATTR, {})[str(w_param)] = layout_name(ft)
    else:  # repacked on every call
        wc = sch.cache_read(block, w_i, "global")
        sch.transform_layout(wc, ("write", 0), blocked)
        sch.annotate(wc, KEEP_ATTR, 1)
    if _pointwise(sch, block, axes, x, data) and knobs.pick("pack_input", nvec == 1 and rt >= 7, (False, True)):
        # the input as [n, y, x / rt, c, rt]: the rt columns of every channel that one register tile
        # broadcasts lie next to each other, read as one stream (GEMM's packed panel) instead of one
        # cache line per channel; one pass over the input per call, reused by every channel tile.
        # Default on for wide tiles (ResNet-50's 1x1 convs on 7x7/14x14 maps, rt 7: 1.36 -> 0.80 ms,
        # 1.18 -> 0.83, 1.97 -> 1.60 on 2 AVX2 cores); off for two-vector tiles of 4 columns (28x28:
        # 0.77 -> 0.94 ms): the search tries the other
        dc = sch.cache_read(block, data_i, "global")
        sch.transform_layout(dc, ("write", 0), lambda n, c, h, w: (n, h, w // rt, c, w % rt))
        sch.annotate(dc, KEEP_ATTR, 1)

    outer, reds = [], []
    for i, a in enumerate(axes):
        if a.reduce:
            reds.append(a.loop)
        elif i == f:
            fo, fi = sch.split(a.loop, [None, ft])
            outer.append(fo)
        elif i == x:
            xo, xi = sch.split(a.loop, [None, rt])
            outer.append(xo)
        else:
            outer.append(a.loop)
    sch.reorder(*outer, *reds, xi, fi)
    cl = sch.cache_write(block, 0, "local")
    nd = len(out_idx)
    perm = [k for k in range(nd) if k != 1] + [1]  # channels innermost in the accumulator
    sch.transform_layout(block, ("write", 0), lambda *idx: tuple(idx[k] for k in perm))
    sch.reverse_compute_at(cl, outer[-1], preserve_unit_loops=True)
    _inline_epilogue(sch, cl)
    parallelize_outer(sch, outer, math.prod(a.extent for a in axes), feats, PARALLEL_MIN_MACS, knobs)
    pad_into_tiles(sch, block, knobs, default=False)
    sch.vectorize(fi)
    sch.unroll(xi)
    init = sch.decompose_reduction(block, reds[0])
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, sch.get_loops(cl)[-1])
    return True


def _pointwise(sch, block, axes, x, data) -> bool:
    """A 1x1, stride-1 conv on a 4-D NCHW input read whole: ``data[n, c, y, x]`` with x the output
    column (the kernel's unit axes may appear in the index; they are always 0)."""
    shape = [int(d) for d in data.source.shape]
    if len(shape) != 4 or shape[-1] != axes[x].extent or coefficient(data.region[-1].min, axes[x].var) != 1:
        return False
    wide = [a for a in axes if a.reduce and a.extent > 1]
    others = [a for a in axes if a is not axes[x] and buffer_uses_expr(data.region[-1].min, a.var)]
    return len(wide) == 1 and all(a.extent == 1 for a in others)


def _no_reuse(sch, block, plan) -> bool:
    """True when every input read along the vector axis also moves with the register axis (depthwise)."""
    axes = block_axes(sch, block)
    stmt = sch.get(block)
    vvar, rvar = axes[plan.vec_axis].var, axes[plan.reg_axis].var
    vec_reads = [r for r in stmt.reads if buffer_uses(r, vvar)]
    return bool(vec_reads) and all(buffer_uses(r, rvar) for r in vec_reads)


def apply_row_accumulate(sch: s_tir.Schedule, block, feats, plan, knobs=None) -> bool:
    """Loops (spatial..., taps..., width): each tap adds a vector row into the output row in L1.

    For depthwise convs (9 multiply-adds per output) this beat register tiles by 1.3-1.8x.
    """
    axes = block_axes(sch, block)
    outer, reds = [], []
    for i, a in enumerate(axes):
        if a.reduce:
            reds.append(a.loop)
        elif i == plan.vec_axis:
            lanes = feats.lanes(sch.get(block).writes[0].source.dtype.bits)
            pow2 = max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= lanes and a.extent % d == 0)
            xo, xi = sch.split(a.loop, [None, pow2 if pow2 >= lanes // 2 else plan.vec_tile])
        else:
            outer.append(a.loop)
    sch.reorder(*outer, *reds, xo, xi)
    for c in list(sch.get_consumers(block)):
        _try(sch.reverse_compute_at, c, outer[-1], True)
    _inline_epilogue_chain(sch, block)
    parallelize_outer(sch, outer, math.prod(a.extent for a in axes), feats, PARALLEL_MIN_MACS, knobs)
    sch.vectorize(xi)
    sch.decompose_reduction(block, reds[0])
    for b in sch.get_consumers(block):
        _try(sch.vectorize, sch.get_loops(b)[-1])
    return True


def _inline_epilogue_chain(sch, block) -> None:
    """Inline the elementwise blocks after ``block``'s direct consumer into that consumer."""
    cons = list(sch.get_consumers(block))
    if len(cons) == 1:
        _inline_epilogue(sch, cons[0])


def buffer_uses_expr(expr, var) -> bool:
    from .analysis import uses

    return uses(expr, var)

"""conv2d in the blocked channel layout (``blocked.py``: NCHW[b]c data, OIHW[b]i[b]o weight).

The micro kernel: for each input channel of each tap, ``ot`` weight vectors (``ot`` output-channel
blocks of ``b`` lanes, contiguous in the weight) times ``rt`` broadcast input pixels (one output row's
columns) into ``ot x rt`` accumulators. Loops: outer tiles (fused and parallel), the reduction
(channel block, kernel rows, kernel columns, channel lane), then ``ot`` and ``rt`` unrolled and the
``b`` lanes vectorized. Depthwise convs multiply ``rt`` input vectors by one weight vector per tap
(``schedule_depthwise_blocked``). Every decision is a knob for the schedule search (``Knobs``).
"""

from __future__ import annotations

import math

from tvm import s_tir

from .analysis import block_axes, get_block, nbytes
from .blocked import BLOCK_NAME, DEPTHWISE_NAME
from .features import RuleContext
from .tiling import (
    PARALLEL_MIN_MACS,
    TilePlan,
    _inline_epilogue,
    apply_contraction,
    _try,
    accumulator_tile,
    pad_into_tiles,
    parallelize_outer,
    register_tiles,
)


# Input bytes from which the channel tiles go innermost of the outer loops by default (the input rows
# of one pixel tile then stay in L1 for every channel tile, and the input is read from memory once).
# Below it the channel tiles go outermost: the weights of one channel tile stay in L1 while the
# input streams from L2/L3. On a 2-core Xeon (AVX-512, 2 MB L2) every ResNet-50 1x1 conv ran faster
# that way, inputs of 3.2 MB included (the schedule search: 1.3 -> 0.6 ms for 128->512 on 28x28;
# the model: ratio to ORT 1.20 -> 1.10 over 100 interleaved runs); PP-OCRv4 det and rec unchanged.
CHANNELS_INNER_MIN_BYTES = 8 << 20


def tile_options(feats, blocks: int, width: int) -> list[tuple[int, int]]:
    """(output-channel blocks, columns) register tiles that fit the vector registers, best first.

    Enough accumulators to cover the FMA latency (two thirds of ``max_accumulators``: 8 on AVX2),
    then the most multiply-adds per load (``ot * rt / (ot + rt)``): 55 columns on AVX2 take 2 x 5,
    not 1 x 11 (0.83 vs 1.31 ms for SqueezeNet's 16->64 3x3 conv on 55x55).
    """
    enough = feats.max_accumulators * 2 // 3
    opts = [(ot, accumulator_tile(feats, width, ot)) for ot in (1, 2, 4)
            if blocks % ot == 0 and 2 * ot < feats.vector_registers]
    return sorted(opts, key=lambda p: (p[0] * p[1] >= enough, p[0] * p[1] / (p[0] + p[1])), reverse=True)


def schedule_conv2d_blocked(func, ctx: RuleContext) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    block = get_block(sch, BLOCK_NAME)
    if block is None:
        return schedule_depthwise_blocked(sch, ctx)
    feats, knobs = ctx.feats, ctx.knobs
    axes = block_axes(sch, block)
    if axes is None or len(axes) != 9:
        return None
    n, o, y, x, oi, *reds = axes
    tiles = tile_options(feats, o.extent, x.extent)
    ot = knobs.pick("ot", tiles[0][0], tuple(t for t, _ in tiles))
    rt = knobs.pick("rt", accumulator_tile(feats, x.extent, ot), register_tiles(feats, x.extent, ot))
    o_o, o_i = sch.split(o.loop, [None, ot])
    x_o, x_i = sch.split(x.loop, [None, rt])
    # channel tiles innermost of the outer loops only for an input larger than the weight and than
    # CHANNELS_INNER_MIN_BYTES, else pixels innermost
    data, weight = sch.get(block).reads[:2]
    inner = nbytes(data) > nbytes(weight) and nbytes(data) >= CHANNELS_INNER_MIN_BYTES
    channels_inner = knobs.pick("reg_outer", inner, (True, False))
    outer = [n.loop, y.loop, x_o, o_o] if channels_inner else [n.loop, o_o, y.loop, x_o]
    sch.reorder(*outer, *(r.loop for r in reds), o_i, x_i, oi.loop)
    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, outer[-1], preserve_unit_loops=True)
    _inline_epilogue(sch, wb)
    parallelize_outer(sch, outer, math.prod(a.extent for a in axes), feats, PARALLEL_MIN_MACS, knobs)
    pad_into_tiles(sch, block, knobs, default=channels_inner)
    sch.vectorize(oi.loop)
    sch.unroll(x_i)
    sch.unroll(o_i)
    init = sch.decompose_reduction(block, reds[0].loop)
    for b in (init, wb):
        _try(sch.vectorize, sch.get_loops(b)[-1])
    return sch


def schedule_depthwise_blocked(sch: s_tir.Schedule, ctx: RuleContext) -> s_tir.Schedule | None:
    """Depthwise: per tap, one weight vector times ``rt`` input vectors (the same lanes of ``rt``
    columns) into ``rt`` accumulators; nothing is broadcast, the weight vector is what is reused."""
    block = get_block(sch, DEPTHWISE_NAME)
    axes = block_axes(sch, block) if block is not None else None
    if axes is None or len(axes) != 7:
        return None
    feats, knobs = ctx.feats, ctx.knobs
    x, lanes = axes[3], axes[4]
    rt = knobs.pick("rt", accumulator_tile(feats, x.extent, 1), register_tiles(feats, x.extent, 1))
    outer = math.prod(a.extent for a in axes[:4]) // rt
    plan = TilePlan(vec_axis=4, vec_tile=lanes.extent, reg_axis=3, reg_tile=rt, parallel_extent=outer)
    return sch if apply_contraction(sch, block, feats, plan, knobs) else None

"""Reductions that are not contractions: softmax, layer norm, mean/sum/max over axes, global pooling.

Multi-block normalizations (softmax, layer norm) go to TVM's dlight CPU ``Reduction`` rule: all
blocks under one parallel loop over rows, inner loops vectorized. A lone reduction block gets its
spatial loops fused and parallel, with the reduction loops innermost and serial.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import block_axes, int_extent, is_reduction_block, root_blocks, work
from .features import CPUFeatures, RuleContext
from .tiling import parallelize_outer


def schedule_normalization(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    """Softmax / layer-norm style functions (several reduction and elementwise blocks over rows)."""
    feats = ctx.feats
    from tvm.s_tir.dlight.cpu import Reduction

    sch = s_tir.Schedule(func)
    if sum(1 for b in root_blocks(sch) if is_reduction_block(sch, b)) < 2:
        return None
    new = Reduction().apply(func, feats.target, False)
    if new is None:
        return None
    # The rule parallelizes the leading rows; one row (a [1, 1000] softmax) or a small tensor makes
    # the thread-pool launch cost more than the work (measured: 10 ms against 4 us): generic instead.
    outputs = [b for b in root_blocks(new)] or []
    par = [lp for b in outputs for lp in new.get_loops(b) if new.get(lp).kind == tirx.ForKind.PARALLEL]
    rows = int_extent(new, par[0]) if par else 0
    if not rows or rows < 2 * feats.cores or work(sch, root_blocks(sch)[-1]) < 16384:
        return None
    return new


def schedule_row_reduction(sch: s_tir.Schedule, block, feats: CPUFeatures) -> bool:
    """One reduction block: spatial loops outside (fused, parallel), reduction loops inside."""
    axes = block_axes(sch, block)
    if axes is None or not any(a.reduce for a in axes):
        return False
    spatial = [a for a in axes if not a.reduce]
    reds = [a for a in axes if a.reduce]
    if not spatial:
        return True  # a full reduction to a scalar: nothing worth parallelizing safely
    sch.reorder(*[a.loop for a in spatial], *[a.loop for a in reds])
    total = 1
    for a in axes:
        total *= a.extent
    parallelize_outer(sch, [a.loop for a in spatial], total, feats)
    return True

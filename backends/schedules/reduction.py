"""Reductions that are not contractions: softmax, layer norm, mean/sum/max over axes, global pooling.

Multi-block normalizations (softmax, layer norm) go to TVM's dlight CPU ``Reduction`` rule: all
blocks under one parallel loop over rows, inner loops vectorized. A lone reduction block gets its
spatial loops fused and parallel, with the reduction loops innermost and serial.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import block_axes, is_reduction_block, root_blocks
from .features import CPUFeatures
from .tiling import parallelize_outer


def schedule_normalization(func: tirx.PrimFunc, feats: CPUFeatures) -> s_tir.Schedule | None:
    """Softmax / layer-norm style functions (several reduction and elementwise blocks over rows)."""
    from tvm.s_tir.dlight.cpu import Reduction

    sch = s_tir.Schedule(func)
    if sum(1 for b in root_blocks(sch) if is_reduction_block(sch, b)) < 2:
        return None
    return Reduction().apply(func, feats.target, False)


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

"""Max / average pooling windows (one input read, a reduction over the window).

Windows take the contraction tiling (vector over output width, register tile over channels);
strided windows keep the generic schedule (parallel rows): strided vector loads measured 17x
slower than scalar code for a 3x3/2 max pool. In the blocked layout (NCHW[b]c) the vector is the
channel lanes, whatever the stride, and the window's pad folds into the pool: the padded copy was a
pass of its own over the input (ResNet-50's 3x3/2 max pool: 0.26 -> 0.064 ms).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import main_reduction
from .features import RuleContext
from .tiling import _try, apply_contraction, plan_contraction


def is_pool(sch: s_tir.Schedule, block) -> bool:
    stmt = sch.get(block)
    nred = sum(1 for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return nred >= 1 and len(stmt.reads) == 1 and len(stmt.writes) == 1 and len(stmt.writes[0].region) >= 3


def schedule_pool(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    feats = ctx.feats
    sch = s_tir.Schedule(func)
    block = main_reduction(sch)
    if block is None or not is_pool(sch, block):
        return None
    if len(sch.get(block).writes[0].region) == 5:  # blocked: the pad's branch is per pixel, not per lane
        for producer in sch.get_producers(block):
            _try(sch.compute_inline, producer)
    plan = plan_contraction(sch, block, feats, knobs=ctx.knobs)
    if plan is None or apply_contraction(sch, block, feats, plan, ctx.knobs) is None:
        return None
    return sch

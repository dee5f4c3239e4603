"""conv2d in NCHW (plain, grouped, depthwise, dilated) and conv2d-transpose (a conv over the dilated input).

Vector axis: output width (contiguous in the input for stride 1); register axis: output channels
(the input row is loaded once and feeds ``reg_tile`` channels). Convolutions whose width moves with a
stride other than 1 get the generic fallback (parallel outer loops) for now.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import main_reduction
from .features import CPUFeatures
from .tiling import apply_contraction



def is_conv(sch: s_tir.Schedule, block) -> bool:
    """A reduction block with at least two reduction axes (channels x kernel window) and a 4-D+ output."""
    stmt = sch.get(block)
    nred = sum(1 for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return nred >= 2 and len(stmt.writes) == 1 and len(stmt.writes[0].region) >= 3 and len(stmt.reads) >= 2


def schedule_conv2d(func: tirx.PrimFunc, feats: CPUFeatures) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    block = main_reduction(sch)
    if block is None or not is_conv(sch, block):
        return None
    if apply_contraction(sch, block, feats) is None:
        return None
    return sch

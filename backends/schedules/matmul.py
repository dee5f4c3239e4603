"""matmul / dense / batch_matmul, with either operand transposed.

Vector axis: the output's columns (contiguous in B when B is [K, N]; a B stored [N, K] makes the plan
fail and the generic fallback runs); register axis: output rows (each B vector feeds ``reg_tile`` rows).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import main_reduction
from .features import RuleContext
from .tiling import apply_contraction


def is_matmul(sch: s_tir.Schedule, block) -> bool:
    """One reduction axis, two inputs read, a 2-D+ output: C[..., i, j] += A[..., i, k] * B[..., k, j]."""
    stmt = sch.get(block)
    nred = sum(1 for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return nred == 1 and len(stmt.reads) >= 2 and len(stmt.writes) == 1 and len(stmt.writes[0].region) >= 2


def schedule_matmul(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    feats = ctx.feats
    sch = s_tir.Schedule(func)
    block = main_reduction(sch)
    if block is None or not is_matmul(sch, block):
        return None
    if apply_contraction(sch, block, feats, knobs=ctx.knobs) is None:
        return None
    return sch

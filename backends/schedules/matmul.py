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
    few = _few_static_rows(sch, block)
    if few:  # a static GEMV of 2 to 4 rows: the symbolic path's 4-row nest (2 panels, prefetched)
        from .gemv import schedule_rows

        scheduled = schedule_rows(func, feats, few)
        if scheduled is not None:
            return s_tir.Schedule(scheduled)
    if apply_contraction(sch, block, feats, knobs=ctx.knobs) is None:
        return None
    return sch


def _few_static_rows(sch: s_tir.Schedule, block) -> int:
    """The row count of a packed matmul over 2 to 4 static rows, else 0."""
    from .tiling import PANEL_BLOCK

    stmt = sch.get(block)
    if stmt.name_hint != PANEL_BLOCK or len(stmt.iter_vars) < 4:
        return 0
    rows = stmt.iter_vars[-4].dom.extent
    return int(rows) if isinstance(rows, tirx.IntImm) and 2 <= int(rows) <= 4 else 0

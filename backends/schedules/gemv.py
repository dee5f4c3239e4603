"""One-row packed matmuls (GEMV): a decode step's matmuls, where the whole weight streams once per row.

A packed matmul (``packed_matmul.py``) over a symbolic row count is computed in whole tiles of
``PAD_ROWS`` rows, the row index clamped (``symbolic.py``): at one row, a decode step of a bundle that
serves prefill and decode (``--max seq=N --max past=N``), the 8-row register tile computes the same
row 8 times, with one panel (up to 3 vectors) per tile. A GEMV wants the opposite tile: one row and
several panels, each broadcast of ``x`` feeding ``panels x vectors`` independent accumulators.

``with_one_row_path(func, scheduled, feats)`` versions such a function on its row count: the body
becomes ``if rows == 1: <GEMV loop nest> else: <the tiled loop nest>``. The GEMV nest is a schedule of
the same function (same buffers): the row loop outermost and cut to one iteration (the padding rows
are clamped copies of row 0 that nothing reads), the panels split into register tiles of
``tiling.accumulator_tile`` panels (8 panels x 3 vectors = 24 accumulators on AVX-512) that run
parallel, ``k`` inside, the panel and vector loops unrolled, the epilogue (bias, GELU, residual)
inlined into the write-back, as the static one-row rule does (``tiling.apply_contraction``: a
one-row block's register axis is the panel axis). One library then serves the prompt in one call
and each decode step at the one-row speed.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from .features import CPUFeatures
from .tiling import PANEL_BLOCK, _inline_epilogue, accumulator_tile, panel_vectors, split_init_and_vectorize

log = logging.getLogger(__name__)


def row_count(func: tirx.PrimFunc):
    """The symbolic row count ``m`` of a packed matmul function (its input row index is clamped as
    ``min(r, m - 1)``), or None when ``func`` is not one with a symbolic row count."""
    sch = s_tir.Schedule(func)
    try:
        stmt = sch.get(sch.get_sblock(PANEL_BLOCK))
    except Exception:  # noqa: BLE001 - no such block
        return None
    for read in stmt.reads:
        if len(read.region) < 2:
            continue
        idx = read.region[-2].min
        if isinstance(idx, tirx.Min) and isinstance(idx.b, tirx.Sub) and isinstance(idx.b.b, tirx.IntImm) \
                and int(idx.b.b.value) == 1 and not isinstance(idx.b.a, tirx.IntImm):
            return idx.b.a
    return None


def schedule_one_row(func: tirx.PrimFunc, feats: CPUFeatures, parallel: bool = True) -> tirx.PrimFunc | None:
    """``func`` (a packed matmul, rows padded) scheduled for one row: every loop nest the rows loop
    encloses computes row 0 only once the caller cuts that loop (see ``_cut_rows``); None when the
    block is not the expected packed matmul."""
    from . import _inline_data_movement
    from .symbolic import schedule_block

    sch = s_tir.Schedule(func)
    _inline_data_movement(sch)
    block = sch.get_sblock(PANEL_BLOCK)
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 4:
        return None
    *lead, rows, panels, lanes_loop, k = loops
    nb, width = (sch.get(lp).extent for lp in (panels, lanes_loop))
    if not (isinstance(nb, tirx.IntImm) and isinstance(width, tirx.IntImm)):
        return None
    lanes = feats.lanes(32)
    nvec = panel_vectors(stmt, int(width), lanes)
    if not nvec:
        return None
    tile = accumulator_tile(feats, int(nb), nvec)
    p_o, p_i = sch.split(panels, [None, tile])
    v_o, v_i = sch.split(lanes_loop, [None, lanes]) if nvec > 1 else (None, lanes_loop)
    sch.reorder(rows, *lead, p_o, k, p_i, *([v_o] if v_o is not None else []), v_i)
    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, p_o, preserve_unit_loops=True)
    _inline_epilogue(sch, wb)
    if parallel and int(nb) // tile > 1:
        sch.parallel(p_o)
    sch.vectorize(v_i)
    sch.unroll(p_i)
    if v_o is not None:
        sch.unroll(v_o)
    split_init_and_vectorize(sch, block, k, wb, lanes if v_o is not None else None)
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(other).name_hint not in (PANEL_BLOCK, sch.get(wb).name_hint) and \
                not sch.get(other).name_hint.startswith(PANEL_BLOCK):
            schedule_block(sch, other, feats, parallel)
    return sch.mod["main"]


def _cut_rows(stmt: tirx.Stmt) -> tirx.Stmt | None:
    """The root loop nest with its outermost loop (the padded rows) cut to one iteration."""
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, tirx.IntImm(str(stmt.extent.ty), 1), stmt.kind, stmt.body,
                        stmt.thread_binding, stmt.annotations)
    return None


def with_one_row_path(func: tirx.PrimFunc, scheduled: tirx.PrimFunc, feats: CPUFeatures,
                      parallel: bool = True) -> tirx.PrimFunc:
    """``scheduled`` (``func`` scheduled for any row count) with a GEMV path taken at one row; returned
    unchanged when ``func`` is not a packed matmul over a symbolic row count."""
    m = row_count(func)
    if m is None:
        return scheduled
    try:
        one = schedule_one_row(func, feats, parallel)
    except Exception as e:  # noqa: BLE001 - no one-row path; the tiled schedule serves every row count
        log.debug("one-row schedule failed: %s", e)
        return scheduled
    if one is None:
        return scheduled
    groot, oroot = scheduled.body.block, one.body.block
    cut = _cut_rows(oroot.body)
    if cut is None:
        return scheduled
    body = tirx.IfThenElse(tirx.EQ(m, tirx.IntImm(str(m.ty), 1)), cut, groot.body)
    root = s_tir.SBlock(groot.iter_vars, groot.reads, groot.writes, groot.name_hint, body, groot.init,
                        [*groot.alloc_buffers, *oroot.alloc_buffers], groot.match_buffers, groot.annotations)
    return scheduled.with_body(s_tir.SBlockRealize(scheduled.body.iter_values, scheduled.body.predicate, root))

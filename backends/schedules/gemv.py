"""Packed matmuls over a few rows (GEMV): a decode step's matmuls, where the weight streams once a call.

A packed matmul (``packed_matmul.py``) over a symbolic row count is computed in whole tiles of
``PAD_ROWS`` rows, the row index clamped (``symbolic.py``): at one row, a decode step of a bundle that
serves prefill and decode (``--max seq=N --max past=N``), the 8-row register tile computes the same
row 8 times over one panel (up to 3 vectors) at a time: one stream through the weight, and 8x the
multiply-adds. A GEMV wants the opposite tile: one row and several panels, each broadcast of ``x``
feeding ``panels x vectors`` independent accumulators, several panels streamed at once.

``with_few_row_paths(func, scheduled, feats)`` versions such a function on its row count ``m``: the
body becomes ``if m == 1: <1-row nest> elif m <= 4: <4-row nest> elif m <= 8: <4-row tiles inside
the panels> else: <the tiled nest>``. Each version is a schedule of the same function (same
buffers): for 1 and 4 rows the row tiles' loop outermost and cut to one iteration (the rows past
``m`` are clamped copies of row ``m - 1`` that the write-back skips), the panels split into
register tiles of ``tiling.accumulator_tile`` panels (1 row: 8 panels x 3 vectors = 24 accumulators
on AVX-512; 4 rows: 2 panels) that run parallel, ``k`` inside, the row, panel and vector loops
unrolled, the epilogue (bias, GELU, residual) inlined into the write-back, as the static rule does
for one static row (``tiling.apply_contraction``: a one-row block's register axis is the panel
axis). One library then reads a prompt in one call and runs each decode step at the one-row speed.

A static matmul over 2 to 4 rows (a decoder's first step over a short prompt: Moonshine's 4 tokens)
takes the same 4-row nest (``matmul.py``). With a few rows' multiply-adds per cache line, the hardware
prefetcher keeps too few lines of the weight in flight, so the few-row nests prefetch each panel
``PREFETCH_ROWS`` k steps ahead (``prefetch_panels``): 4 rows x [416, 3360], 16 weights cycled, one
thread: 0.58-0.67 ms one panel a tile, 0.26-0.31 ms two panels prefetched.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from .analysis import with_root_body
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


def schedule_rows(func: tirx.PrimFunc, feats: CPUFeatures, rows: int = 1, parallel: bool = True,
                  tiles_inside: bool = False) -> tirx.PrimFunc | None:
    """``func`` (a packed matmul, rows padded) scheduled for tiles of ``rows`` rows (1, 2 or 4) times
    several panels: the row tiles' loop outermost, so that cutting it (``_cut_rows``) computes the first
    ``rows`` rows only, or (``tiles_inside``) inside the panel tiles' loop, every row tile over the
    panels while they are in cache; None when the block is not the expected packed matmul."""
    from . import _inline_data_movement
    from .symbolic import schedule_block

    sch = s_tir.Schedule(func)
    _inline_data_movement(sch)
    block = sch.get_sblock(PANEL_BLOCK)
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 4:
        return None
    *lead, row_loop, panels, lanes_loop, k = loops
    nb, width = (sch.get(lp).extent for lp in (panels, lanes_loop))
    if not (isinstance(nb, tirx.IntImm) and isinstance(width, tirx.IntImm)):
        return None
    lanes = feats.lanes(32)
    nvec = panel_vectors(stmt, int(width), lanes)
    if not nvec:
        return None
    tile = accumulator_tile(feats, int(nb), nvec * rows)
    r_o, r_i = sch.split(row_loop, [None, rows]) if rows > 1 else (row_loop, None)
    p_o, p_i = sch.split(panels, [None, tile])
    v_o, v_i = sch.split(lanes_loop, [None, lanes]) if nvec > 1 else (None, lanes_loop)
    inner = [lp for lp in (r_i, p_i, v_o) if lp is not None]
    if tiles_inside:
        sch.reorder(*lead, p_o, r_o, k, *inner, v_i)
    else:
        sch.reorder(r_o, *lead, p_o, k, *inner, v_i)
    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, r_o if tiles_inside else p_o, preserve_unit_loops=True)
    _inline_epilogue(sch, wb)
    if parallel and int(nb) // tile > 1:
        sch.parallel(p_o)
    sch.vectorize(v_i)
    for lp in inner:
        sch.unroll(lp)
    split_init_and_vectorize(sch, block, k, wb, lanes if v_o is not None else None)
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(other).name_hint not in (PANEL_BLOCK, sch.get(wb).name_hint) and \
                not sch.get(other).name_hint.startswith(PANEL_BLOCK):
            schedule_block(sch, other, feats, parallel)
    weight = [r.source for r in sch.get(block).reads if len(r.source.shape) == 3
              and [int(d) for d in r.source.shape[::2]] == [int(nb), int(width)]]  # the packed [NB, K, L]
    depth = int(sch.get(k).extent) if isinstance(sch.get(k).extent, tirx.IntImm) else 0
    if len(weight) == 1 and rows > 1 and not tiles_inside and depth % PREFETCH_GROUP == 0:
        # one row streams 8 panels: enough in flight without; the prefetches go in a loop over groups
        # of k steps, outside the one that updates the accumulators (a call in that loop made LLVM
        # store every accumulator after every multiply-add)
        k_o, _ = sch.split(k, [None, PREFETCH_GROUP])
        return prefetch_panels(sch.mod["main"], sch.get(k_o).loop_var, weight[0], sch.get(p_o).loop_var, tile, nvec,
                               lanes)
    return sch.mod["main"]


PREFETCH_ROWS = 32  # k steps ahead (a 3-vector panel: 6 KB) that a few-row tile prefetches each panel's weight
PREFETCH_GROUP = 8  # k steps whose panel rows are prefetched at once, between the accumulating loops


def prefetch_panels(func: tirx.PrimFunc, group_var, weight, panel_var, tile: int, nvec: int, lanes: int) -> tirx.PrimFunc:
    """``func`` with the packed weight ``PREFETCH_ROWS`` k steps ahead prefetched at the top of the loop
    over groups of ``PREFETCH_GROUP`` k steps (``group_var``): one ``llvm.prefetch`` per cache line (a
    vector) of the group's rows of each of the register tile's ``tile`` panels. With a few rows'
    multiply-adds per cache line the hardware prefetcher alone keeps too few lines in flight (4 rows x
    1 panel: 7 GB/s, where the one-row tile's 8 panels stream 11-12 GB/s)."""
    i64 = "int64"
    last = tirx.IntImm(i64, int(weight.shape[1]) - PREFETCH_GROUP)
    first = tirx.min(group_var * tirx.IntImm(i64, PREFETCH_GROUP) + tirx.IntImm(i64, PREFETCH_ROWS), last)
    calls = [tirx.Evaluate(tirx.call_llvm_intrin(
        "void", "llvm.prefetch.p0",
        tirx.address_of(tirx.BufferLoad(weight, [panel_var * tirx.IntImm(i64, tile) + tirx.IntImm(i64, p),
                                                 first + tirx.IntImm(i64, r), tirx.IntImm(i64, v * lanes)])),
        tirx.IntImm("int32", 0), tirx.IntImm("int32", 3), tirx.IntImm("int32", 1)))
        for p in range(tile) for r in range(PREFETCH_GROUP) for v in range(nvec)]

    def visit(stmt):
        if isinstance(stmt, tirx.For):
            if stmt.loop_var.same_as(group_var):
                body = tirx.SeqStmt([*calls, stmt.body])
            else:
                body = visit(stmt.body)
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                            stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([visit(x) for x in stmt.seq])
        return stmt

    return with_root_body(func, visit(func.body.block.body))


def _cut_rows(stmt: tirx.Stmt) -> tirx.Stmt | None:
    """The root loop nest with its outermost loop (the row tiles) cut to one iteration."""
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, tirx.IntImm(str(stmt.extent.ty), 1), stmt.kind,
                        stmt.body, stmt.thread_binding, stmt.annotations)
    return None


# Row counts served by a version of their own: (rows of its register tile, the largest m it serves,
# whether its row tiles loop inside the panel tiles). One row streams the weight through 8 panels at
# once (2.6x the 8-row tile's speed on gen:gpt2's logits matmul, 1 thread); 2 to 4 rows through 2
# panels (1.4-1.5x at 768x3072 and its transpose); 5 to 8 rows in two 4-row tiles over the same 2
# panels, the second reading them from cache (gen:gpt2 prefill of 5 and 8 tokens 10-25% faster).
# More rows keep the tiled nest, whose 8-row tile reads each weight vector once for 8 rows.
ROW_VERSIONS = ((1, 1, False), (4, 4, False), (4, 8, True))


def with_few_row_paths(func: tirx.PrimFunc, scheduled: tirx.PrimFunc, feats: CPUFeatures,
                       parallel: bool = True) -> tirx.PrimFunc:
    """``scheduled`` (``func`` scheduled for any row count) versioned on the row count ``m``:
    ``if m == 1: <1 row> elif m <= 4: <4 rows> elif m <= 8: <2 x 4 rows> else: <scheduled>``;
    returned unchanged when ``func`` is not a packed matmul over a symbolic row count."""
    m = row_count(func)
    if m is None:
        return scheduled
    root = scheduled.body.block
    body, allocs = root.body, list(root.alloc_buffers)
    for rows, largest, inside in reversed(ROW_VERSIONS):
        try:
            version = schedule_rows(func, feats, rows, parallel, inside)
        except Exception as e:  # noqa: BLE001 - no such version; the next one serves these row counts
            log.debug("%d-row schedule failed: %s", rows, e)
            continue
        if version is None:
            continue
        cut = version.body.block.body if inside else _cut_rows(version.body.block.body)
        if cut is None:
            continue
        bound = tirx.IntImm(str(m.ty), largest)
        body = tirx.IfThenElse(tirx.EQ(m, bound) if largest == 1 else tirx.LE(m, bound), cut, body)
        allocs += list(version.body.block.alloc_buffers)
    return with_root_body(scheduled, body, allocs)

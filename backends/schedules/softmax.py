"""Softmax over the last axis with vector-wide partial reductions (CPU, float32).

TVM's softmax reduces each row in one serial chain: every max and every add waits for the previous
one (4 cycles each), so a row of 6625 classes costs ~53,000 cycles for its two reductions whatever
the vector width, and its elementwise loops, split by the lanes with a tail, fall back to scalar
code (PP-OCRv4 rec: 1.6 ms for a 40 x 6625 softmax, against ORT's 0.15). ``softmax_te`` writes the
row as ``C`` full vectors of ``V`` lanes and a tail of ``T < V`` elements:

* ``softmax_pmax [rows, V]``: the lane-wise max over the ``C`` vectors (``V`` independent chains),
  then ``softmax_max``: over the lanes and the tail;
* ``softmax_exp``: ``fast_exp(x - max)`` (``fast_math``), ``softmax_psum`` / ``softmax_sum`` as for
  the max (16 partial sums also round less than one long chain);
* ``softmax_norm``: ``exp * (1 / sum)``.

``schedule_softmax`` (a rule of ``apply_default_schedules``) runs each stage over every row (parallel
when there is work for it; a row of the rows TVM meets stays in L2 between stages), the lane loops
vectorized, and the elementwise loops partitioned into ``C`` full vectors and the tail, so the
vector part carries no bounds check.
"""

from __future__ import annotations

import math

from tvm import s_tir, te, tirx, topi

from graphopt.backends.lowering.nan_minmax import exp_nonfinite

from .analysis import get_block, int_extent
from .features import RuleContext
from .tiling import PARALLEL_MIN_WORK, _try

BLOCKS = ("softmax_pmax", "softmax_max", "softmax_exp", "softmax_psum", "softmax_sum", "softmax_norm")


def softmax_te(x: te.Tensor, lanes: int) -> te.Tensor:
    """Softmax of ``x`` over its last axis, whose length must be at least ``lanes``."""
    *lead, n = (int(d) for d in x.shape)
    c, t = divmod(n, lanes)

    def partial(src, name, reducer):
        rc = te.reduce_axis((0, c), f"{name}_c")
        return te.compute((*lead, lanes), lambda *i: reducer(src[(*i[:-1], rc * lanes + i[-1])], axis=rc), name=name)

    def total(part, src, name, reducer, combine):
        rv = te.reduce_axis((0, lanes), f"{name}_v")
        lane = te.compute(tuple(lead), lambda *i: reducer(part[(*i, rv)], axis=rv), name=name)
        if not t:
            return lane
        rt = te.reduce_axis((0, t), f"{name}_t")
        tail = te.compute(tuple(lead), lambda *i: reducer(src[(*i, c * lanes + rt)], axis=rt), name=f"{name}_tail")
        return te.compute(tuple(lead), lambda *i: combine(lane(*i), tail(*i)), name=f"{name}_all")

    mx = total(partial(x, "softmax_pmax", te.max), x, "softmax_max", te.max, tirx.max)
    delta = te.compute(x.shape, lambda *i: x(*i) - mx(*i[:-1]), name="softmax_delta")
    e = topi.fast_exp(delta)
    e = te.compute(x.shape, lambda *i: exp_nonfinite(delta(*i), e(*i)), name="softmax_exp")  # NaN kept
    s = total(partial(e, "softmax_psum", te.sum), e, "softmax_sum", te.sum, lambda a, b: a + b)
    inv = te.compute(tuple(lead), lambda *i: tirx.const(1.0, x.dtype) / s(*i), name="softmax_inv")
    return te.compute(x.shape, lambda *i: e(*i) * inv(*i[:-1]), name="softmax_norm")


def schedule_softmax(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    blocks = {n: get_block(sch, n) for n in BLOCKS}
    if any(b is None for b in blocks.values()):
        return None
    feats = ctx.feats
    norm = blocks["softmax_norm"]
    # elementwise producers (a scale, a mask, the exp's clamped argument) into their readers
    for name in ("softmax_delta", "T_fast_exp"):
        if (b := get_block(sch, name)) is not None:
            sch.compute_inline(b)
    for b in list(sch.get_producers(blocks["softmax_pmax"])):
        _try(sch.compute_inline, b)
    for b in list(sch.get_consumers(norm)):  # an elementwise op fused after the softmax
        _try(sch.reverse_compute_inline, b)
    norm = get_block(sch, "softmax_norm") or norm
    row_loops, last = sch.get_loops(norm)[:-1], sch.get_loops(norm)[-1]
    if not row_loops:
        return None
    rows = math.prod(int_extent(sch, lp) or 1 for lp in row_loops)
    n = int_extent(sch, last) or 0
    lanes = int_extent(sch, sch.get_loops(blocks["softmax_pmax"])[-2]) or feats.lanes(32)
    parallel = rows >= 2 * feats.cores and rows * n >= PARALLEL_MIN_WORK // 4
    for name in ("softmax_pmax", "softmax_psum"):
        _vector_partial(sch, get_block(sch, name), parallel)
    for name in ("softmax_exp", "softmax_norm"):
        b = get_block(sch, name)
        _rows(sch, sch.get_loops(b)[:-1], parallel)
        _split_vector(sch, sch.get_loops(b)[-1], n, lanes)
    # the per-row scalars (16 lanes and the tail to one value) stay serial: a thread-pool launch each
    # would cost more than their work
    return sch


def _rows(sch: s_tir.Schedule, loops: list, parallel: bool):
    """The row loops fused into one, parallel if ``parallel``."""
    row = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if parallel:
        sch.parallel(row)
    return row


def _vector_partial(sch: s_tir.Schedule, block, parallel: bool) -> None:
    """``[row, lane]`` over ``c`` vectors: ``c`` outside, the lanes vectorized, the init split off."""
    *rows, lane, rc = sch.get_loops(block)
    _rows(sch, rows, parallel)
    sch.reorder(rc, lane)
    sch.vectorize(lane)  # while the block still has its init (a reduction block), as tiling.py does
    init = sch.decompose_reduction(block, rc)
    _try(sch.vectorize, sch.get_loops(init)[-1])


def _split_vector(sch: s_tir.Schedule, loop, n: int, lanes: int) -> None:
    """The row's ``n`` elements as vectors; a tail of ``n % lanes`` partitioned off (its bounds check
    stays there, so the full vectors run without one)."""
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    if n % lanes:
        sch.loop_partition(outer, [n // lanes, None])

"""Reductions that are not contractions: softmax, layer norm, mean/sum/max over axes, global pooling.

Normalizations (softmax, layer norm, and one row reduction with its elementwise epilogue: a layer
norm written out, ``mean -> subtract`` and ``mean of squares -> divide by sqrt``) go to TVM's dlight CPU
``Reduction`` rule: all blocks under one parallel loop over rows, inner loops vectorized. Its row
reductions stay one serial chain of adds (4 cycles each); ``_vector_lanes`` turns each into 16
partial sums, vectorized, then one sum over the lanes (ViT-S's written-out layer norm, 257 x 384, 1
thread: ``mean -> subtract`` 58 -> 10 us, ``mean -> sqrt -> divide -> scale`` 71 -> 22 us; the partial
sums of a row in one cache line, under the row loop; the epilogue's full-size elementwise blocks
computed in their readers). A lone reduction block gets its spatial loops fused and parallel, with the
reduction loops innermost and serial.
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
    reductions = [b for b in root_blocks(sch) if is_reduction_block(sch, b)]
    if not reductions or (len(reductions) == 1 and not _row_reduction(sch, reductions[0])):
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
    names = [sch.get(b).name_hint for b in reductions]
    if any(_recomputed(new, new.get_sblock(n)) for n in names):
        return None
    for name in names:
        _vector_lanes(new, name)
    _inline_full_size(new, sch)
    return new


def _inline_full_size(new: s_tir.Schedule, sch: s_tir.Schedule) -> None:
    """Elementwise blocks as large as the output computed in their readers (dlight writes each to a
    tensor of its own: a divide, then a multiply, then the add of a layer norm's scale and bias)."""
    blocks = root_blocks(sch)
    out_shape = [int(d) for d in sch.get(blocks[-1]).writes[0].source.shape]
    for b in blocks[:-1]:
        stmt = sch.get(b)
        if is_reduction_block(sch, b) or [int(d) for d in stmt.writes[0].source.shape] != out_shape:
            continue
        try:
            new.compute_inline(new.get_sblock(stmt.name_hint))
        except Exception:  # noqa: BLE001 - a block that cannot be inlined stays
            continue


def _recomputed(sch: s_tir.Schedule, block) -> bool:
    """Whether the loops around ``block`` run it at least twice as often as it has iterations (a split
    of its reduction with a tail runs it less than twice): a reduction the rule put under the loops of
    an epilogue that is not row by row (Moonshine's mean over all 519,584 values of a [1, 1, 519584]
    tensor, then a subtract: computed again for every element)."""
    runs = 1
    for lp in sch.get_loops(block):
        runs *= int_extent(sch, lp) or 0
    return runs >= 2 * work(sch, block)


def _row_reduction(sch: s_tir.Schedule, block) -> bool:
    """A reduction over the last axis of one buffer (a sum or max of a row; not a contraction of two),
    with elementwise blocks after it: the single reduction the normalization rule takes."""
    stmt = sch.get(block)
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    if len(reduce) != 1 or len(reads) != 1 or len(root_blocks(sch)) < 2:
        return False
    last = reads[0].region[-1].min
    return isinstance(last, tirx.Var) and last.same_as(reduce[0].var) or str(last) == str(reduce[0].var)


def _vector_lanes(sch: s_tir.Schedule, name: str) -> None:
    """The reduction block ``name`` (its innermost loop a split of the reduction, as dlight leaves it) as
    lane-wise partial results, vectorized, then one reduction over the lanes; left as it is where a
    step does not apply (a tail, a reduction split otherwise)."""
    try:
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        lanes = int_extent(sch, loops[-1])
        extent = [iv.dom.extent for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if lanes not in (4, 8, 16) or len(extent) != 1 or int(extent[0]) % lanes:  # no tail (its predicate)
            return
        # the lanes innermost (each row's 16 partial sums in one cache line, not 16 rows apart: threads
        # on neighbouring rows wrote the same lines), computed under the reduction's row loop
        partial = sch.rfactor(loops[-1], len(sch.get(block).writes[0].source.shape))
        sch.compute_at(partial, sch.get_loops(block)[0])
        *_, lane, k = sch.get_loops(partial)  # compute_at leaves the lanes outside the reduction
        sch.reorder(k, lane)
        sch.vectorize(lane)  # while the block still has its init, as softmax.py does
        init = sch.decompose_reduction(partial, k)
        sch.vectorize(sch.get_loops(init)[-1])
    except Exception:  # noqa: BLE001 - the serial chain stays
        return


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

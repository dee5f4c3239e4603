"""Elementwise, broadcast, pad, transpose, concat, resize: parallel outer loops, vectorized inner loop."""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import int_extent, is_spatial_block
from .elementwise import fold_into_consumers, has_branch, reads_in_order, vector_split, widest_bits
from .features import CPUFeatures
from .tiling import parallelize_outer
from .transpose import schedule_transpose


def schedule_injective(sch: s_tir.Schedule, block, feats: CPUFeatures) -> bool:
    """Schedule one spatial block that sits directly under the root; False if it does not apply."""
    if not is_spatial_block(sch, block):
        return False
    loops = sch.get_loops(block)
    exts = [int_extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in exts):
        return False
    if any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
        return False  # already scheduled (e.g. computed inside another block's tile)
    total = 1
    for e in exts:
        total *= e
    if total == 0:
        return True  # no elements (a zero-length state): nothing to run, and a 0-lane vector fails to build
    if fold_into_consumers(sch, block):  # a link of an elementwise chain: computed in its consumer
        return True
    stmt = sch.get(block)
    lanes = feats.lanes(widest_bits(stmt))
    # a layout change (transpose, a reshape folded into the read) keeps its loops: fused, its vectors
    # would be gathers with a division a lane; short vectors of its innermost dim are copies
    branch = has_branch(stmt)
    fusable = 0 if branch else max((k for k in range(1, len(exts) + 1) if reads_in_order(stmt, k)), default=0)
    if not branch and not fusable and schedule_transpose(sch, block, feats, loops, exts):
        return True  # the innermost dim moves: square tiles transposed in L1
    in_order = branch or fusable == len(exts)
    k, vt = vector_split(exts, lanes, max(fusable, 1))  # elementwise.py: tail-free vectors
    if k > 1:
        loops = [*loops[:-k], sch.fuse(*loops[-k:])]
    outer = list(loops)
    if vt >= (4 if not in_order else max(2, lanes // 2)) and vt & (vt - 1) == 0:
        if vt < int_extent(sch, loops[-1]):
            o, v = sch.split(loops[-1], [None, vt])
            outer = [*loops[:-1], o]
        else:
            v, outer = loops[-1], list(loops[:-1])
        try:
            sch.vectorize(v)
        except Exception:  # noqa: BLE001 - e.g. a data-dependent index: stays scalar
            pass
    if outer:
        parallelize_outer(sch, outer, total, feats)
    return True

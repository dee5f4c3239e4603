"""Elementwise, broadcast, pad, transpose, concat, resize: parallel outer loops, vectorized inner loop."""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import int_extent, is_spatial_block
from .features import CPUFeatures
from .tiling import parallelize_outer


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
    stmt = sch.get(block)
    lanes = feats.lanes(stmt.writes[0].source.dtype.bits if stmt.writes else 32)
    outer = list(loops)
    inner_ext = exts[-1]
    if inner_ext >= 2:
        if inner_ext > lanes and inner_ext % lanes == 0:
            o, v = sch.split(loops[-1], [None, lanes])
            outer = [*loops[:-1], o]
        elif inner_ext <= 4 * lanes:
            v = loops[-1]
            outer = list(loops[:-1])
        else:
            o, v = sch.split(loops[-1], [None, lanes])  # a tail: predicated, still mostly vector
            outer = [*loops[:-1], o]
        try:
            sch.vectorize(v)
        except Exception:  # noqa: BLE001 - e.g. a data-dependent index: stays scalar
            pass
    if outer:
        parallelize_outer(sch, outer, total, feats)
    return True

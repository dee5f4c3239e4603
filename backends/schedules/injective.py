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
    if total == 0:
        return True  # no elements (a zero-length state): nothing to run, and a 0-lane vector fails to build
    stmt = sch.get(block)
    lanes = feats.lanes(stmt.writes[0].source.dtype.bits if stmt.writes else 32)
    outer = list(loops)
    inner_ext = exts[-1]
    # a divisor of the inner extent near the lane count: no tail, no predicates (a predicated tail
    # with a padding if_then_else measured 2x slower than scalar code)
    # with at most one vector of lanes, or exactly two (odd widths like 19 lanes legalize badly)
    vt = max((d for d in range(1, min(inner_ext, lanes) + 1) if inner_ext % d == 0), default=1)
    if inner_ext % (2 * lanes) == 0:
        vt = 2 * lanes
    # odd widths (13, 19, 26 lanes) legalize into slow pieces: LLVM's own loop vectorizer, which
    # keeps a scalar remainder, does better on those
    if vt >= max(2, lanes // 2) and vt & (vt - 1) == 0:
        if vt < inner_ext:
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

"""A transpose that moves the innermost dim (``K [S, H, D] -> Kt [H, D, S]``) in square tiles (CPU).

The output's innermost dim walks the input with a stride, so a vector of output elements is a
gather of one element per input row; the input's innermost dim (contiguous) goes to another output
dim. ``schedule_transpose`` tiles both by one vector width: a ``T x T`` tile is read into a local
buffer by input rows (whole vectors), then written by output rows, the transposition done in L1
(BERT-base's key transposes, 128 x 12 x 64, one thread: 101 -> 49 us, the time of a plain copy).
Only a pure copy of static shape whose two dims are whole tiles takes it; anything else keeps the
injective schedule.
"""

from __future__ import annotations

import math

from tvm import s_tir

from .analysis import coefficient, uses
from .features import CPUFeatures
from .tiling import parallelize_outer


def _transposed_axis(stmt) -> int | None:
    """The output dim that the input's innermost (contiguous) index follows, when it is not the
    output's innermost dim and the output's innermost dim is not in that index; else None."""
    if len(stmt.reads) != 1 or len(stmt.writes) != 1:
        return None
    body = stmt.body
    if type(body).__name__ not in ("BufferStore", "TensorStore") or type(body.value).__name__ not in (
            "BufferLoad", "TensorLoad"):
        return None  # not a pure copy
    ivs = [iv.var for iv in stmt.iter_vars]
    last_in = stmt.reads[0].region[-1].min
    if len(ivs) < 2 or uses(last_in, ivs[-1]):
        return None
    return next((i for i, v in enumerate(ivs[:-1]) if coefficient(last_in, v) == 1), None)


def schedule_transpose(sch: s_tir.Schedule, block, feats: CPUFeatures, loops: list, exts: list[int]) -> bool:
    """Tile the transposed pair of dims (see the module docstring); False if the block is not such a copy."""
    stmt = sch.get(block)
    p = _transposed_axis(stmt)
    tile = feats.lanes(stmt.writes[0].source.dtype.bits)
    if p is None or tile < 4 or exts[-1] % tile or exts[p] % tile:
        return False
    s_o, s_i = sch.split(loops[-1], [None, tile])
    d_o, d_i = sch.split(loops[p], [None, tile])
    others = [lp for i, lp in enumerate(loops[:-1]) if i != p]
    sch.reorder(*others, d_o, s_o, d_i, s_i)
    local = sch.cache_read(block, 0, "local")
    sch.compute_at(local, s_o)
    sch.vectorize(sch.get_loops(local)[-1])  # the input's contiguous dim: whole vectors
    sch.vectorize(s_i)  # the output's: whole vectors of the tile's columns
    parallelize_outer(sch, [*others, d_o, s_o], math.prod(exts), feats)
    return True

"""Register tiling for a contraction block (conv, matmul, pooling): the engine the op rules share.

The output's innermost axis ``v`` becomes the vector axis (contiguous stores, contiguous or broadcast
loads); a second spatial axis ``u`` that the vector-loaded inputs do not depend on is the register
axis, so each vector load feeds ``u_i`` fused multiply-adds into ``u_i x v_i/lanes`` accumulators that
stay in registers. Loop order: spatial outer tiles (fused and parallel), reduction loops, ``u_i``
(unrolled), ``v_i`` (vectorized). The accumulator is a ``local`` cache written back once per tile; the
elementwise epilogue (bias, relu, residual add) is inlined into that write-back.
"""

from __future__ import annotations

import dataclasses
import math

from tvm import s_tir, tirx

from .analysis import (Axis, block_axes, buffer_uses, coefficient, consumers, is_copy, is_data_movement, is_kept,
                       nbytes)
from .features import CPUFeatures, Knobs


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The decisions for one contraction block (kept for tests and ``--profile`` reports)."""

    vec_axis: int  # index into the block's axes
    vec_tile: int
    reg_axis: int | None
    reg_tile: int
    parallel_extent: int


PANEL_BLOCK = "packed_matmul"  # a packed matmul's product block (packed_matmul.py)
PANEL_VECTORS = 3  # the most vectors one register tile spans


def panel_vectors(stmt, extent: int, lanes: int) -> int:
    """Vectors of a packed matmul's panel (its vector axis, 1 to ``PANEL_VECTORS`` vectors wide), which
    one register tile spans whole; 0 for any other block."""
    if stmt.name_hint != PANEL_BLOCK or extent % lanes or not lanes <= extent <= PANEL_VECTORS * lanes:
        return 0
    return extent // lanes


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vector_tile(extent: int, lanes: int) -> int:
    """The divisor of ``extent`` that fills vector lanes best.

    At most one vector, or exactly two (LLVM splits a power-of-two vector cleanly; a 28-lane vector
    it legalizes into slow masked pieces).
    """
    cands = [d for d in divisors(extent) if d <= lanes or d == 2 * lanes]
    return max(cands, key=lambda d: (d / (math.ceil(d / lanes) * lanes), d))


def register_tile(extent: int, limit: int) -> int:
    """The largest divisor of ``extent`` not above ``limit``."""
    return max(d for d in divisors(extent) if d <= max(1, limit))


def register_tiles(feats: CPUFeatures, extent: int, nvec: int) -> list[int]:
    """Every register tile a search may try: divisors of ``extent`` whose accumulators, the ``nvec``
    loaded vectors and one broadcast fit the vector registers."""
    limit = max(1, (feats.vector_registers - nvec - 1) // nvec)
    return [d for d in divisors(extent) if d <= limit]


def accumulator_tile(feats: CPUFeatures, extent: int, nvec: int) -> int:
    """Register tile over an axis of ``extent`` whose every step feeds ``nvec`` vector accumulators.

    The largest divisor within ``max_accumulators``; when the divisors leave that tile under half
    full (13 or 7 columns: a tile of 1), the tile may fill every register the operands do not need
    (``nvec`` loaded vectors and one broadcast): 13 columns on AVX2 then take 13 accumulators, not 1.
    """
    limit = max(1, feats.max_accumulators // nvec)
    tile = register_tile(extent, limit)
    if 2 * tile < limit:
        tile = max(register_tiles(feats, extent, nvec))
    return tile


def plan_contraction(sch: s_tir.Schedule, block, feats: CPUFeatures, axes: list[Axis] | None = None,
                     knobs: Knobs | None = None) -> TilePlan | None:
    """Choose vector and register axes for a reduction block; None when it is not a contraction.

    Every input that moves with the vector axis must move contiguously (strided vector loads
    measured 17x slower than scalar code for a 3x3/2 max pool).
    """
    axes = axes or block_axes(sch, block)
    if axes is None:
        return None
    stmt = sch.get(block)
    if len(stmt.writes) != 1 or not stmt.writes[0].region:
        return None
    spatial = [i for i, a in enumerate(axes) if not a.reduce]
    if not spatial or len(spatial) == len(axes):
        return None
    last = stmt.writes[0].region[-1].min
    vec = next((i for i in spatial if coefficient(last, axes[i].var) == 1), None)
    if vec is None:
        return None
    vvar = axes[vec].var
    vec_reads = [r for r in stmt.reads if buffer_uses(r, vvar)]
    # Every input that moves with v must move contiguously in its innermost index.
    if any(coefficient(r.region[-1].min, vvar) != 1 for r in vec_reads):
        return None
    knobs = knobs or Knobs()
    lanes = feats.lanes(stmt.writes[0].source.dtype.bits)
    panel = panel_vectors(stmt, axes[vec].extent, lanes)
    vt = panel * lanes if panel else vector_tile(axes[vec].extent, lanes)
    vt = knobs.pick("vt", vt, [d for d in (lanes, 2 * lanes) if axes[vec].extent % d == 0])
    nvec = math.ceil(vt / lanes)
    cands = [i for i in spatial if i != vec and axes[i].extent > 1]
    reg = None
    if cands:
        # prefer an axis the vector loads do not depend on (reuse: conv channels, matmul rows), by
        # extent; without one (depthwise) the innermost candidate (neighbouring rows share cache lines)
        reuse = [i for i in cands if not any(buffer_uses(r, axes[i].var) for r in vec_reads)]
        reg = max(reuse, key=lambda i: (axes[i].extent, i)) if reuse else max(cands)
    rt = 1
    if reg is not None:
        rt = knobs.pick("rt", accumulator_tile(feats, axes[reg].extent, nvec),
                        register_tiles(feats, axes[reg].extent, nvec))
    outer = 1
    for i in spatial:
        outer *= axes[i].extent // (vt if i == vec else rt if i == reg else 1)
    return TilePlan(vec, vt, reg, rt, outer)


def apply_contraction(sch: s_tir.Schedule, block, feats: CPUFeatures, plan: TilePlan | None = None,
                      knobs: Knobs | None = None) -> TilePlan | None:
    """Tile ``block`` per ``plan`` (or a fresh plan); returns the plan, or None if it did not apply."""
    knobs = knobs or Knobs()
    axes = block_axes(sch, block)
    plan = plan or plan_contraction(sch, block, feats, axes, knobs)
    if axes is None or plan is None:
        return None
    outer_s, reds, inner = [], [], []
    for i, a in enumerate(axes):
        if a.reduce:
            reds.append(a.loop)
        elif i == plan.vec_axis:
            o, v_i = sch.split(a.loop, [None, plan.vec_tile])
            outer_s.append(o)
            lanes = feats.lanes(sch.get(block).writes[0].source.dtype.bits)
        elif i == plan.reg_axis:
            o, u_i = sch.split(a.loop, [None, plan.reg_tile])
            outer_s.append(o)
        else:
            outer_s.append(a.loop)
    v_o = None
    if plan.vec_tile > 2 * lanes and plan.vec_tile % lanes == 0:  # a 3-vector panel: 3 vectors unrolled
        v_o, v_i = sch.split(v_i, [None, lanes])
    inner = ([u_i] if plan.reg_axis is not None else []) + ([v_o] if v_o is not None else []) + [v_i]
    panel = panel_vectors(sch.get(block), plan.vec_tile, lanes) > 0
    # a packed weight's panels outermost: a panel stays in cache across the row tiles, and rows that
    # do not fit L2 are taken in K blocks that do (``k_block``)
    if plan.reg_axis is not None and knobs.pick(
            "reg_outer", panel or _streams_more_than_it_reuses(sch.get(block), axes[plan.reg_axis].var),
            (True, False)):
        # the register axis's tile loop innermost of the outer loops: the data the vector loads read
        # (a conv's input window) stays in L1 across every tile of it, the smaller operand comes from L2
        reg_o = outer_s[[i for i, a in enumerate(axes) if not a.reduce].index(plan.reg_axis)]
        outer_s = [lp for lp in outer_s if lp != reg_o] + [reg_o]
    kc = None
    if panel:
        kc = knobs.pick("kc", k_block(sch.get(block), axes, plan, feats, knobs.taken.get("reg_outer", False)))
    if kc:  # rows x K larger than L2: the K loop in blocks outside the row tiles, the accumulator per panel
        ko, ki = sch.split(reds[0], [None, kc])
        sch.reorder(*outer_s[:-1], ko, outer_s[-1], ki, *reds[1:], *inner)
        tile_loop, par_loops, reds = outer_s[-2], outer_s[:-1], [ko, ki, *reds[1:]]
    else:
        sch.reorder(*outer_s, *reds, *inner)
        tile_loop, par_loops = outer_s[-1], outer_s

    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, tile_loop, preserve_unit_loops=True)
    _inline_epilogue(sch, wb)
    parallelize_outer(sch, par_loops, _parallel_work(sch.get(block), math.prod(a.extent for a in axes)), feats,
                      PARALLEL_MIN_MACS, knobs)
    pad_into_tiles(sch, block, knobs, default=knobs.taken.get("reg_outer", False))

    # Vectorize/unroll while the block still has its init (a reduction block), then split the init off.
    sch.vectorize(v_i)
    if plan.reg_axis is not None:
        sch.unroll(u_i)
    if v_o is not None:
        sch.unroll(v_o)
    split_init_and_vectorize(sch, block, reds[0], wb, lanes if v_o is not None else None)
    return plan


def k_block(stmt, axes: list[Axis], plan: TilePlan, feats: CPUFeatures, reg_outer: bool) -> int | None:
    """The K block of a packed matmul whose rows (the operand that moves with the register axis) and one
    weight panel hold more than L2: the largest divisor of K (at least 64, below K) whose rows x
    K-block slice takes at most 3/4 of L2, so the slice stays in L2 across every panel. None when they
    fit, or the row tiles are not innermost (``reg_outer``). 1024 x 3072 by 3072 x 768 on one core:
    78 -> 131 GFLOP/s (K in 512s); 1024 x 768 by 768 x 3072: 74 -> 125 (384s); 128 x 3072 by
    3072 x 768 (1.5 MB of rows and a 0.6 MB panel, 8 weights cycled): 112 -> 117 GFLOP/s on one core,
    223 -> 231 on two (K in 1536s)."""
    reds = [a for a in axes if a.reduce]
    if not reg_outer or plan.reg_axis is None or len(reds) != 1:
        return None
    k = int(reds[0].extent)
    reg, vec = axes[plan.reg_axis].var, axes[plan.vec_axis].var
    # the activation rows: read with the register axis, not with the vector axis (a one-row GEMV's
    # register axis is the panels: its weight moves with both, and its row is no reason to block K)
    rows = sum(nbytes(r) for r in stmt.reads if buffer_uses(r, reg) and not buffer_uses(r, vec))
    panel = k * plan.vec_tile * stmt.writes[0].source.dtype.bits // 8
    if rows + panel <= feats.l2:
        return None
    limit = (3 * feats.l2 // 4) // max(1, rows // k)
    cands = [d for d in divisors(k) if 64 <= d <= limit and d < k]
    return max(cands) if cands else None


def split_init_and_vectorize(sch: s_tir.Schedule, block, reduction_loop, write_back,
                             lanes: int | None = None) -> None:
    """Split the reduction's init off at ``reduction_loop``, then vectorize the innermost loop of the
    init and of the write-back block where it is not already (in vectors of ``lanes`` when given: a
    48-lane vector LLVM legalizes in masked pieces)."""
    init = sch.decompose_reduction(block, reduction_loop)
    for b in (init, write_back):
        loops = sch.get_loops(b)
        if sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED:
            continue
        last = loops[-1]
        extent = sch.get(last).extent
        if lanes and isinstance(extent, tirx.IntImm) and int(extent) > lanes and int(extent) % lanes == 0:
            outer, last = sch.split(last, [None, lanes])
            _try(sch.unroll, outer)
        _try(sch.vectorize, last)


def pad_into_tiles(sch: s_tir.Schedule, block, knobs: Knobs, default: bool) -> None:
    """Pad the input per outer tile, where the tile reads it, instead of in a pass of its own.

    The padded copy of a large input is written and read back through memory (PP-OCRv4 det's 3x3
    conv 96->24 on 160x160 pads 10 MB); computed under the outer loop, each tile pads the rows it
    reads while they are in cache (19.4 -> 15.1 ms on 2 loaded cores). Tiles that share rows pad
    them again, so it is the default only when the channel tiles are innermost of the outer loops
    (``reg_outer``: one tile loop covers every output channel of its rows).
    """
    pads = [p for p in sch.get_producers(block)
            if is_data_movement(sch, p) and not is_copy(sch, p) and not is_kept(sch, p)]
    if len(pads) != 1 or not knobs.pick("pad_at_tile", default, (False, True)):
        return
    _try(sch.compute_at, pads[0], sch.get_loops(block)[0], True)


def _streams_more_than_it_reuses(stmt, reg_var) -> bool:
    """True when the inputs that do not move with the register axis (a conv's activations) hold more
    bytes than those that do (its weights). Looping over the register tiles outside the other spatial
    loops then re-reads the larger operand once per tile: PP-OCRv4 det's 3x3 conv 96->24 on 160x160
    read its 10 MB input 4 times from memory (33 GFLOP/s; 107 on 80x80, whose input stays in cache)."""

    moving = sum(nbytes(r) for r in stmt.reads if buffer_uses(r, reg_var))
    other = sum(nbytes(r) for r in stmt.reads if not buffer_uses(r, reg_var))
    return other > moving


def _try(prim, *args) -> bool:
    try:
        prim(*args)
        return True
    except Exception:  # noqa: BLE001 - a primitive that does not apply here is skipped
        return False


def _downstream(sch: s_tir.Schedule, block) -> list:
    """Every block that reads, directly or not, what ``block`` writes."""
    seen, order, todo = set(), [], list(consumers(sch, block))
    while todo:
        b = todo.pop(0)
        name = sch.get(b).name_hint
        if name not in seen:
            seen.add(name)
            order.append(b)
            todo.extend(consumers(sch, b))
    return order


def _inline_epilogue(sch: s_tir.Schedule, wb) -> None:
    """Fold elementwise consumers (bias, activation, residual add) into the write-back block.

    An activation that uses its input twice (HardSwish: x * hardsigmoid(x)) leaves the write-back
    two consumers; the blocks between it and the output are inlined into their own consumers first,
    so that one expression reads the write-back and folds into it (PP-OCRv4 det's 1x1 conv on 320x320
    made seven passes over its 13 MB output).
    """
    while any(_try(sch.compute_inline, b) for b in _downstream(sch, wb)):
        pass  # an intermediate elementwise result went into its consumers; outputs and reductions stay
    while True:
        cons = consumers(sch, wb)
        if len(cons) != 1:
            return
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:  # noqa: BLE001 - not inlinable (broadcast, reduction): leave it to its own rule
            return


PARALLEL_MIN_WORK = 1 << 18  # elements of an injective / reduction nest below which it stays serial
PARALLEL_MIN_MACS = 1 << 22  # multiply-adds of a contraction below which it stays serial
PARALLEL_MIN_BYTES = 1 << 21  # bytes a contraction reads above which it runs parallel regardless


def _parallel_work(stmt, macs: int) -> int:
    """The work ``parallelize_outer`` weighs: multiply-adds, or PARALLEL_MIN_MACS when the block
    streams more than PARALLEL_MIN_BYTES. A GEMV is bound by memory, not by its multiply-adds:
    ResNet-50's classifier (2048x1000, 8 MB of weights, 2M MACs) ran serial in 2.9 ms, on two
    cores in 1.8."""
    read = sum(nbytes(r) for r in stmt.reads)
    return max(macs, PARALLEL_MIN_MACS) if read >= PARALLEL_MIN_BYTES else macs


PARALLEL_CHUNKS = (0, 1, 4, 16)  # parallel iterations per core a search may try (0: serial)


def parallelize_outer(sch: s_tir.Schedule, loops: list, total: int, feats: CPUFeatures,
                      min_work: int = PARALLEL_MIN_WORK, knobs: Knobs | None = None) -> None:
    """Fuse the leading loops into one parallel loop with enough iterations for every core.

    Small nests stay serial: waking the thread pool costs microseconds, and on a loaded machine a
    descheduled worker stalls the barrier for milliseconds (PP-OCR cls, ~30 parallel kernels of
    1-3M MACs: median 11.9 ms, min 0.96 ms on 2 threads), more than a ~100 us kernel is worth.
    """
    if feats.cores <= 1 or not loops:
        return
    chunks = 0 if total < min_work else 4
    if knobs is not None:
        chunks = knobs.pick("parallel", chunks, PARALLEL_CHUNKS)
    if chunks == 0:
        return
    from .analysis import int_extent

    prefix, n = [], 1
    for lp in loops:
        prefix.append(lp)
        n *= int_extent(sch, lp) or 1
        if n >= chunks * feats.cores:
            break
    if n < 2:
        return
    fused = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
    sch.parallel(fused)

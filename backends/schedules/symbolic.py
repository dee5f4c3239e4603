"""Schedules for PrimFuncs with a symbolic extent (a sequence length left symbolic, ``--max seq=N``).

graphopt's CPU rules plan tiles from static extents (divisors, work estimates) and skip a function
whose loops are symbolic, which would then run as serial scalar loops. This module serves those
functions with rules that need no extent to be known; splits of a symbolic loop are predicated (the
last tile is partial), so one schedule is correct for every value up to the bound:

* contractions (matmul, batch matmul, attention's QK^T and PV): the output's innermost axis
  vectorized (``lanes`` wide), a second output axis register-tiled (``REG_TILE`` rows, unrolled),
  reduction loops between the outer tiles and the register tile, an accumulator in ``local`` memory
  written back once per tile with the elementwise epilogue (bias, GELU, residual add) inlined into it,
  the outer tile loops fused and parallel (the same plan as ``tiling.apply_contraction``);
* functions with several reductions over rows: over a symbolic row (softmax of attention scores),
  the elementwise stages inlined into the reductions and the output, rows parallel; over a static
  row (layer norm), TVM's dlight CPU ``Reduction`` rule;
* every other block: loops fused, split into vectors, the outer part parallel (elementwise, gathers,
  transposes), or spatial loops parallel outside serial reduction loops (row reductions).

``schedule_symbolic(mod, spec)`` schedules only the functions with a symbolic extent and marks them
scheduled, so ``apply_default_schedules`` keeps its static rules for the rest (the fast path).
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from .analysis import (buffer_uses, coefficient, is_reduction_block, is_scheduled, is_spatial_block, root_blocks,
                       with_functions, with_root_body)
from .features import CPUFeatures, features_of

log = logging.getLogger(__name__)

PARALLEL_MIN = 1 << 18  # iterations of a function's largest nest, at the dims' bounds, below which it stays serial
REG_TILE = 8  # rows of a contraction tile: each vector load of the right operand feeds this many FMAs


def has_symbolic_extent(func: tirx.PrimFunc) -> bool:
    """True when a loop of ``func`` has an extent that is not a constant."""
    sch = s_tir.Schedule(func)
    try:
        blocks = root_blocks(sch)
    except Exception:  # noqa: BLE001 - no root block: hand-written TIR (cumsum), scheduled as written
        return False
    return any(not isinstance(sch.get(lp).extent, tirx.IntImm) for b in blocks for lp in sch.get_loops(b))


def _axes(sch: s_tir.Schedule, block):
    """[(iter var, loop, static extent or None, is reduction)] when each loop binds one iterator in order."""
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    realize = get_sblockrealize(sch, block)
    loops, stmt = sch.get_loops(block), sch.get(block)
    if len(loops) != len(stmt.iter_vars):
        return None
    out = []
    for loop, iv, value in zip(loops, stmt.iter_vars, realize.iter_values):
        lp = sch.get(loop)
        if not isinstance(value, tirx.Var) or not value.same_as(lp.loop_var):
            return None
        if iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce):
            return None
        ext = lp.extent
        out.append((iv.var, loop, int(ext) if isinstance(ext, tirx.IntImm) else ext,
                    iv.iter_type == tirx.IterVar.CommReduce))
    return out


def _tile(extent, tile: int) -> int | None:
    """The tile to split an axis by without a predicate: for a static extent the largest divisor up
    to ``tile``; for a symbolic one ``tile`` when it provably divides it (rows padded to a whole tile,
    ``packed_matmul.py``), else None (a split would leave a partial tile and a branch in the kernel)."""
    import tvm

    if isinstance(extent, int):
        return max(d for d in range(1, min(tile, extent) + 1) if extent % d == 0)
    return tile if tvm.sym.Analyzer().can_prove(tirx.floormod(extent, tile) == 0) else None


def work_at_bound(sch: s_tir.Schedule, bounds: dict[str, int]) -> int:
    """Iterations of the largest block nest (multiply-adds of a contraction) with every symbolic dim
    at its bound (unbounded ones counted as 1). Small nests stay serial, as in the static rules: a
    parallel launch costs more than a small kernel, and far more on a loaded machine."""
    import tvm

    ana = tvm.sym.Analyzer()
    best = 0
    for b in root_blocks(sch):
        n = 1
        for iv in sch.get(b).iter_vars:
            ext = iv.dom.extent
            for v in tirx.analysis.undefined_vars(ext, []):
                ana.bind(v, tvm.ir.Range(1, bounds.get(v.name, 1) + 1))
            n *= max(1, int(ana.const_int_bound(ext).max_value))
        best = max(best, n)
    return best


def _split(sch, loop, extent, tile: int):
    """(outer, inner) loops of ``loop`` split by ``tile``; a tile the extent does not need is not split."""
    if isinstance(extent, int) and extent <= tile:
        return None, loop
    return sch.split(loop, [None, tile])


def schedule_contraction(sch: s_tir.Schedule, block, feats: CPUFeatures, parallel: bool = True) -> bool:
    """Tile one contraction block (see the module docstring); False when it is not one."""
    from .tiling import _inline_epilogue, _try, panel_vectors, split_init_and_vectorize

    axes = _axes(sch, block)
    stmt = sch.get(block)
    if axes is None or len(stmt.writes) != 1 or not stmt.writes[0].region or len(stmt.reads) < 2:
        return False
    spatial = [a for a in axes if not a[3]]
    reds = [a[1] for a in axes if a[3]]
    if not spatial or not reds:
        return False
    last = stmt.writes[0].region[-1].min
    vec = next((a for a in spatial if coefficient(last, a[0]) == 1), None)
    if vec is None:
        return False
    vec_reads = [r for r in stmt.reads if buffer_uses(r, vec[0])]
    if any(coefficient(r.region[-1].min, vec[0]) != 1 for r in vec_reads):
        return False  # an operand that moves with the vector axis but not contiguously: generic code
    lanes = feats.lanes(stmt.writes[0].source.dtype.bits)
    # a packed matmul's panel of up to 3 vectors is one tile (tiling.panel_vectors), with fewer rows
    panel = panel_vectors(stmt, vec[2], lanes) if isinstance(vec[2], int) else 0
    reg_tile = max(d for d in range(1, REG_TILE + 1)
                   if REG_TILE % d == 0 and d * max(panel, 1) <= max(feats.max_accumulators, REG_TILE))
    # register tile: an axis the vector loads do not move with, split without a partial tile
    cands = [a for a in spatial if a is not vec and (_tile(a[2], reg_tile) or 1) > 1]
    reuse = [a for a in cands if not any(buffer_uses(r, a[0]) for r in vec_reads)]
    reg = (reuse or cands or [None])[-1]
    # a vector axis with partial tiles (attention's key axis): its tile loop stays serial, outside the
    # parallel loop, so that TVM's loop partitioning splits off the last tile and the rest has no branch
    vt = panel * lanes if panel else _tile(vec[2], lanes) if isinstance(vec[2], int) else (_tile(vec[2], lanes) or lanes)
    outer, tail, reg_o = [], None, None
    for a in spatial:
        if a is vec:
            o, v_i = _split(sch, a[1], a[2], vt)
            if o is not None and _tile(a[2], vt) is None:
                tail, o = o, None
        elif a is reg:
            o, u_i = _split(sch, a[1], a[2], _tile(a[2], reg_tile))
            reg_o = o
        else:
            o = a[1]
        if o is not None:
            outer.append(o)
    if panel and reg is not None and reg_o is not None:
        # row tiles innermost: a panel of the weight stays in cache across every row tile, and the
        # panels are the parallel loop (rows outer streamed the whole weight once per 8 rows: a 768x3072
        # weight at seq 128 ran 2.3x ORT's time)
        outer = [o for o in outer if o is not reg_o] + [reg_o]
    v_o = None
    if panel > 1:
        v_o, v_i = sch.split(v_i, [None, lanes])
    inner = ([u_i] if reg is not None else []) + ([v_o] if v_o is not None else []) + [v_i]
    if not outer:
        return False
    sch.reorder(*outer, *([tail] if tail is not None else []), *reds, *inner)
    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, tail if tail is not None else outer[-1], preserve_unit_loops=True)
    _inline_epilogue(sch, wb)
    if parallel:
        parallelize_leading(sch, outer, feats)
    _try(sch.vectorize, v_i)
    if reg is not None:
        _try(sch.unroll, u_i)
    if v_o is not None:
        sch.unroll(v_o)
    split_init_and_vectorize(sch, block, reds[0], wb, lanes if v_o is not None else None)
    return True


def schedule_block(sch: s_tir.Schedule, block, feats: CPUFeatures, parallel: bool = True) -> None:
    """Parallel outer loops and a vectorized inner loop (spatial), or parallel rows with serial
    reduction loops inside (a lone reduction); a block whose loops are already scheduled is left."""
    loops = sch.get_loops(block)
    if not loops or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
        return
    if is_spatial_block(sch, block):
        # the static innermost loops fused and split into vectors (divisions by constants only); a
        # symbolic innermost loop stays as it is (a split would put a branch in the vector loop)
        static = 0
        while static < len(loops) and isinstance(sch.get(loops[-1 - static]).extent, tirx.IntImm):
            static += 1
        lanes = feats.lanes(32)
        head = list(loops[: len(loops) - static])
        if static:
            tail = loops[len(loops) - static:]
            fused = sch.fuse(*tail) if len(tail) > 1 else tail[0]
            n = int(sch.get(fused).extent)
            if n % lanes == 0 and n > lanes:
                o, inner = sch.split(fused, [None, lanes])
                head.append(o)
                _try_vectorize(sch, inner)
            elif n <= 4 * lanes:
                _try_vectorize(sch, fused)
            else:
                head.append(fused)
        if parallel and head:
            parallelize_leading(sch, head, feats)
        return
    axes = _axes(sch, block)
    if axes is None:
        return
    spatial, reds = [a[1] for a in axes if not a[3]], [a[1] for a in axes if a[3]]
    if spatial and parallel:
        sch.reorder(*spatial, *reds)
        parallelize_leading(sch, spatial, feats)


def _try_vectorize(sch, loop) -> None:
    try:
        sch.vectorize(loop)
    except Exception:  # noqa: BLE001 - e.g. a data-dependent index: scalar inner loop
        pass


def parallelize_leading(sch: s_tir.Schedule, loops: list, feats: CPUFeatures) -> None:
    """One parallel loop over the leading loops, fused only where the fused index divides by constants:
    the static loops before the first symbolic one (and that symbolic loop when they are all of extent 1).
    Dividing by a symbolic extent in every iteration, and an accumulator tile whose region TVM cannot
    bound (it then allocates the whole buffer per iteration), are what fusing past it would cost."""
    if feats.cores <= 1 or not loops:
        return
    prefix, n = [], 1
    for lp in loops:
        ext = sch.get(lp).extent
        if not isinstance(ext, tirx.IntImm):
            if n == 1:
                prefix.append(lp)  # only unit loops before it: the fused index is this loop's
            break
        prefix.append(lp)
        n *= int(ext)
        if n >= 4 * feats.cores:
            break
    if not prefix or (n < 2 and all(isinstance(sch.get(lp).extent, tirx.IntImm) for lp in prefix)):
        return
    sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])


def _symbolic_reduction(sch: s_tir.Schedule, blocks) -> bool:
    """True when a reduction iterator of one of ``blocks`` has a symbolic extent."""
    return any(iv.iter_type == tirx.IterVar.CommReduce and not isinstance(iv.dom.extent, tirx.IntImm)
               for b in blocks for iv in sch.get(b).iter_vars)


def work_expr(sch: s_tir.Schedule, bounds: dict[str, int]):
    """Iterations of the block nest that is largest at the bounds, as an expression of the symbolic
    dims (what ``work_at_bound`` weighs), or None when that nest is static."""
    import tvm

    ana = tvm.sym.Analyzer()
    best, expr = -1, None
    for b in root_blocks(sch):
        n = tirx.const(1, "int64")
        for iv in sch.get(b).iter_vars:
            n = n * tirx.Cast("int64", iv.dom.extent) if iv.dom.extent.ty != "int64" else n * iv.dom.extent
            for v in tirx.analysis.undefined_vars(iv.dom.extent, []):
                ana.bind(v, tvm.ir.Range(1, bounds.get(v.name, 1) + 1))
        value = int(ana.const_int_bound(n).max_value)
        if value > best:
            best, expr = value, n
    expr = ana.simplify(expr) if expr is not None else None
    return None if expr is None or isinstance(expr, tirx.IntImm) else expr


def _with_serial_path(parallel: tirx.PrimFunc, serial: tirx.PrimFunc, work) -> tirx.PrimFunc:
    """``if work >= PARALLEL_MIN: <parallel> else: <serial>``: a nest sized for parallel loops at the
    bounds runs serial when it is small at run time (a decode step's bias and GELU after a quantized
    matmul: a thread-pool launch each cost more than their work, 15 of 42 ms a gen:gpt2 int8 step)."""
    root, other = parallel.body.block, serial.body.block
    cond = tirx.GE(work, tirx.IntImm(str(work.ty), PARALLEL_MIN))
    body = tirx.IfThenElse(cond, root.body, other.body)
    merged = with_root_body(parallel, body, list(root.alloc_buffers) + list(other.alloc_buffers))
    # both versions come from one function and share its loop variables: each loop gets its own, or
    # the simplifier binds one variable to two ranges and fails (GPT-2 at --max past=520)
    return tvm.get_global_func("s_tir.RenewDefs")(merged)


def schedule_function(func: tirx.PrimFunc, feats: CPUFeatures, bounds: dict[str, int] | None = None
                      ) -> tuple[tirx.PrimFunc, str]:
    """The scheduled function and the rule that took it (``dlight.cpu.Reduction``, ``contraction``,
    ``generic``; ``serial`` appended when the nest is small at the bounds). A nest large enough for
    parallel loops at the bounds gets a serial version too, taken when it is small at run time."""
    sch = s_tir.Schedule(func)
    parallel = work_at_bound(sch, bounds or {}) >= PARALLEL_MIN
    scheduled, rule = _schedule_function(func, feats, parallel)
    if parallel and (work := work_expr(sch, bounds or {})) is not None:
        try:
            serial, _ = _schedule_function(func, feats, False)
            scheduled = _with_serial_path(scheduled, serial, work)
        except Exception as e:  # noqa: BLE001 - parallel at every size, as before
            log.debug("no serial version: %s", e)
    return scheduled, rule


def _schedule_function(func: tirx.PrimFunc, feats: CPUFeatures, parallel: bool) -> tuple[tirx.PrimFunc, str]:
    from . import _inline_data_movement

    sch = s_tir.Schedule(func)
    reductions = [b for b in root_blocks(sch) if is_reduction_block(sch, b)]
    from .layer_norm import schedule_layer_norm

    if (ln := schedule_layer_norm(func, parallel=parallel)) is not None:
        return ln.mod["main"], "layer_norm" if parallel else "layer_norm (serial)"
    if len(reductions) >= 2 and _symbolic_reduction(sch, reductions):
        # softmax over a symbolic row: dlight's vector loops would carry a predicate (scalar code) and
        # write the row's intermediates to memory; elementwise stages inlined into the reductions and
        # the output instead (exp computed twice, no intermediate buffers): 2x faster at 12x256x256
        for b in root_blocks(sch):
            if is_spatial_block(sch, b) and sch.get(b) not in [sch.get(o) for o in sch.get_output_blocks(
                    sch.get_sblock("root"))]:
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001 - stays a block of its own
                    pass
        for b in root_blocks(sch):
            try:
                schedule_block(sch, b, feats, parallel)
            except Exception as e:  # noqa: BLE001 - stays serial; still correct
                log.debug("block %s left unscheduled: %s", sch.get(b).name_hint, e)
        return sch.mod["main"], "inlined rows" if parallel else "inlined rows (serial)"
    if len(reductions) >= 2 and parallel:
        from tvm.s_tir.dlight.cpu import Reduction

        try:
            new = Reduction().apply(func, feats.target, False)
        except Exception as e:  # noqa: BLE001 - not a row normalization
            log.debug("dlight Reduction failed: %s", e)
            new = None
        if new is not None:
            return new.mod["main"], "dlight.cpu.Reduction"
    rule = "generic"
    _inline_data_movement(sch)
    for block in [b for b in root_blocks(sch) if is_reduction_block(sch, b)]:
        try:
            if schedule_contraction(sch, block, feats, parallel):
                rule = "contraction"
        except Exception as e:  # noqa: BLE001 - left to the generic schedule below
            log.debug("contraction schedule failed: %s", e)
    for block in root_blocks(sch):
        try:
            schedule_block(sch, block, feats, parallel)
        except Exception as e:  # noqa: BLE001 - stays serial; still correct
            log.debug("block %s left unscheduled: %s", sch.get(block).name_hint, e)
    from .gemv import with_few_row_paths  # a packed matmul over symbolic rows: GEMV paths for 1 to 4 rows

    return with_few_row_paths(func, sch.mod["main"], feats, parallel), rule if parallel else f"{rule} (serial)"


def schedule_symbolic(mod, target_spec, bounds: dict[str, int] | None = None, report: dict | None = None):
    """Schedule (and mark scheduled) every PrimFunc of ``mod`` with a symbolic extent (``bounds``: the
    largest value of each symbolic dim, by name); ``report`` receives ``{function: rule}``. Other functions are returned untouched."""
    feats = features_of(target_spec)
    if feats.target is not None and feats.target.kind.name != "llvm":
        return mod
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or not has_symbolic_extent(func):
            continue
        if is_scheduled(func):
            continue
        new, rule = schedule_function(func, feats, bounds)
        updates[gv] = new.with_attr("tirx.is_scheduled", True)
        if report is not None:
            report[gv.name_hint] = rule
    return with_functions(mod, updates)

"""Small facts about a TIR block that the rules decide on: loops, iterators, access strides."""

from __future__ import annotations

import dataclasses
import math

from tvm import s_tir, tirx


@dataclasses.dataclass
class Axis:
    """One block iterator bound one-to-one to one loop."""

    var: tirx.Var
    loop: s_tir.schedule.LoopRV
    extent: int
    reduce: bool



def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (``tirx.is_scheduled``: graphopt's rules, a tuning record)."""
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1)


def with_functions(mod, updates: dict):
    """``mod`` with the functions ``{global var: function}`` replaced (a copy; ``mod`` itself when none)."""
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod

def with_root_body(func: tirx.PrimFunc, body: tirx.Stmt, alloc_buffers=None) -> tirx.PrimFunc:
    """``func`` with its root block's body (and, when given, its allocations) replaced: a loop nest
    rewritten or versioned (``if m == 1: ... else: ...``) outside the schedule API."""
    root = func.body.block
    allocs = root.alloc_buffers if alloc_buffers is None else alloc_buffers
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init, allocs,
                         root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(func.body.iter_values, func.body.predicate, block))


def int_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def block_axes(sch: s_tir.Schedule, block) -> list[Axis] | None:
    """The block's iterators with their loops, if every loop binds exactly one iterator in order.

    Returns None for anything else (fused or split bindings, symbolic extents): rules then skip.
    """
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    realize = get_sblockrealize(sch, block)
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars):
        return None
    axes = []
    for loop, iv, value in zip(loops, stmt.iter_vars, realize.iter_values):
        lp = sch.get(loop)
        if not isinstance(value, tirx.Var) or not value.same_as(lp.loop_var):
            return None
        ext = int_extent(sch, loop)
        if ext is None:
            return None
        if iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce):
            return None
        axes.append(Axis(iv.var, loop, ext, iv.iter_type == tirx.IterVar.CommReduce))
    return axes


def get_block(sch: s_tir.Schedule, name: str):
    """The block called ``name``, or None when the function has none."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - no such block
        return None


def nbytes(region) -> int:
    """Bytes of the whole buffer a read or write region belongs to."""
    return math.prod(int(d) for d in region.source.shape) * region.source.dtype.bits // 8


def uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))


def coefficient(expr, var) -> int | None:
    """The constant coefficient of ``var`` in ``expr`` (0 if absent), or None if not linear in it."""
    if not uses(expr, var):
        return 0
    from tvm.sym.pattern import detect_linear_equation

    res = detect_linear_equation(expr, [var])
    if len(res) != 2 or not isinstance(res[0], tirx.IntImm):
        return None
    return int(res[0])


def last_index_stride(region, var) -> int | None:
    """How the innermost index of an access region moves with ``var``: 0, a constant, or None."""
    if not region.region:
        return 0
    return coefficient(region.region[-1].min, var)


def buffer_uses(region, var) -> bool:
    return any(uses(r.min, var) for r in region.region)


def consumers(sch, block):
    return list(sch.get_consumers(block))


def is_spatial_block(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def dtype_bits(sch, block) -> int:
    stmt = sch.get(block)
    return stmt.writes[0].source.dtype.bits if stmt.writes else 32


def is_reduction_block(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def root_blocks(sch: s_tir.Schedule) -> list:
    """The blocks directly under the function's root block."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def work(sch: s_tir.Schedule, block) -> int:
    """The iteration count of a block (product of its iterator extents; 0 if symbolic)."""
    n = 1
    for iv in sch.get(block).iter_vars:
        ext = iv.dom.extent
        if not isinstance(ext, tirx.IntImm):
            return 0
        n *= int(ext)
    return n


def main_reduction(sch: s_tir.Schedule):
    """The reduction block doing the most work, or None when the function has no reduction."""
    reds = [b for b in root_blocks(sch) if is_reduction_block(sch, b)]
    return max(reds, key=lambda b: work(sch, b)) if reds else None


KEEP_ATTR = "graphopt.keep"  # a block annotation: a deliberate copy (a packed layout), never inlined


def is_kept(sch: s_tir.Schedule, block) -> bool:
    return KEEP_ATTR in sch.get(block).annotations


def is_copy(sch: s_tir.Schedule, block) -> bool:
    """A spatial block whose value is one load: a pad of zero width, a reshape; no branch, no arithmetic."""
    body = sch.get(block).body
    return (type(body).__name__ in ("BufferStore", "TensorStore") and is_spatial_block(sch, block)
            and type(body.value).__name__ in ("BufferLoad", "TensorLoad"))


def is_data_movement(sch: s_tir.Schedule, block) -> bool:
    """A spatial block that only moves data: a load, or a padding ``if_then_else(cond, load, const)``."""
    stmt = sch.get(block)
    body = stmt.body
    # (tirx.BufferStore / BufferLoad are factory functions in TVM 0.27: compare class names)
    if type(body).__name__ not in ("BufferStore", "TensorStore") or not is_spatial_block(sch, block):
        return False

    def plain(e) -> bool:
        return type(e).__name__ in ("BufferLoad", "TensorLoad", "FloatImm", "IntImm")

    v = body.value
    if plain(v):
        return True
    op = getattr(v, "op", None)
    return getattr(op, "name", "") == "prim.if_then_else" and plain(v.args[1]) and plain(v.args[2])

"""GPU rule for small-window reductions: depthwise convs, pooling, means over a few values.

TVM's dlight rules send a depthwise 3x3 conv to ``GeneralReduction`` (256 threads of a block share
the reduction of one output pixel: 9 products, so most threads idle and the block synchronises for
each pixel) and a max pool to ``Fallback`` (1024 threads a block, the window's pad as a pass of its
own over the input). Here every thread computes one output element: the window is read through the
pad (inlined, a branch per tap), accumulated in a register with its loops unrolled, and the
elementwise epilogue (bias, activation, residual add) is applied before the single store.

A function qualifies when it has exactly one reduction block, its reduction covers at most
``MAX_WINDOW`` values, and every spatial iterator indexes its largest input: each input value is
used by the outputs of one channel only (no reuse across output channels, which a conv has and which
dlight's Matmul rule serves with shared-memory tiles).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.target import Target

from .analysis import uses

MAX_WINDOW = 128  # reduction size up to which one thread per output beats a cooperative reduction
THREADS = 256  # threads per block


def _root_blocks(sch: s_tir.Schedule) -> list:
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - a function without a root block
        return []


def _reduction_block(sch: s_tir.Schedule):
    """The function's only reduction block among its root blocks, or None."""
    reductions = [b for b in _root_blocks(sch)
                  if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
    return reductions[0] if len(reductions) == 1 else None


def _is_window(sch: s_tir.Schedule, block) -> bool:
    stmt = sch.get(block)
    reduce_size = math.prod(int(iv.dom.extent) for iv in stmt.iter_vars
                            if iv.iter_type == tirx.IterVar.CommReduce)
    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in stmt.iter_vars) or reduce_size > MAX_WINDOW:
        return False
    if len(stmt.writes) != 1 or not stmt.reads:
        return False
    data = max(stmt.reads, key=lambda r: math.prod(int(d) for d in r.source.shape))
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar
               and int(iv.dom.extent) > 1]
    return all(any(uses(rng.min, var) for rng in data.region) for var in spatial)


def _inline_producers(sch: s_tir.Schedule, block) -> None:
    """Pads and other spatial producers folded into the reduction's reads (a branch per tap)."""
    for producer in sch.get_producers(block):
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001 - a producer that cannot be inlined stays a kernel of its own
            pass


def _epilogue(sch: s_tir.Schedule, block):
    """Elementwise blocks after the reduction inlined into the last one (a chain or a small DAG, e.g.
    hard-swish reads the conv twice); that block, the reduction itself when it writes the output, or
    None when the reduction feeds several outputs."""
    for _ in range(256):
        consumers = list(sch.get_consumers(block))
        if not consumers:
            return block
        inner = [c for c in consumers if list(sch.get_consumers(c))]
        if not inner:
            return consumers[0] if len(consumers) == 1 else None
        try:
            sch.compute_inline(inner[0])
        except Exception:  # noqa: BLE001 - not elementwise: not this rule's function
            return None
    return None


def _size(sch: s_tir.Schedule, block) -> int:
    return math.prod(int(d) for d in sch.get(block).writes[0].source.shape)


def _bind(sch: s_tir.Schedule, loops) -> s_tir.schedule.LoopRV:
    fused = sch.fuse(*loops)
    extent = int(sch.get(fused).extent)
    threads = min(THREADS, 1 << max(5, math.ceil(math.log2(max(extent, 1)))))
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx


class WindowReduction:
    """dlight-style rule object: ``apply(func, target, tunable)`` returns a Schedule or None."""

    name = "window"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool = False) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        block = _reduction_block(sch)
        if block is None or not _is_window(sch, block):
            return None
        _inline_producers(sch, block)
        last = _epilogue(sch, block)
        if last is None or _size(sch, last) != _size(sch, block):
            return None  # a broadcast epilogue (x - mean) would redo the reduction for every element
        if len(_root_blocks(sch)) != (1 if sch.get(last).same_as(sch.get(block)) else 2):
            return None  # a producer or output that could not be inlined would be left without threads
        stmt = sch.get(block)
        kinds = [iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars]
        loops = sch.get_loops(block)
        first = kinds.index(True)
        if len(loops) != len(kinds) or not all(kinds[first:]):
            return None  # reduction loops must be innermost (S...SR...R)
        reduce_loops = loops[first:]
        if sch.get(last).same_as(stmt):
            _bind(sch, loops[:first])
        else:
            tx = _bind(sch, sch.get_loops(last))
            sch.compute_at(block, tx, preserve_unit_loops=True)
            sch.set_scope(block, 0, "local")
            reduce_loops = sch.get_loops(block)[-len(reduce_loops):]
        try:  # the zeroing before the window (else a branch on the first tap, resolved once unrolled)
            sch.decompose_reduction(block, reduce_loops[0])
        except Exception:  # noqa: BLE001 - bindings the primitive cannot see through (fused, strided)
            pass
        for loop in reduce_loops:
            sch.unroll(loop)
        return sch


__all__ = ["MAX_WINDOW", "WindowReduction"]

"""The range of a whole tensor (``min(x)`` and ``max(x)``, as DynamicQuantizeLinear's lowering writes
them) in one vectorized, parallel pass: a Relax rewrite and its kernel.

A full reduction to a scalar gets no parallel or vector schedule (``reduction.py``: a serial scalar
loop, about 1 ns an element: 70-120 us for each of a flan-t5 layer's [128, 512] minimum and maximum).
``range_func`` reads the tensor once, ``lanes`` values a vector, split over ``parts`` threads, each
keeping a vector of minimums and one of maximums; the partial vectors are then combined. Minimum and
maximum are exact in any order, so the result is the same as the reduction it replaces.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .int8_layout import shape_of

_MIN, _MAX = tvm.ir.Op.get("relax.min"), tvm.ir.Op.get("relax.max")
PARALLEL_MIN = 1 << 18  # values below which one thread reads the whole tensor (2 threads: no faster at 2**17 here)


def range_func(n: int, lanes: int, threads: int) -> tirx.PrimFunc:
    """``(x [n] float32, lo [] float32, hi [] float32)``: ``lo = min(x)``, ``hi = max(x)``."""
    full = n // lanes
    parts = max(1, min(threads if n >= PARALLEL_MIN else 1, full))
    per = math.ceil(full / parts) if full else 0
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)  # (a root block: RewriteDataflowReshape inspects it)
    def value_range(x: T.Buffer((n,), f32), lo: T.Buffer((), f32), hi: T.Buffer((), f32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            part = T.sblock_alloc_buffer((parts, 2, lanes), f32)
            for p in T.parallel(parts):
                acc = T.decl_buffer((2, lanes), f32, scope="local")
                for j in T.vectorized(lanes):
                    acc[0, j] = x[0]
                    acc[1, j] = x[0]
                for c in range(p * per, T.min(p * per + per, full)):
                    for j in T.vectorized(lanes):
                        acc[0, j] = T.min(acc[0, j], x[c * lanes + j])
                        acc[1, j] = T.max(acc[1, j], x[c * lanes + j])
                for j in T.vectorized(lanes):
                    part[p, 0, j] = acc[0, j]
                    part[p, 1, j] = acc[1, j]
            lo[()] = x[0]
            hi[()] = x[0]
            for p, j in T.grid(parts, lanes):
                lo[()] = T.min(lo[()], part[p, 0, j])
                hi[()] = T.max(hi[()], part[p, 1, j])
            for i in range(full * lanes, n):  # the last values, fewer than a vector
                lo[()] = T.min(lo[()], x[i])
                hi[()] = T.max(hi[()], x[i])

    return value_range


def _full_reduction(value) -> bool:
    """A ``min``/``max`` of a static float32 tensor over every axis to a scalar."""
    if not isinstance(value, relax.Call) or not (value.op.same_as(_MIN) or value.op.same_as(_MAX)):
        return False
    shape = shape_of(value.args[0])
    axes = value.attrs.axis
    return (shape is not None and math.prod(shape) > 0 and value.args[0].ty.dtype == "float32"
            and (axes is None or len(axes) == len(shape)) and shape_of(value) == [])


def rewrite_value_range(mod: tvm.IRModule, lanes: int, threads: int) -> tvm.IRModule:
    """Every pair of ``min(x)`` and ``max(x)`` over all of the same tensor as one ``range_func`` call."""
    bb = relax.BlockBuilder(tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs))
    changed = False
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        seen: dict = {}  # x -> {op: var}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and _full_reduction(b.value):
                    seen.setdefault(b.value.args[0], {})["min" if b.value.op.same_as(_MIN) else "max"] = b.var
        pairs = {x: ops for x, ops in seen.items() if len(ops) == 2}
        if not pairs:
            continue
        changed = True
        item = {}  # min/max var -> (x, index of the result)
        for x, ops in pairs.items():
            item[ops["min"]], item[ops["max"]] = (x, 0), (x, 1)
        blocks = [type(block)(_rewrite(bb, block, item, lanes, threads)) for block in func.body.blocks]
        bb.update_func(gv, relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                                          func.is_pure, func.attrs))
    return bb.get() if changed else mod


def _rewrite(bb, block, item: dict, lanes: int, threads: int) -> list:
    out, done = [], {}
    scalar = relax.TensorType([], "float32")
    var = relax.DataflowVar if isinstance(block, relax.DataflowBlock) else relax.Var
    for b in block.bindings:
        if b.var not in item:
            out.append(b)
            continue
        x, index = item[b.var]
        if x not in done:  # the first of the pair: the kernel call, before it
            n = math.prod(shape_of(x))
            flat = var("range_in", relax.TensorType([n], "float32"))
            pair = var("range", relax.TupleType([scalar, scalar]))
            gvar = bb.add_func(range_func(n, lanes, threads), "value_range")
            out += [relax.VarBinding(flat, relax.op.reshape(x, [n])),
                    relax.VarBinding(pair, relax.call_tir(gvar, [flat], [scalar, scalar]))]
            done[x] = pair
        out.append(relax.VarBinding(b.var, relax.TupleGetItem(done[x], index)))
    return out

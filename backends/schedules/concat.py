"""Concatenation of two tensors as one contiguous copy per input (CPU).

TVM's concat computes every output element as ``if_then_else(i >= n0, B[i - n0], A[i])`` along the
axis: a branch in every vector and a division of the flattened index. A KV-cache decoder runs one per
cache and step (GPT-2: 24 concatenations of the ``[1, 12, past, 64]`` cache and the step's new row),
and they grow with the cache: at past 68 they took 1.24 ms of an 18.5 ms int8 decode step on one
thread (4 GB/s).

Here the output is seen as ``[outer, n0 + n1, inner]`` (the dims before the axis, the axis, the dims
after it), and each input's rows are one contiguous run per outer index: ``A``'s ``n0 * inner``
elements go to the start of the outer index's run, ``B``'s after them, copied by whole vectors when
``inner`` is whole vectors. Parallel over the outer index (or over the rows when there is one outer
index) from ``PARALLEL_MIN_ELEMENTS`` elements, decided at run time: a copy is bandwidth-bound, and
two cores copy a GPT-2 cache (12 x 100 x 64) faster than one even with the thread pool's wake-up
(24 of them at past 100, 2 threads: 1.42-1.60 -> 0.93-1.09 ms); smaller ones stay on the calling thread.
"""

from __future__ import annotations

import functools
import math

from tvm import relax, tirx
from tvm.script import tirx as T

PARALLEL_MIN_ELEMENTS = 1 << 14  # smaller copies stay serial: waking the thread pool costs more than they do


@functools.lru_cache(maxsize=64)
def concat_func(a_shape: tuple, b_shape: tuple, axis: int, dtype: str, lanes: int) -> tirx.PrimFunc:
    """``C = concat(A, B, axis)``, every dim static (ints) but the axis (None: symbolic, bound by
    the buffer). The buffers keep their shapes; the kernel reads them as ``[outer, n, inner]``."""
    outer = math.prod(a_shape[:axis])
    inner = math.prod(a_shape[axis + 1:])
    N0 = tirx.Var("n0", "int64") if a_shape[axis] is None else a_shape[axis]
    N1 = tirx.Var("n1", "int64") if b_shape[axis] is None else b_shape[axis]
    SA = (*a_shape[:axis], N0, *a_shape[axis + 1:])
    SB = (*b_shape[:axis], N1, *b_shape[axis + 1:])
    SC = (*a_shape[:axis], N0 + N1, *a_shape[axis + 1:])
    V = lanes if inner % lanes == 0 else 1  # whole vectors, else a plain loop (LLVM vectorizes a copy)
    W = inner // V
    rows_parallel = outer == 1

    @T.macro
    def copy_rows(src, dst, o, r0, r1, offset):
        for r in range(r0, r1):
            for w in range(W):
                for v in T.vectorized(V):
                    dst[o, offset + r, w * V + v] = src[o, r, w * V + v]

    @T.prim_func(private=True)
    def concat(A: T.Buffer(SA, dtype), B: T.Buffer(SB, dtype), C: T.Buffer(SC, dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        a = T.decl_buffer((outer, N0, inner), dtype, data=A.data)
        b = T.decl_buffer((outer, N1, inner), dtype, data=B.data)
        c = T.decl_buffer((outer, N0 + N1, inner), dtype, data=C.data)
        if outer * (N0 + N1) * inner < PARALLEL_MIN_ELEMENTS:
            for o in range(outer):
                copy_rows(a, c, o, 0, N0, 0)
                copy_rows(b, c, o, 0, N1, N0)
        elif rows_parallel:
            for r in T.parallel(N0):
                copy_rows(a, c, 0, r, r + 1, 0)
            for r in T.parallel(N1):
                copy_rows(b, c, 0, r, r + 1, N0)
        else:
            for o in T.parallel(outer):
                copy_rows(a, c, o, 0, N0, 0)
                copy_rows(b, c, o, 0, N1, N0)

    return concat


def _fields(bb, call):
    """The concatenated tensors (a Tuple, or a Var bound to one)."""
    t = call.args[0]
    while isinstance(t, relax.Var):
        binding = bb.lookup_binding(t)
        if not isinstance(binding, relax.Tuple | relax.Var):
            break
        t = binding
    return list(t.fields) if isinstance(t, relax.Tuple) else None


def legalize_concat(lanes: int, fallback):
    """A LegalizeOps entry for ``relax.concat``: two inputs of one dtype, static dims but a symbolic
    axis (a cache growing step by step) take ``concat_func``; anything else goes to ``fallback``
    (TVM's, an injective op that fuses with its producers and consumers: this kernel does not)."""
    def legalize(bb, call):
        fields = _fields(bb, call)
        if fields is None or len(fields) != 2 or call.attrs.axis is None:
            return fallback(bb, call)
        a, b = fields
        sa, sb = (getattr(x.ty, "shape", None) for x in (a, b))
        if sa is None or sb is None or a.ty.dtype != b.ty.dtype or len(sa) != len(sb) or not len(sa):
            return fallback(bb, call)
        rank = len(sa)
        axis = int(call.attrs.axis) % rank
        others = [i for i in range(rank) if i != axis]
        if not all(isinstance(s[i], tirx.IntImm) for s in (sa, sb) for i in others):
            return fallback(bb, call)
        static = [tuple(int(s[i]) if i != axis or isinstance(s[i], tirx.IntImm) else None for i in range(rank))
                  for s in (sa, sb)]
        if None not in (static[0][axis], static[1][axis]) or 0 in static[0] or 0 in static[1]:
            return fallback(bb, call)  # static: TVM's concat fuses with its neighbours; empty: nothing to copy
        func = concat_func(static[0], static[1], axis, str(a.ty.dtype), lanes)
        out_shape = [sa[i] if i != axis else sa[axis] + sb[axis] for i in range(rank)]
        return relax.call_tir(bb.add_func(func, "concat_rows"), [a, b], relax.TensorType(out_shape, a.ty.dtype))

    return legalize

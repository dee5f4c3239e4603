"""Weights passed as arguments (models whose weights stay outside the library) read packed too.

``schedules.packed_matmul`` packs a matmul's constant weight ``[K, N]`` into ``[ceil(N/L), K, L]`` at
compile time; a weight that is an argument of ``main`` (weights over ``EMBED_LIMIT_BYTES``) was left
``[K, N]``, and a row-major GEMV over an ``N`` without a power-of-two divisor runs scalar (GPT-2's
50257-column head: 489 ms against 48 packed). ``pack_weight_params`` gives such a matmul the same
packed kernel and changes the argument to the packed shape; the weight itself is packed lazily
(``PackedWeight``): one tensor at a time when the bundle's params file is written, or when an
in-process runner takes it, so compiling never holds a second copy of all the weights.

Only a weight used by exactly one matmul, as its 2-D right operand, is packed (another use would
need the unpacked weight as well: two copies in the bundle).
"""

from __future__ import annotations

import mmap

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.schedules import packed_matmul

_MATMUL = packed_matmul._MATMUL
ALIGN = 64  # TVM takes an array without a copy only at this alignment


class PackedWeight:
    """``source`` ``[K, N]`` packed by ``lanes`` on request (``numpy.asarray``), never cached. A source
    that is a memory map drops its pages once packed (they are file pages, read again if needed)."""

    def __init__(self, source: np.ndarray, lanes: int) -> None:
        self.source, self.lanes = source, lanes
        k, n = source.shape
        self.shape = (-(-n // lanes), k, lanes)
        self.dtype = source.dtype
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        k, n = self.source.shape
        buf = np.empty(self.nbytes + ALIGN, np.uint8)
        start = -buf.ctypes.data % ALIGN
        out = buf[start:start + self.nbytes].view(self.dtype).reshape(self.shape)
        out[...] = 0
        for b in range(self.shape[0]):  # a panel at a time: no [K, N] temporary
            cols = min(self.lanes, n - b * self.lanes)
            out[b, :, :cols] = self.source[:, b * self.lanes:b * self.lanes + cols]
        _drop_pages(self.source)
        return out if dtype is None else out.astype(dtype, copy=False)


def _drop_pages(arr) -> None:
    base, dontneed = arr, getattr(mmap, "MADV_DONTNEED", None)
    while base is not None and dontneed is not None:
        if isinstance(base, mmap.mmap):
            if not base.closed:
                base.madvise(dontneed)
            return
        base = getattr(base, "base", None)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, candidates: dict, lanes: int):
        super().__init__(mod)
        self.candidates, self.lanes = candidates, lanes  # weight Var -> its array
        self.packed: dict = {}  # weight Var -> the packed Var replacing it

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_MATMUL)):
            return call
        w = call.args[1]
        match = next((v for v in self.candidates if v.same_as(w)), None)
        if match is None or packed_matmul.why_not_shape(call, w, self.lanes) is not None:
            return call
        k, n = (int(d) for d in w.ty.shape)
        width = packed_matmul.panel_lanes(n, self.lanes)
        new = relax.Var(f"{w.name}_packed", relax.TensorType([-(-n // width), k, width], "float32"))
        self.packed[match] = new, width
        return self.builder_.call_te(packed_matmul.packed_matmul_te, call.args[0], new, n,
                                     primfunc_name_hint="packed_matmul")


def _uses(func) -> dict:
    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def weight_arguments(main, params: dict) -> tuple[dict, list]:
    """(Var -> name of every weight argument of ``main``, in order; those Vars read exactly once and
    holding a matrix: the ones a rewrite may replace by a packed form)."""
    num_input = len(main.params) - len(params)
    weights = dict(zip(main.params[num_input:], params))
    uses = _uses(main)
    return weights, [v for v, name in weights.items() if uses.get(v, 0) == 1 and np.asarray(params[name]).ndim == 2]


def with_main_params(builder, mod, body, replaced) -> object:
    """The builder's module with ``main`` = ``body`` whose parameters ``old`` are ``new`` for each
    ``(old, new)`` in ``replaced``."""
    new_params = [next((new for old, new in replaced if old.same_as(p)), p) for p in body.params]
    func = relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs, body.span)
    builder.update_func(mod.get_global_var("main"), func)
    return builder.get()


def pack_weight_params(mod, params: dict, lanes: int):
    """``(mod, params)`` with each weight argument of ``main`` that one matmul reads (see the module
    docstring) replaced by its packed form: the argument's type in ``mod``, a ``PackedWeight`` in ``params``."""
    if not packed_matmul.enabled() or not params:
        return mod, params
    main = mod["main"]
    weights, single = weight_arguments(main, params)
    candidates = {v: params[weights[v]] for v in single}
    if not candidates:
        return mod, params
    rw = _Rewriter(mod, candidates, lanes)
    body = rw.visit_expr(main)
    if not rw.packed:
        return mod, params
    new_mod = with_main_params(rw.builder_, mod, body, [(v, new) for v, (new, _) in rw.packed.items()])
    out = {name: PackedWeight(np.asarray(params[name]), rw.packed[v][1]) if v in rw.packed else params[name]
           for v, name in weights.items()}
    return new_mod, out

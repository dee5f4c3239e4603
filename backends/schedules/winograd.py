"""Winograd F(m x m, 3x3) for 3x3 stride-1 NCHW fp32 convolutions with a constant weight (CPU).

A Relax pass (``rewrite_winograd``, run before LegalizeOps) replaces each eligible
``relax.nn.conv2d`` by a ``call_tir`` to a TE function with four stages:

* ``wino_pad``        [N, H, W, C]: the input padded and transposed (channels innermost)
* ``wino_data_pack``  [a, a, P, C]: input tiles times Bᵀ·d·B (P = N·tiles, a = m + 2)
* ``wino_bgemm``      [a, a, P, O]: a² independent GEMMs over C, the bulk of the work
* ``wino_inverse``    [P, m, m, O]: Aᵀ·M·A per tile
* ``wino_output``     [N, O, H, W]: tiles back to NCHW (bias / relu fuse into it)

The weight transform G·w·Gᵀ is done once at compile time in numpy (``weight_transform``): the
function receives the transformed constant ``[a, a, C, O]``. ``schedule_winograd`` (a rule of
``apply_default_schedules``) recognises the fused function by its block names: transforms unrolled
(the constant matrices fold away), the GEMM register-tiled by ``tiling.apply_contraction``.

F(4x4) does 4x fewer multiplications than the direct conv, F(2x2) 2.25x; ``choose_tile`` picks per
shape, ``eligible`` says why a conv is left to the direct schedule (a measured cost model).
``backends/compile.py`` runs the rewrite for CPU targets when default schedules are on and no
tuning database is given; ``GRAPHOPT_WINOGRAD=0`` turns it off.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.constants import bound_constant, rewrite_relax_functions

from .analysis import get_block, int_extent
from .blocked import blocked_layouts
from .features import RuleContext
from .tiling import _inline_epilogue, _try, apply_contraction, divisors, parallelize_outer

log = logging.getLogger(__name__)
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
# The cost model, from measurements on 2 x86 cores (direct conv vs Winograd, ms): 32@56 0.38 vs 0.38,
# 64@14 0.107 vs 0.113, 128@7 0.087 vs 0.101 (too little work to pay for the transforms);
# 48@28 0.231 vs 0.187, 256@7 0.292 vs 0.205, 512@7 1.02 vs 0.81, 64@56 1.10 vs 0.56.
MIN_CHANNELS = 48  # input and output channels below which the direct conv wins
MIN_MACS = 12_000_000  # multiply-adds of the direct conv below which it wins
MIN_SPATIAL = 7  # output height and width below which the transformed weight's traffic dominates
MIN_TILES = 32  # tiles per transformed weight below which its memory traffic outweighs the saved work
F4_MIN_CHANNELS = 64  # F(4x4) only from here (48@28: F2 0.187 ms, F4 0.229 ms; 64@56: F2 0.69, F4 0.56)
BLOCKS = ("wino_data_pack", "wino_bgemm", "wino_inverse")


def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cook-Toom A [a, m], B [a, a], G [a, 3] for F(m, 3) (TVM's interpolation points), float64."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def weight_transform(w: np.ndarray, m: int) -> np.ndarray:
    """``[O, C, 3, 3]`` → ``[a, a, C, O]``: G·w·Gᵀ per (o, c), computed in float64 once."""
    _, _, g = transform_matrices(m)
    u = np.einsum("ai,ocij,bj->abco", g, w.astype(np.float64), g)
    return np.ascontiguousarray(u.astype(w.dtype))


def eligible(call: relax.Call, cost_model: bool = True) -> str | None:
    """None when ``call`` (a relax.nn.conv2d) can take Winograd, else why not.

    ``cost_model``: also require the shape to be one where Winograd measured faster.
    """
    at = call.attrs
    if [int(s) for s in at.strides] != [1, 1] or [int(d) for d in at.dilation] != [1, 1]:
        return "stride or dilation is not 1"
    if int(at.groups) != 1:
        return "grouped"
    block = blocked_layouts(call)
    if block is None and (at.data_layout, at.kernel_layout, at.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW"):
        return "layout is not NCHW/OIHW or blocked"
    x, w = call.args
    if not isinstance(w, tvm.ir.expr.Constant):
        return "weight is not a constant"
    xs, ws = x.ty, w.ty
    if any(s.dtype != "float32" for s in (xs, ws)) or str(at.out_dtype) not in ("", "None", "void", "float32"):
        return "not float32"
    shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in xs.shape] if xs.shape is not None else [None]
    if None in shape or len(shape) != (5 if block else 4):
        return "input shape is not static"
    shape = _nchw_shape(shape, block)
    o, c, kh, kw = _oihw_shape([int(d) for d in ws.shape], block)
    if (kh, kw) != (3, 3):
        return "kernel is not 3x3"
    oh, ow = _out_hw(shape, [int(p) for p in at.padding])
    if min(oh, ow) < 1:
        return "empty output"
    macs = c * o * 9 * shape[0] * oh * ow
    if cost_model and (min(c, o) < MIN_CHANNELS or min(oh, ow) < MIN_SPATIAL or macs < MIN_MACS):
        return f"too small ({c}->{o} channels, {oh}x{ow}): the direct conv is faster"
    if cost_model and choose_tile(oh, ow, min(c, o), shape[0]) is None:
        return f"too few tiles ({oh}x{ow}) to reuse the transformed weight: the direct conv is faster"
    return None


def _nchw_shape(shape: list[int], block: int | None) -> list[int]:
    """``[N, C, H, W]`` of an input in NCHW or NCHW{block}c."""
    return shape if not block else [shape[0], shape[1] * block, shape[2], shape[3]]


def _oihw_shape(shape: list[int], block: int | None) -> list[int]:
    return shape if not block else [shape[0] * block, shape[1] * block, shape[2], shape[3]]


def oihw(w: np.ndarray, block: int | None) -> np.ndarray:
    """A weight in OIHW, from OIHW or OIHW{b}i{b}o (``[O/b, I/b, KH, KW, b_i, b_o]``)."""
    if not block:
        return w
    ob, ib, kh, kw, bi, bo = w.shape
    return np.ascontiguousarray(w.transpose(0, 5, 1, 4, 2, 3).reshape(ob * bo, ib * bi, kh, kw))


def _out_hw(shape, pads) -> tuple[int, int]:
    pt, pl, pb, pr = pads
    return shape[2] + pt + pb - 2, shape[3] + pl + pr - 2


def choose_tile(oh: int, ow: int, channels: int, batch: int = 1) -> int | None:
    """F(4x4) for >= 64 channels on maps of 14+ whose edge tiles waste under 35% of the work, else
    F(2x2); None when neither tile reuses each transformed weight on ``MIN_TILES`` tiles.

    A transformed weight is (m+2)²/9 the size of the conv's (F4 4x, F2 1.8x), and each of its
    elements serves one multiply-add per tile: with few tiles the GEMMs stream the weights from
    memory (ResNet-50's 512@7 in F2: 16 tiles, 16.8 MB of weights per conv, 1.6x slower in the model
    than the direct conv; 256@14: F4's 16 tiles lose to F2's 49).
    """
    tiles = {m: batch * math.ceil(oh / m) * math.ceil(ow / m) for m in (2, 4)}
    waste4 = tiles[4] * 16 / (batch * oh * ow)
    if channels >= F4_MIN_CHANNELS and min(oh, ow) >= 14 and waste4 < 1.35 and tiles[4] >= MIN_TILES:
        return 4
    return 2 if tiles[2] >= MIN_TILES else None


def winograd_te(data: te.Tensor, kpack: te.Tensor, pads, m: int, block: int = 0) -> te.Tensor:
    """The four stages as TE computes; ``kpack`` is ``weight_transform``'s ``[a, a, C, O]``.

    ``block``: data and result in NCHW{block}c (``blocked.py``) instead of NCHW.
    """
    n, c, h, w = _nchw_shape([int(d) for d in data.shape], block)
    at = (lambda b, ci, y, x: data[b, ci // block, y, x, ci % block]) if block else (
        lambda b, ci, y, x: data[b, ci, y, x])
    alpha, co = m + 2, int(kpack.shape[3])
    pt, pl, pb, pr = pads
    oh, ow = _out_hw((n, c, h, w), pads)
    nh, nw = math.ceil(oh / m), math.ceil(ow / m)
    ntile = n * nh * nw
    A, B, _ = transform_matrices(m)
    a_mat = _const(A.astype(np.float32), "wino_A")
    b_mat = _const(B.astype(np.float32), "wino_B")
    hp, wp = nh * m + 2, nw * m + 2
    # padded and transposed to [N, H, W, C]: the input transform then runs vectors over channels
    dpad = te.compute(
        (n, hp, wp, c),
        lambda b, y, x, ci: tirx.if_then_else(
            tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl), at(b, ci, y - pt, x - pl), tirx.const(0, "float32")),
        name="wino_pad",
    )
    ra = te.reduce_axis((0, alpha), "ra")
    rb = te.reduce_axis((0, alpha), "rb")
    data_pack = te.compute(
        (alpha, alpha, ntile, c),
        lambda e, u, p, ci: te.sum(
            dpad[p // (nh * nw), (p // nw) % nh * m + ra, p % nw * m + rb, ci] * b_mat[ra, e] * b_mat[rb, u], axis=[ra, rb]),
        name="wino_data_pack",
    )
    rc = te.reduce_axis((0, c), "rc")
    bgemm = te.compute(
        (alpha, alpha, ntile, co),
        lambda e, u, p, o: te.sum(data_pack[e, u, p, rc] * kpack[e, u, rc, o], axis=rc),
        name="wino_bgemm",
    )
    ia = te.reduce_axis((0, alpha), "ia")
    ib = te.reduce_axis((0, alpha), "ib")
    inverse = te.compute(
        (ntile, m, m, co),
        lambda p, vh, vw, o: te.sum(bgemm[ia, ib, p, o] * a_mat[ia, vh] * a_mat[ib, vw], axis=[ia, ib]),
        name="wino_inverse",
    )
    tile = lambda b, o, y, x: inverse[(b * nh + y // m) * nw + x // m, y % m, x % m, o]  # noqa: E731
    if block:
        return te.compute((n, co // block, oh, ow, block),
                          lambda b, ob, y, x, oi: tile(b, ob * block + oi, y, x), name="wino_output")
    return te.compute((n, co, oh, ow), tile, name="wino_output")


def _const(mat: np.ndarray, name: str) -> te.Tensor:
    """A small constant matrix as a select chain (folds to constants once its loops are unrolled)."""
    rows, cols = mat.shape

    def at(i, j):
        val = tirx.const(0.0, "float32")
        for r in range(rows):
            for k in range(cols):
                if mat[r, k] != 0:
                    val = tirx.Select(tirx.all(i == r, j == k), tirx.const(float(mat[r, k]), "float32"), val)
        return val

    return te.compute((rows, cols), at, name=name)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, tile: int | None, force: bool):
        super().__init__(mod)
        self.tile, self.force = tile, force
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)):
            return call
        bound = bound_constant(self, call.args[1])
        if bound is not None and not bound.same_as(call.args[1]):  # a weight relaid out at compile time (blocked.py)
            call = relax.Call(call.op, [call.args[0], bound], call.attrs, call.ty_args)
        why = eligible(call, cost_model=not self.force)
        if why is not None:
            log.debug("conv2d %s stays direct: %s", call.args[1].ty.shape, why)
            return call
        x, w = call.args
        pads = [int(p) for p in call.attrs.padding]
        block = blocked_layouts(call) or 0
        weight = oihw(w.value.numpy(), block)
        c, o = weight.shape[1], weight.shape[0]
        shape = _nchw_shape([int(d) for d in x.ty.shape], block)
        m = self.tile or choose_tile(*_out_hw(shape, pads), min(c, o), shape[0]) or 2
        kpack = relax.const(weight_transform(weight, m))
        self.rewritten += 1
        return self.builder_.call_te(winograd_te, x, kpack, pads, m, block, primfunc_name_hint="winograd_conv2d")


def enabled() -> bool:
    """Off with ``GRAPHOPT_WINOGRAD=0`` (the direct conv schedules then take every conv)."""
    return os.environ.get("GRAPHOPT_WINOGRAD", "1") != "0"


def rewrite_winograd(mod, tile: int | None = None, *, force: bool = False):
    """Every eligible conv2d of ``mod`` as Winograd F(tile, 3) (``tile`` None: ``choose_tile``).

    Unchanged when ``enabled()`` is false; ``force``: ignore that and the cost model (every conv
    Winograd can compute; for tests and measurements).
    """
    if not (force or enabled()):
        return mod
    rw = _Rewriter(mod, tile, force)
    new = rewrite_relax_functions(mod, rw)
    return new if rw.rewritten else mod


def schedule_winograd(func: tirx.PrimFunc, ctx: RuleContext) -> s_tir.Schedule | None:
    """The Winograd stages of a fused function; None when ``func`` has none."""
    sch = s_tir.Schedule(func)
    blocks = {n: get_block(sch, n) for n in BLOCKS}
    if any(b is None for b in blocks.values()):
        return None
    feats = ctx.feats
    for name in ("wino_A", "wino_B"):
        if (b := get_block(sch, name)) is not None:
            sch.compute_inline(b)
    lanes = feats.lanes(32)
    # input transform: per (tile, channel vector), all a x a outputs from the a x a patch, unrolled;
    # one output row at a time (a accumulators live, not a²: 7-35% faster than a² on 64@56..256@14)
    dp = blocks["wino_data_pack"]
    e, u, p, ci, ra, rb = sch.get_loops(dp)
    cv = (int_extent(sch, ci) or 0) % lanes == 0
    co_, cin = sch.split(ci, [None, lanes]) if cv else (ci, None)
    sch.reorder(p, co_, e, ra, rb, u, *([cin] if cv else []))
    wb = sch.cache_write(dp, 0, "local")
    sch.reverse_compute_at(wb, co_, preserve_unit_loops=True)
    parallelize_outer(sch, [p, co_], 1 << 30, feats)
    for lp in (ra, rb, e, u):
        sch.unroll(lp)
    if cv:
        sch.vectorize(cin)
    init = sch.decompose_reduction(dp, ra)
    for b in (init, wb):
        _try(sch.vectorize, sch.get_loops(b)[-1])
    # the GEMMs
    apply_contraction(sch, blocks["wino_bgemm"], feats, knobs=ctx.knobs)
    # output transform: per tile, vector over output channels
    inv = blocks["wino_inverse"]
    p, vh, vw, o, ia, ib = sch.get_loops(inv)
    oo, oi = sch.split(o, [None, lanes]) if (int_extent(sch, o) or 0) % lanes == 0 else (o, None)
    if oi is None:
        sch.reorder(p, vh, vw, o, ia, ib)
        parallelize_outer(sch, [p], 1 << 30, feats)
    else:
        _schedule_inverse(sch, inv, p, oo, oi, (ia, ib, vh, vw), feats)
    _schedule_output(sch, feats)
    return sch


def _schedule_inverse(sch, inv, p, oo, oi, inner, feats) -> None:
    """Per (tile, channel vector): the m x m output vectors stay in registers."""
    ia = inner[0]
    sch.reorder(p, oo, *inner, oi)
    wb = sch.cache_write(inv, 0, "local")
    sch.reverse_compute_at(wb, oo, preserve_unit_loops=True)
    parallelize_outer(sch, [p, oo], 1 << 30, feats)
    for lp in inner:
        sch.unroll(lp)
    sch.vectorize(oi)
    init = sch.decompose_reduction(inv, ia)
    for b in (init, wb):
        _try(sch.vectorize, sch.get_loops(b)[-1])


def _schedule_output(sch, feats) -> None:
    """Tiles back to NCHW with the epilogue (bias, relu) inlined, blocked so reads stay in L1.

    Loops (n, channel block, row, channel, column): the channels of one block share the cache
    lines of ``wino_inverse`` (channels innermost there), so each line is read once, not once per
    channel (25% of a 64@56 conv's time before).
    """
    out = get_block(sch, "wino_output")
    if out is None:
        return
    _inline_epilogue(sch, out)
    loops = sch.get_loops(out)
    if len(loops) == 5:  # NCHW{b}c: channels are already innermost, as in wino_inverse
        parallelize_outer(sch, loops[:3], 1 << 30, feats)
        _try(sch.vectorize, loops[-1])
        return
    b, o, y, x = loops
    lanes = feats.lanes(32)
    ob = max(d for d in divisors(int_extent(sch, o) or 1) if d <= lanes)
    oo, oi = sch.split(o, [None, ob])
    xv = max(d for d in divisors(int_extent(sch, x) or 1) if d <= lanes)
    xo, xi = sch.split(x, [None, xv])
    sch.reorder(b, oo, y, oi, xo, xi)
    parallelize_outer(sch, [b, oo, y], 1 << 30, feats)
    _try(sch.vectorize, xi)

"""Fused attention as one TIR kernel: softmax(Q·Kᵀ·scale + Mask)·V without the score matrix.

``attention_kernel`` writes the kernel for one set of static dims (batch, heads, head dims, which mask
dims broadcast); the sequence lengths ``sq`` (queries) and ``skv`` (keys) stay symbolic in it, so the
same code serves static shapes and a symbolic ``--input-shape ...:1,seq``. Per task, ``ROWS`` query
rows of one (batch, head) (tasks run in parallel over batch x heads x row blocks):

* the query rows, times ``scale``, are copied to a local tile (rows past ``sq`` repeat the last row
  and are not written back);
* keys go by blocks of ``KEYS``: scores ``s[ROWS, KEYS] = q·Kᵀ`` as a register tile, vectorized over
  the keys (K is read transposed, ``Kt [B, H, D, skv]``: one key block of one head dim is a vector),
  plus the mask; then the online softmax (running max ``m`` and sum ``l`` per row; the accumulator
  rescaled by ``exp(m_old - m_new)``) and ``acc += p·V`` vectorized over the value dim;
* a last, partial key block (``skv`` not a multiple of ``KEYS``) gives the keys past the end a score
  of -inf; with a static ``skv`` it is as wide as the vectors it needs (Kt padded to whole
  vectors), with a symbolic one it clamps its key index; full blocks carry no bounds check;
* the output row is ``acc / l``.

Head dims are not padded: loops over them go by whole 16-lane vectors and a tail (52 = 3 x 16 + 4),
so Q, V and the output are read and written as the model has them, and V keeps its own key count.

Only a ``ROWS x KEYS`` tile of the scores exists at any time. A static key count up to
``TWO_PASS_KEYS`` takes ``two_pass_kernel`` instead: a task's ``ROWS`` rows of scores are kept whole (in
L1), so each row has one max and one sum, not a running max and a rescale per key block (ViT-S's heads,
6x197x197x64, 1 thread: 0.82 -> 0.61 ms; ONNX Runtime's MatMul/Softmax/MatMul 0.55). A static
query count under ``ROWS`` (a decoder's step) makes the row tile that short: no rows computed for
nothing. ``exp`` is the
Cephes-style polynomial of ``fast_math`` (vector instructions; LLVM's ``exp`` is a library call per
element). The kernels carry ``tirx.is_scheduled``: graphopt's schedule rules leave them as written.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import tvm
from tvm.script import tirx as T

ROWS = 6  # query rows per task: the score tile is ROWS x KEYS, the accumulator ROWS x Dv (24 of 32 vector registers)
KEYS = 64  # keys per block: four 16-lane vectors
VECTOR = 16  # lanes of a vector: head dims go by whole vectors and a tail, the key axis of Kt by whole vectors
TWO_PASS_KEYS = 1024  # static key counts up to this: a task's scores stay in L1 (6 x 1024 x 4 bytes)
LOWEST = -3.4028234663852886e38  # the running max starts at float32's lowest, so exp(m_old - m_new) is 0

# The kernel is CPU code (parallel loops, no thread binding): compile turns it off for GPU targets.
_ENABLED = contextvars.ContextVar("graphopt_fused_attention", default=True)


def fused_attention_enabled() -> bool:
    return _ENABLED.get()


@contextlib.contextmanager
def fused_attention(enabled: bool):
    """Within the block, ``lower_fused_attention`` applies only when ``enabled``."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def fast_exp(x):
    """exp(x) for float32 ``x`` as range reduction and a degree-6 polynomial (TVM's fast_exp scheme);
    arguments below -88.38 give 0 (softmax arguments are <= 0 here)."""
    f32 = "float32"
    x = T.max(T.min(x, T.float32(88.3762626647950)), T.float32(-88.3762626647949))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    p = p * r * r + r + T.float32(1.0)
    two_n = T.reinterpret(f32, T.shift_left(T.Cast("int32", n) + 127, 23))
    return p * two_n


def pieces(n: int) -> tuple[int, int]:
    """A loop of ``n`` lanes as whole vectors and a tail: (number of ``VECTOR``-lane vectors, tail lanes).
    Head dims are not padded: a 52-wide vector loop ran 10x slower than a 64-wide one (LLVM splits an
    odd-sized vector into pieces); three 16-lane vectors and a 4-lane one do not."""
    return n // VECTOR, n % VECTOR


def _row_macros(d: int, dv: int, scale: float):
    """Macros over one row of a head dim, by whole vectors and a tail (``pieces``): ``load_q`` (a query row
    times ``scale`` to the local tile), ``add_v`` (``acc[r] += w · V[key]``), ``store`` (``acc[r] / l``)."""
    nd, td = pieces(d)
    nv, tv = pieces(dv)
    W = VECTOR
    sc = float(scale)

    @T.macro
    def load_q(qs, r, Q, b, h, row):
        for c in T.unroll(nd):
            for e in T.vectorized(W):
                qs[r, c * W + e] = Q[b, h, row, c * W + e] * T.float32(sc)
        if td > 0:
            for e in T.vectorized(td):
                qs[r, nd * W + e] = Q[b, h, row, nd * W + e] * T.float32(sc)

    @T.macro
    def add_v(acc, r, w, V, b, h, key):
        for c in T.unroll(nv):
            for e in T.vectorized(W):
                acc[r, c * W + e] = acc[r, c * W + e] + w * V[b, h, key, c * W + e]
        if tv > 0:
            for e in T.vectorized(tv):
                acc[r, nv * W + e] = acc[r, nv * W + e] + w * V[b, h, key, nv * W + e]

    @T.macro
    def store(O, acc, r, l, b, h, row):
        for c in T.unroll(nv):
            for e in T.vectorized(W):
                O[b, h, row, c * W + e] = acc[r, c * W + e] / l
        if tv > 0:
            for e in T.vectorized(tv):
                O[b, h, row, nv * W + e] = acc[r, nv * W + e] / l

    return load_q, add_v, store


def attention_kernel(batch: int, heads: int, d: int, dv: int, mask: tuple[bool, bool, bool, bool],
                     scale: float, valid: int | None = None, rows: int | None = None) -> tvm.tirx.PrimFunc:
    """The kernel over ``Q [batch, heads, sq, d]``, ``Kt [batch, heads, d, skv]``, ``V [batch, heads,
    skv, dv]`` and the additive mask ``M`` (``mask``: for each of its 4 dims, True = full, False =
    broadcast, size 1; no mask is a [1, 1, 1, 1] zero); output ``O [batch, heads, sq, dv]``, all float32.
    ``valid``: a static key count, the key axis of Kt (and of a mask over keys) padded to whole
    vectors: the last block spans only the vectors it needs and reads contiguously, without the clamped
    index (a gather per vector, the tail block cost ~2.5 full ones); V keeps its ``valid`` keys.
    ``rows``: query rows a task (default ``ROWS``; fewer for a static query count under it)."""
    R, KB = rows or ROWS, KEYS  # read at call time
    f32 = "float32"
    mb, mh, mq, mk = mask
    mbi, mhi, mqi, mki = (int(x) for x in mask)  # index factors: 0 for a broadcast dim
    padded = valid is not None
    tail_width = -(-(valid % KB) // VECTOR) * VECTOR if padded else KB  # the last block's whole vectors
    dvp = dv + -dv % VECTOR  # the accumulator's row: whole vectors
    load_q, add_v, store = _row_macros(d, dv, scale)

    @T.macro
    def key_block(k0, width, vwidth, tail, pred, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h, i0, sq,
                  skv, limit):
        # s = q · Kt[:, k0:k0+width] (+ mask), the keys from ``limit`` on at -inf (``pred``); ``tail``: the
        # key index clamped (a symbolic length: the buffers end at skv); ``vwidth`` rows of V are read
        for r, j in T.grid(R, width):
            s[r, j] = T.float32(0)
        for dd in range(d):
            for r in T.unroll(R):
                for j in T.vectorized(width):
                    if tail:
                        s[r, j] = s[r, j] + qs[r, dd] * KT[b, h, dd, T.min(k0 + j, skv - 1)]
                    else:
                        s[r, j] = s[r, j] + qs[r, dd] * KT[b, h, dd, k0 + j]
        for r in T.unroll(R):
            for j in T.vectorized(width):
                if tail:
                    s[r, j] = s[r, j] + M[b * mbi, h * mhi, T.min(i0 + r, sq - 1) * mqi, T.min(k0 + j, skv - 1) * mki]
                else:
                    s[r, j] = s[r, j] + M[b * mbi, h * mhi, T.min(i0 + r, sq - 1) * mqi, (k0 + j) * mki]
                if pred:
                    s[r, j] = T.Select(k0 + j < limit, s[r, j], T.float32(-float("inf")))
        for r in range(R):
            # the block's max: 16 lanes, then halving
            for c in T.unroll(width // 16):
                for lane in T.vectorized(16):
                    if c == 0:
                        red[lane] = s[r, lane]
                    else:
                        red[lane] = T.max(red[lane], s[r, c * 16 + lane])
            for lane in T.vectorized(8):
                red[lane] = T.max(red[lane], red[lane + 8])
            for lane in T.vectorized(4):
                red[lane] = T.max(red[lane], red[lane + 4])
            for lane in T.vectorized(2):
                red[lane] = T.max(red[lane], red[lane + 2])
            for lane in T.vectorized(1):
                red[lane] = T.max(red[lane], red[lane + 1])
            m_new[0] = T.max(mx[r], red[0])
            alpha[0] = fast_exp(mx[r] - m_new[0])
            mx[r] = m_new[0]
            for j in T.vectorized(width):
                s[r, j] = fast_exp(s[r, j] - m_new[0])
            for c in T.unroll(width // 16):
                for lane in T.vectorized(16):
                    if c == 0:
                        red[lane] = s[r, lane]
                    else:
                        red[lane] = red[lane] + s[r, c * 16 + lane]
            for lane in T.vectorized(8):
                red[lane] = red[lane] + red[lane + 8]
            for lane in T.vectorized(4):
                red[lane] = red[lane] + red[lane + 4]
            for lane in T.vectorized(2):
                red[lane] = red[lane] + red[lane + 2]
            for lane in T.vectorized(1):
                red[lane] = red[lane] + red[lane + 1]
            lsum[r] = lsum[r] * alpha[0] + red[0]
            for e in T.vectorized(dvp):
                acc[r, e] = acc[r, e] * alpha[0]
        for j in range(vwidth):
            for r in T.unroll(R):
                if tail:
                    add_v(acc, r, s[r, j], V, b, h, T.min(k0 + j, skv - 1))
                else:
                    add_v(acc, r, s[r, j], V, b, h, k0 + j)

    @T.prim_func(private=True)
    def kernel(q: T.handle, kt: T.handle, v: T.handle, m: T.handle, o: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        sq = T.int64()
        skv = T.int64()
        Q = T.match_buffer(q, (batch, heads, sq, d), f32)
        KT = T.match_buffer(kt, (batch, heads, d, skv), f32)
        V = T.match_buffer(v, (batch, heads, valid if padded else skv, dv), f32)
        M = T.match_buffer(m, (batch if mb else 1, heads if mh else 1, sq if mq else 1, skv if mk else 1), f32)
        O = T.match_buffer(o, (batch, heads, sq, dv), f32)
        nq = (sq + R - 1) // R
        for task in T.parallel(batch * heads * nq):
            qs = T.decl_buffer((R, d), f32, scope="local")
            s = T.decl_buffer((R, KB), f32, scope="local")
            acc = T.decl_buffer((R, dvp), f32, scope="local")
            mx = T.decl_buffer((R,), f32, scope="local")
            lsum = T.decl_buffer((R,), f32, scope="local")
            red = T.decl_buffer((16,), f32, scope="local")
            m_new = T.decl_buffer((1,), f32, scope="local")
            alpha = T.decl_buffer((1,), f32, scope="local")
            b = task // (heads * nq)
            h = task // nq % heads
            i0 = task % nq * R
            for r in range(R):
                load_q(qs, r, Q, b, h, T.min(i0 + r, sq - 1))
                mx[r] = T.float32(LOWEST)
                lsum[r] = T.float32(0)
                for e in T.vectorized(dvp):
                    acc[r, e] = T.float32(0)
            if padded:  # a static length: Kt (and a mask over keys) padded to whole vectors
                for kb in range(valid // KB):
                    key_block(kb * KB, KB, KB, False, False, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h,
                              i0, sq, skv, skv)
                if valid % KB > 0:
                    key_block(valid // KB * KB, tail_width, valid % KB, False, True, KT, V, M, s, qs, acc, mx, lsum,
                              red, m_new, alpha, b, h, i0, sq, skv, valid)
            else:
                for kb in range(skv // KB):
                    key_block(kb * KB, KB, KB, False, False, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h,
                              i0, sq, skv, skv)
                if skv % KB > 0:
                    key_block(skv // KB * KB, KB, KB, True, True, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha,
                              b, h, i0, sq, skv, skv)
            for r in range(R):
                if i0 + r < sq:
                    store(O, acc, r, lsum[r], b, h, i0 + r)

    return kernel


def two_pass_kernel(batch: int, heads: int, d: int, dv: int, mask: tuple[bool, bool, bool, bool],
                    scale: float, keys: int, valid: int, rows: int | None = None) -> tvm.tirx.PrimFunc:
    """``attention_kernel`` for a static key axis of ``keys`` (a multiple of ``VECTOR``, at most
    ``TWO_PASS_KEYS``; the first ``valid`` real): a task's ``ROWS`` x ``keys`` scores stay in L1, so the
    softmax is exact, one max and one sum a row, with no running max, no rescaled accumulator and no
    ``exp(m_old - m_new)`` per key block. Scores are computed ``KEYS`` at a time in a register tile.
    V holds the ``valid`` keys."""
    R, KB = rows or ROWS, KEYS
    f32 = "float32"
    mb, mh, mq, mk = mask
    mbi, mhi, mqi, mki = (int(x) for x in mask)
    full, tail = keys // KB, keys % KB  # the tail: whole vectors (keys is a multiple of VECTOR)
    chunks = keys // 16
    dvp = dv + -dv % VECTOR
    load_q, add_v, store = _row_macros(d, dv, scale)

    @T.macro
    def halve(red, is_max):
        for lane in T.vectorized(8):
            red[lane] = T.max(red[lane], red[lane + 8]) if is_max else red[lane] + red[lane + 8]
        for lane in T.vectorized(4):
            red[lane] = T.max(red[lane], red[lane + 4]) if is_max else red[lane] + red[lane + 4]
        for lane in T.vectorized(2):
            red[lane] = T.max(red[lane], red[lane + 2]) if is_max else red[lane] + red[lane + 2]
        for lane in T.vectorized(1):
            red[lane] = T.max(red[lane], red[lane + 1]) if is_max else red[lane] + red[lane + 1]

    @T.macro
    def score_block(k0, width, KT, M, t, s, qs, b, h, i0, sq):
        for r, j in T.grid(R, width):
            t[r, j] = T.float32(0)
        for dd in range(d):
            for r in T.unroll(R):
                for j in T.vectorized(width):
                    t[r, j] = t[r, j] + qs[r, dd] * KT[b, h, dd, k0 + j]
        for r in T.unroll(R):
            for j in T.vectorized(width):
                s[r, k0 + j] = T.Select(k0 + j < valid, t[r, j] + M[b * mbi, h * mhi, T.min(i0 + r, sq - 1) * mqi,
                                                               (k0 + j) * mki], T.float32(-float("inf")))

    @T.prim_func(private=True)
    def kernel(q: T.handle, kt: T.handle, v: T.handle, m: T.handle, o: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        sq = T.int64()
        Q = T.match_buffer(q, (batch, heads, sq, d), f32)
        KT = T.match_buffer(kt, (batch, heads, d, keys), f32)
        V = T.match_buffer(v, (batch, heads, valid, dv), f32)
        M = T.match_buffer(m, (batch if mb else 1, heads if mh else 1, sq if mq else 1, keys if mk else 1), f32)
        O = T.match_buffer(o, (batch, heads, sq, dv), f32)
        nq = (sq + R - 1) // R
        for task in T.parallel(batch * heads * nq):
            qs = T.decl_buffer((R, d), f32, scope="local")
            t = T.decl_buffer((R, KB), f32, scope="local")
            s = T.decl_buffer((R, keys), f32, scope="local")
            acc = T.decl_buffer((R, dvp), f32, scope="local")
            lsum = T.decl_buffer((R,), f32, scope="local")
            red = T.decl_buffer((16,), f32, scope="local")
            b = task // (heads * nq)
            h = task // nq % heads
            i0 = task % nq * R
            for r in range(R):
                load_q(qs, r, Q, b, h, T.min(i0 + r, sq - 1))
            for kb in range(full):
                score_block(kb * KB, KB, KT, M, t, s, qs, b, h, i0, sq)
            if tail > 0:
                score_block(full * KB, tail, KT, M, t, s, qs, b, h, i0, sq)
            for r in range(R):
                for lane in T.vectorized(16):
                    red[lane] = s[r, lane]
                for c in range(1, chunks):
                    for lane in T.vectorized(16):
                        red[lane] = T.max(red[lane], s[r, c * 16 + lane])
                halve(red, True)
                for c in range(chunks):
                    for lane in T.vectorized(16):
                        s[r, c * 16 + lane] = fast_exp(s[r, c * 16 + lane] - red[0])
                for lane in T.vectorized(16):
                    red[lane] = s[r, lane]
                for c in range(1, chunks):
                    for lane in T.vectorized(16):
                        red[lane] = red[lane] + s[r, c * 16 + lane]
                halve(red, False)
                lsum[r] = red[0]
            for r, e in T.grid(R, dvp):
                acc[r, e] = T.float32(0)
            for j in range(valid):
                for r in T.unroll(R):
                    add_v(acc, r, s[r, j], V, b, h, j)
            for r in range(R):
                if i0 + r < sq:
                    store(O, acc, r, lsum[r], b, h, i0 + r)

    return kernel


# ---------------------------------------------------------------- lowering


def _same_dim(a, b) -> bool:
    if isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm):
        return int(a) == int(b)
    return bool(tvm.sym.Analyzer().can_prove_equal(a, b))


def _is_one(dim) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == 1


def _mask_flags(mask_dims: list, full: list) -> tuple[bool, ...] | None:
    """For each of the 4 dims, True when the mask spans it and False when it broadcasts; None when a
    dim is neither 1 nor the attention's."""
    flags = []
    for m, f in zip(mask_dims, full):
        if _same_dim(m, f) and not _is_one(m):
            flags.append(True)
        elif _is_one(m):
            flags.append(False)
        else:
            return None
    return tuple(flags)


def lower_fused_attention(ctx, q, k, v, mask, scale: float):
    """``softmax(q·kᵀ·scale + mask)·v`` as one call of ``attention_kernel``, or None where the kernel
    does not apply (turned off: a GPU target; not float32, ranks other than 3 or 4, leading dims that differ or broadcast, a
    boolean mask, a dim that is symbolic where the kernel needs it static)."""
    from tvm import relax

    from graphopt.backends.lowering import helpers

    op = relax.op
    if not _ENABLED.get():
        return None
    if any(helpers.dtype_of(x) != "float32" for x in (q, k, v)) or (
            mask is not None and helpers.dtype_of(mask) != "float32"):
        return None
    ranks = {helpers.rank_of(x) for x in (q, k, v)}
    dims = [helpers.dims_of(x) for x in (q, k, v)]
    if len(ranks) != 1 or ranks.pop() not in (3, 4) or any(d is None for d in dims):
        return None
    three = len(dims[0]) == 3
    if three:
        q, k, v = (ctx.emit(op.expand_dims(x, [0])) for x in (q, k, v))
        dims = [[tvm.tirx.IntImm("int64", 1)] + d for d in dims]
    (b, h, sq, d), (kb, kh, skv, kd), (vb, vh, vs, dv) = dims
    static = (b, h, d, dv)
    if not all(isinstance(x, tvm.tirx.IntImm) for x in static):
        return None
    if not (all(_same_dim(x, y) for x, y in ((b, kb), (b, vb), (h, kh), (h, vh), (d, kd), (skv, vs)))):
        return None
    if mask is None:
        m, flags = helpers.const(np.zeros((1, 1, 1, 1), np.float32), "float32"), (False,) * 4
    else:
        mdims = helpers.dims_of(mask)
        if mdims is None or len(mdims) > 4:
            return None
        one = tvm.tirx.IntImm("int64", 1)
        mdims = [one] * (4 - len(mdims)) + mdims
        flags = _mask_flags(mdims, [b, h, sq, skv])
        if flags is None:
            return None
        m = mask if helpers.rank_of(mask) == 4 else ctx.emit(op.reshape(mask, mdims))
    # head dims stay as they are (the kernels go by whole vectors and a tail); a static key count takes
    # whole key vectors in Kt (no clamped reads), V keeps its keys
    valid = int(skv) if isinstance(skv, tvm.tirx.IntImm) else None
    keys = valid + -valid % VECTOR if valid is not None else None
    if keys is not None and keys != valid:
        k = ctx.emit(op.nn.pad(k, [0, 0] * 2 + [0, keys - valid, 0, 0]))
        if flags[3]:
            m = ctx.emit(op.nn.pad(m, [0, 0] * 3 + [0, keys - valid]))
    kt = ctx.emit(op.permute_dims(k, [0, 1, 3, 2]))
    dims = (int(b), int(h), int(d), int(dv), flags, scale)
    rows = min(ROWS, int(sq)) if isinstance(sq, tvm.tirx.IntImm) else None  # fewer queries: a shorter tile
    if valid is not None and valid <= TWO_PASS_KEYS:
        kernel = two_pass_kernel(*dims, keys, valid, rows)
    else:
        kernel = attention_kernel(*dims, valid if valid is not None and valid % KEYS else None, rows)
    gv = ctx.bb.add_func(kernel, "flash_attention")
    out = ctx.emit(relax.call_tir(gv, [q, kt, v, m], relax.TensorType([b, h, sq, int(dv)], "float32")))
    return ctx.emit(op.squeeze(out, [0])) if three else out

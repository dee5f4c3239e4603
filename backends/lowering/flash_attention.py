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
  of -inf; with a static ``skv`` it is as wide as the vectors it needs (K and V padded to whole
  vectors), with a symbolic one it clamps its key index; full blocks carry no bounds check;
* the output row is ``acc / l``.

Only a ``ROWS x KEYS`` tile of the scores exists at any time. A static key count up to
``TWO_PASS_KEYS`` takes ``two_pass_kernel`` instead: a task's ``ROWS`` rows of scores are kept whole (in
L1), so each row has one max and one sum, not a running max and a rescale per key block (ViT-S's heads,
6x197x197x64, 1 thread: 0.82 -> 0.61 ms; ONNX Runtime's MatMul/Softmax/MatMul 0.55). ``exp`` is the
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
VECTOR = 16  # head dims are padded to a multiple of this many lanes
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


def attention_kernel(batch: int, heads: int, d: int, dv: int, mask: tuple[bool, bool, bool, bool],
                     scale: float, valid: int | None = None) -> tvm.tirx.PrimFunc:
    """The kernel over ``Q [batch, heads, sq, d]``, ``Kt [batch, heads, d, skv]``, ``V [batch, heads,
    skv, dv]`` and the additive mask ``M`` (``mask``: for each of its 4 dims, True = full, False =
    broadcast, size 1; no mask is a [1, 1, 1, 1] zero); output ``O [batch, heads, sq, dv]``, all float32.
    ``valid``: a static key count, the key axis of Kt, V (and of a mask over keys) padded to whole
    vectors: the last block spans only the vectors it needs and reads contiguously, without the clamped
    index (a gather per vector, the tail block cost ~2.5 full ones)."""
    R, KB = ROWS, KEYS  # read at call time
    f32 = "float32"
    scale_c = float(scale)
    mb, mh, mq, mk = mask
    mbi, mhi, mqi, mki = (int(x) for x in mask)  # index factors: 0 for a broadcast dim
    padded = valid is not None
    tail_width = -(-(valid % KB) // VECTOR) * VECTOR if padded else KB  # the last block's whole vectors

    @T.macro
    def key_block(k0, width, tail, pred, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h, i0, sq, skv, limit):
        # s = q · Kt[:, k0:k0+width] (+ mask), the keys from ``limit`` on at -inf (``pred``); ``tail``: the
        # key index clamped (a symbolic length: the buffers end at skv)
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
            for e in T.vectorized(dv):
                acc[r, e] = acc[r, e] * alpha[0]
        for j in range(width):
            for r in T.unroll(R):
                for e in T.vectorized(dv):
                    if tail:
                        acc[r, e] = acc[r, e] + s[r, j] * V[b, h, T.min(k0 + j, skv - 1), e]
                    else:
                        acc[r, e] = acc[r, e] + s[r, j] * V[b, h, k0 + j, e]

    @T.prim_func(private=True)
    def kernel(q: T.handle, kt: T.handle, v: T.handle, m: T.handle, o: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        sq = T.int64()
        skv = T.int64()
        Q = T.match_buffer(q, (batch, heads, sq, d), f32)
        KT = T.match_buffer(kt, (batch, heads, d, skv), f32)
        V = T.match_buffer(v, (batch, heads, skv, dv), f32)
        M = T.match_buffer(m, (batch if mb else 1, heads if mh else 1, sq if mq else 1, skv if mk else 1), f32)
        O = T.match_buffer(o, (batch, heads, sq, dv), f32)
        nq = (sq + R - 1) // R
        for task in T.parallel(batch * heads * nq):
            qs = T.decl_buffer((R, d), f32, scope="local")
            s = T.decl_buffer((R, KB), f32, scope="local")
            acc = T.decl_buffer((R, dv), f32, scope="local")
            mx = T.decl_buffer((R,), f32, scope="local")
            lsum = T.decl_buffer((R,), f32, scope="local")
            red = T.decl_buffer((16,), f32, scope="local")
            m_new = T.decl_buffer((1,), f32, scope="local")
            alpha = T.decl_buffer((1,), f32, scope="local")
            b = task // (heads * nq)
            h = task // nq % heads
            i0 = task % nq * R
            for r in range(R):
                for dd in T.vectorized(d):
                    qs[r, dd] = Q[b, h, T.min(i0 + r, sq - 1), dd] * T.float32(scale_c)
                mx[r] = T.float32(LOWEST)
                lsum[r] = T.float32(0)
                for e in T.vectorized(dv):
                    acc[r, e] = T.float32(0)
            if padded:  # a static length: K, V (and a mask over keys) padded to whole blocks
                for kb in range(valid // KB):
                    key_block(kb * KB, KB, False, False, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h, i0,
                              sq, skv, skv)
                if valid % KB > 0:
                    key_block(valid // KB * KB, tail_width, False, True, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b,
                              h, i0, sq, skv, valid)
            else:
                for kb in range(skv // KB):
                    key_block(kb * KB, KB, False, False, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h, i0,
                              sq, skv, skv)
                if skv % KB > 0:
                    key_block(skv // KB * KB, KB, True, True, KT, V, M, s, qs, acc, mx, lsum, red, m_new, alpha, b, h,
                              i0, sq, skv, skv)
            for r in range(R):
                if i0 + r < sq:
                    for e in T.vectorized(dv):
                        O[b, h, i0 + r, e] = acc[r, e] / lsum[r]

    return kernel


def two_pass_kernel(batch: int, heads: int, d: int, dv: int, mask: tuple[bool, bool, bool, bool],
                    scale: float, keys: int, valid: int) -> tvm.tirx.PrimFunc:
    """``attention_kernel`` for a static key axis of ``keys`` (a multiple of ``VECTOR``, at most
    ``TWO_PASS_KEYS``; the first ``valid`` real): a task's ``ROWS`` x ``keys`` scores stay in L1, so the
    softmax is exact, one max and one sum a row, with no running max, no rescaled accumulator and no
    ``exp(m_old - m_new)`` per key block. Scores are computed ``KEYS`` at a time in a register tile."""
    R, KB = ROWS, KEYS
    f32 = "float32"
    scale_c = float(scale)
    mb, mh, mq, mk = mask
    mbi, mhi, mqi, mki = (int(x) for x in mask)
    full, tail = keys // KB, keys % KB  # the tail: whole vectors (keys is a multiple of VECTOR)
    chunks = keys // 16

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

    @T.prim_func(private=True)
    def kernel(q: T.handle, kt: T.handle, v: T.handle, m: T.handle, o: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        sq = T.int64()
        Q = T.match_buffer(q, (batch, heads, sq, d), f32)
        KT = T.match_buffer(kt, (batch, heads, d, keys), f32)
        V = T.match_buffer(v, (batch, heads, keys, dv), f32)
        M = T.match_buffer(m, (batch if mb else 1, heads if mh else 1, sq if mq else 1, keys if mk else 1), f32)
        O = T.match_buffer(o, (batch, heads, sq, dv), f32)
        nq = (sq + R - 1) // R
        for task in T.parallel(batch * heads * nq):
            qs = T.decl_buffer((R, d), f32, scope="local")
            t = T.decl_buffer((R, KB), f32, scope="local")
            s = T.decl_buffer((R, keys), f32, scope="local")
            acc = T.decl_buffer((R, dv), f32, scope="local")
            lsum = T.decl_buffer((R,), f32, scope="local")
            red = T.decl_buffer((16,), f32, scope="local")
            b = task // (heads * nq)
            h = task // nq % heads
            i0 = task % nq * R
            for r in range(R):
                for dd in T.vectorized(d):
                    qs[r, dd] = Q[b, h, T.min(i0 + r, sq - 1), dd] * T.float32(scale_c)
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
            for r, e in T.grid(R, dv):
                acc[r, e] = T.float32(0)
            for j in range(keys):
                for r in T.unroll(R):
                    for e in T.vectorized(dv):
                        acc[r, e] = acc[r, e] + s[r, j] * V[b, h, j, e]
            for r in range(R):
                if i0 + r < sq:
                    for e in T.vectorized(dv):
                        O[b, h, i0 + r, e] = acc[r, e] / lsum[r]

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
    # head dims padded with zeros to whole vectors (a 52-wide vector loop ran 10x slower than a 64-wide
    # one: LLVM splits it into pieces); zero columns change no score and give zero output columns
    d_pad, dv_pad = -int(d) % VECTOR, -int(dv) % VECTOR
    if d_pad:
        q, k = (ctx.emit(op.nn.pad(x, [0, 0] * 3 + [0, d_pad])) for x in (q, k))
    if dv_pad:
        v = ctx.emit(op.nn.pad(v, [0, 0] * 3 + [0, dv_pad]))
    valid = int(skv) if isinstance(skv, tvm.tirx.IntImm) else None
    if valid is not None and valid % VECTOR:  # whole key vectors: no clamped reads
        pad = -valid % VECTOR
        k, v = (ctx.emit(op.nn.pad(x, [0, 0] * 2 + [0, pad, 0, 0])) for x in (k, v))
        if flags[3]:
            m = ctx.emit(op.nn.pad(m, [0, 0] * 3 + [0, pad]))
    kt = ctx.emit(op.permute_dims(k, [0, 1, 3, 2]))
    dims = (int(b), int(h), int(d) + d_pad, int(dv) + dv_pad, flags, scale)
    if valid is not None and valid <= TWO_PASS_KEYS:
        kernel = two_pass_kernel(*dims, valid + -valid % VECTOR, valid)
    else:
        kernel = attention_kernel(*dims, valid if valid is not None and valid % KEYS else None)
    gv = ctx.bb.add_func(kernel, "flash_attention")
    out = ctx.emit(relax.call_tir(gv, [q, kt, v, m], relax.TensorType([b, h, sq, int(dv) + dv_pad], "float32")))
    if dv_pad:
        out = ctx.emit(op.strided_slice(out, axes=[3], begin=[0], end=[int(dv)]))
    return ctx.emit(op.squeeze(out, [0])) if three else out

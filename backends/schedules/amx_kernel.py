"""A float32 convolution on AMX tiles in three bfloat16 products (x86 with AMX-BF16).

Each float32 value ``v`` is split into ``hi = bf16(v)`` and ``lo = bf16(v - hi)``; ``v·w`` is then
``hi·hi + hi·lo + lo·hi`` (the ``lo·lo`` term, ~2⁻¹⁶ of the product, is dropped), each product a
``tdpbf16ps`` that multiplies a 16x32 bfloat16 tile by a 32x16 one into 16x16 float32 sums. The
result is within ~1e-5 relative of a float32 conv (the accumulation is float32 throughout).

What it buys, measured on a 2-core AMX Xeon VM: one core's AMX unit does 12 products in 85 ns
(2300 GFLOP/s in bfloat16) when the host is quiet, against 130 GFLOP/s for its AVX-512 FMAs; with
the tile loads they need (10 per 12 products, from L1) three products leave about 720 GFLOP/s of
float32 work per core. The unit is shared with the host's other tenants: in busy minutes the same
loop took 2-4x as long, while the FMAs held their rate.

``amx_conv_func`` returns one PrimFunc of two loop nests (or one, banded), written out here rather
than scheduled:

* the split: the NCHW16c input, zero-padded, becomes ``[2 (hi, lo), C/32, rows, 32]`` bfloat16 bits,
  a row per position of the padded grid (a 1x1 strided conv gathers its positions here), so the
  16 rows of an A tile are 16 consecutive grid positions, 1 KB in one piece. On a large grid
  (``use_bands``) each thread instead splits a band of rows, a few hundred KB, into a buffer of its
  own just before the products that read it, so the split input stays in its L2;
* the products: per 32 output channels x 32 grid positions, four accumulator tiles over every
  (tap, 32 input channels, product); a tap of a 3x3 conv is an offset of ``ky·GW + kx`` rows into the
  split input (positions past the row's end compute sums that the epilogue drops); then the
  epilogue (``Epilogue``: elementwise steps over per-channel constants, the residual and earlier
  values, e.g. bias, residual and relu, or a hardswish) on the way out to NCHW16c;
* the work: items (bands, or pairs of output blocks x ranges of tile pairs), at least
  ``ITEMS_PER_THREAD`` a thread. Each thread runs its own range of items, then takes what is left of
  the others' from their ends, flagging each item it takes. On a shared host one core often runs at
  half speed for seconds (slowed by the host's other tenants); with fixed ranges every conv
  then waited for the slow core (ResNet-50, same-run A/B in such minutes: 0.83-0.94 of ORT with fixed
  ranges, 0.62-0.84 with taking). Two threads may take the same item at the same moment; both then
  compute it and store the same values (an item only stores final outputs), so that race is benign.

The weight is split and packed once, at compile time (``pack_weight``): ``[O/16, taps, C/32, 2, 16,
16, 2]``, tile rows being pairs of input channels as ``tdpbf16ps`` reads them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from graphopt.backends.bundle.loader import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA
from graphopt.backends.lowering.nan_minmax import tir_max, tir_min

TILE = 16  # rows of a tile; a row holds 32 bfloat16 (64 bytes)
K_TILE = 32  # input channels per tile


def bf16_split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (float32) → (hi, lo) as bfloat16 bits (uint16), hi rounded to nearest even."""
    hi = _to_bf16_bits(a)
    rest = a.astype(np.float32) - (hi.astype(np.uint32) << 16).view(np.float32)
    return hi, _to_bf16_bits(rest)


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def pack_weight(w: np.ndarray) -> np.ndarray:
    """OIHW float32 ``[O, C, k, k]`` → ``[O/16, k·k, C/32, 2, 16, 16, 2]`` bits: per (output block,
    tap, input tile, hi/lo) one tile, ``[pair of input channels, output channel, which of the pair]``."""
    o, c, kh, kw = w.shape
    hi, lo = bf16_split(w)
    both = np.stack([hi, lo])  # [2, O, C, kh, kw]
    t = both.reshape(2, o // TILE, TILE, c // K_TILE, K_TILE // 2, 2, kh * kw)
    # axes: sel, ob, n, kc, kp, pair, tap -> ob, tap, kc, sel, kp, n, pair
    return np.ascontiguousarray(t.transpose(1, 6, 3, 0, 4, 2, 5))


def _bf16_bits(v):
    """The bfloat16 nearest to float32 ``v`` (ties to even), as uint32 bits in the low half."""
    u = tirx.reinterpret("uint32", v)
    one, sixteen = tirx.const(1, "uint32"), tirx.const(16, "uint32")
    return (u + tirx.const(0x7FFF, "uint32") + ((u >> sixteen) & one)) >> sixteen


def _bf16_rest(v):
    """``v`` minus its nearest bfloat16."""
    return v - tirx.reinterpret("float32", _bf16_bits(v) << tirx.const(16, "uint32"))


def geometry(h: int, w: int, k: int, stride: int, pad: int) -> dict[str, int]:
    """Grid width and height, phases, output size, tiles and split rows of a conv over ``h x w``.

    A strided kxk conv reads ``stride²`` phase grids (the padded input's even/odd rows and columns
    for stride 2): tap (ky, kx) reads phase (ky % s, kx % s) shifted by (ky // s, kx // s).
    """
    if k == 1:
        oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
        gw, gh, phases, reach = ow, oh, 1, 0
    else:
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        gw, gh = math.ceil((w + 2 * pad) / stride), math.ceil((h + 2 * pad) / stride)
        phases, reach = stride * stride, (k - 1) // stride
    qt = 2 * math.ceil(oh * gw / (2 * TILE))  # tiles of grid positions, an even number
    rows = qt * TILE + reach * gw + reach
    return {"oh": oh, "ow": ow, "gw": gw, "gh": gh, "phases": phases, "qt": qt, "rows": rows}


_STEPS = {  # the elementwise ops an epilogue applies, on float32 lanes
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "maximum": tir_max,  # NaN from either operand, as ORT's Max (a constant goes first: one vmaxps)
    "minimum": tir_min,
    "relu": lambda a, _: tir_max(tirx.const(0, "float32"), a),  # max(0, NaN) is NaN, as ORT's Relu
}


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What the kernel does to each sum on its way out: ``steps`` in order, each ``(op, a, b)`` with op
    a key of ``_STEPS`` and operands ``("v", i)`` (value ``i``: 0 is the conv's sum, ``i`` the result
    of step ``i - 1``), ``("c", j)`` (per-channel constant ``j``), ``("r",)`` (the residual tensor)
    or None (a unary op's second). The result is the last value."""

    steps: tuple = ()

    @property
    def constants(self) -> int:
        return 1 + max((o[1] for _, a, b in self.steps for o in (a, b) if o and o[0] == "c"), default=-1)

    @property
    def residual(self) -> bool:
        return any(o == ("r",) for _, a, b in self.steps for o in (a, b))

    def apply(self, s, constant, residual):
        """The epilogue of sum ``s``: ``constant(j)`` and ``residual()`` load the operands."""
        vals = [s]

        def operand(o):
            return None if o is None else vals[o[1]] if o[0] == "v" else constant(o[1]) if o[0] == "c" else residual()
        for op, a, b in self.steps:
            vals.append(_STEPS[op](operand(a), operand(b)))
        return vals[-1]

    @staticmethod
    def bias(residual: bool = False, relu: bool = False) -> "Epilogue":
        """Bias (constant 0), then the residual, then a relu."""
        steps = [("add", ("v", 0), ("c", 0))]
        if residual:
            steps.append(("add", ("v", len(steps)), ("r",)))
        if relu:
            steps.append(("relu", ("v", len(steps)), None))
        return Epilogue(tuple(steps))


def amx_conv_func(c: int, h: int, w: int, o: int, k: int, stride: int, pad: int, *,
                  epilogue: Epilogue, threads: int, banded: bool | None = None):
    """The PrimFunc ``(x, wp, consts, [residual], out)`` for a batch-1 NCHW16c conv followed by
    ``epilogue``; ``consts`` ``[max(1, epilogue.constants), O/16, 16]`` holds its per-channel constants.

    Needs ``c`` and ``o`` multiples of 32; ``k`` 1 (any stride, no padding) or odd with stride 1 or 2.

    ``banded`` (default: ``use_bands``): each thread splits a band of grid rows into a buffer of its
    own, L2-sized, and runs every output channel over it before the next band, instead of one split
    pass over the whole input before the products. On a large grid the split input then never
    leaves the thread's L2; on a small one, threads share the split and divide the output channels.
    """
    g = geometry(h, w, k, stride, pad)
    oh, ow, gw, qt, rows = g["oh"], g["ow"], g["gw"], g["qt"], g["rows"]
    grid_h, phases = g["gh"], g["phases"]
    ps = stride if k > 1 else 1  # the phase grids' stride
    kc_n, ob_n, taps = c // K_TILE, o // TILE, k * k
    flops = 2 * c * o * taps * oh * ow  # of the float32 conv (the three products do 3x the multiply-adds)
    grid_rows = grid_h * gw
    halo = rows - qt * TILE  # rows a tap reaches past a tile pair's 32
    banded = use_bands(qt, threads) if banded is None else banded
    n_consts = max(1, epilogue.constants)

    if k > 1:  # the padded input, row by row (per phase grid)
        def padded(ph, gy, gx):
            return gy * ps + ph // ps - pad, gx * ps + ph % ps - pad

        def inside(ph, gy, gx):
            y, x_ = padded(ph, gy, gx)
            return tirx.all(y >= 0, y < h, x_ >= 0, x_ < w)

        def source(ph, gy, gx):
            y, x_ = padded(ph, gy, gx)
            return tirx.min(tirx.max(y, 0), h - 1), tirx.min(tirx.max(x_, 0), w - 1)
    else:  # the positions a 1x1 conv reads
        inside = lambda ph, gy, gx: tirx.const(True, "bool")  # noqa: E731
        source = lambda ph, gy, gx: (gy * stride, gx * stride)  # noqa: E731

    # K in blocks whose weights stay in L1 (48 KB: 8 (tap, input tile) pairs of 4 KB each) while the
    # tile pairs pass; the sums between K blocks go to a buffer of the thread's own (allocated inside
    # the parallel loop: one allocated outside and indexed by thread gave wrong sums once)
    ob_pairs = ob_n // 2
    kblk = max(1, 8 // taps)
    k_blocks = math.ceil(kc_n / kblk)
    tq = qt // 2  # tile pairs
    if banded:  # work items: bands of tile pairs, each of at most BAND_BYTES of split input
        per_thread = math.ceil(tq / threads)
        bands = max(ITEMS_PER_THREAD, math.ceil(per_thread * _pair_bytes(c, phases) / BAND_BYTES))
        qpairs = math.ceil(per_thread / bands)
        work, buf_rows = math.ceil(tq / qpairs), qpairs * 32 + halo
    else:  # work items: (pair of output blocks, range of tile pairs); one split pass first
        q_ranges = max(1, min(tq, math.ceil(ITEMS_PER_THREAD * threads / ob_pairs)))
        qpairs = math.ceil(tq / q_ranges)
        work = ob_pairs * q_ranges
        split_work = kc_n * grid_h * phases  # (grid row, phase, input tile): a thread splits whole rows
        split_chunk = math.ceil(split_work / threads)
    chunk = math.ceil(work / threads)  # each thread's own range of items
    nthreads = math.ceil(work / chunk)

    def phase(tap):  # the phase grid a tap reads
        return tap // k % ps * ps + tap % k % ps

    def shift(tap):  # the rows a tap's A tile starts past its tile pair's first
        return tap // k // ps * gw + tap % k // ps

    def apply_epilogue(s, ec, res, ob, y, xx, lane):
        return epilogue.apply(s, lambda j: ec[j, ob, lane], lambda: res[0, ob, y, xx, lane])

    @T.macro
    def split_row(x, dst, ph, kc, row, q):
        """Grid position ``q`` of phase grid ``ph``, input tile ``kc`` -> ``dst[:, ph, kc, row, :]``."""
        for jb in range(2):
            # the bits as one expression each (a scalar bound in a vectorized loop is no vector)
            if q < grid_rows and inside(ph, q // gw, q % gw):
                for ji in T.vectorized(16):
                    dst[0, ph, kc, row, jb * 16 + ji] = T.Cast("uint16", _bf16_bits(
                        x[0, kc * 2 + jb, *source(ph, q // gw, q % gw), ji]))
                    dst[1, ph, kc, row, jb * 16 + ji] = T.Cast("uint16", _bf16_bits(
                        _bf16_rest(x[0, kc * 2 + jb, *source(ph, q // gw, q % gw), ji])))
            else:
                for ji in T.vectorized(16):
                    dst[0, ph, kc, row, jb * 16 + ji] = T.uint16(0)
                    dst[1, ph, kc, row, jb * 16 + ji] = T.uint16(0)

    @T.macro
    def tile_pair(sp, wp, ec, res, out, part, acc, row0, q0, obp, kb, slot):
        """32 positions (split rows from ``row0``, grid positions from ``q0``) x output blocks
        ``2·obp``, ``2·obp + 1``: the products of K block ``kb``, then its partial sums to ``part``
        (slot ``slot``) or, after the last K block, the epilogue to ``out``."""
        if kb == 0:
            T.evaluate(_zero(0))
            T.evaluate(_zero(1))
            T.evaluate(_zero(2))
            T.evaluate(_zero(3))
        else:
            T.evaluate(_load(0, T.address_of(part[slot * 1024 + 0]), 128))
            T.evaluate(_load(1, T.address_of(part[slot * 1024 + 16]), 128))
            T.evaluate(_load(2, T.address_of(part[slot * 1024 + 512]), 128))
            T.evaluate(_load(3, T.address_of(part[slot * 1024 + 528]), 128))
        for kc, tap in T.grid(T.min(kblk, kc_n - kb * kblk), taps):
            # hi·hi and hi·lo share the hi input tiles; lo·hi reloads the hi weights
            for sel in range(2):
                if sel == 0:
                    T.evaluate(_load(4, T.address_of(sp[0, phase(tap), kb * kblk + kc, row0 + shift(tap), 0]), 64))
                    T.evaluate(_load(5, T.address_of(sp[0, phase(tap), kb * kblk + kc, row0 + shift(tap) + 16, 0]), 64))
                T.evaluate(_load(6, T.address_of(wp[obp * 2, tap, kb * kblk + kc, sel, 0, 0, 0]), 64))
                T.evaluate(_load(7, T.address_of(wp[obp * 2 + 1, tap, kb * kblk + kc, sel, 0, 0, 0]), 64))
                T.evaluate(_dot(0))
                T.evaluate(_dot(1))
                T.evaluate(_dot(2))
                T.evaluate(_dot(3))
            T.evaluate(_load(4, T.address_of(sp[1, phase(tap), kb * kblk + kc, row0 + shift(tap), 0]), 64))
            T.evaluate(_load(5, T.address_of(sp[1, phase(tap), kb * kblk + kc, row0 + shift(tap) + 16, 0]), 64))
            T.evaluate(_load(6, T.address_of(wp[obp * 2, tap, kb * kblk + kc, 0, 0, 0, 0]), 64))
            T.evaluate(_load(7, T.address_of(wp[obp * 2 + 1, tap, kb * kblk + kc, 0, 0, 0, 0]), 64))
            T.evaluate(_dot(0))
            T.evaluate(_dot(1))
            T.evaluate(_dot(2))
            T.evaluate(_dot(3))
        if kb < k_blocks - 1:
            T.evaluate(_store(0, T.address_of(part[slot * 1024 + 0]), 128))
            T.evaluate(_store(1, T.address_of(part[slot * 1024 + 16]), 128))
            T.evaluate(_store(2, T.address_of(part[slot * 1024 + 512]), 128))
            T.evaluate(_store(3, T.address_of(part[slot * 1024 + 528]), 128))
        else:
            T.evaluate(_store(0, T.address_of(acc[0, 0, 0]), 64))
            T.evaluate(_store(1, T.address_of(acc[1, 0, 0]), 64))
            T.evaluate(_store(2, T.address_of(acc[2, 0, 0]), 64))
            T.evaluate(_store(3, T.address_of(acc[3, 0, 0]), 64))
            for i, jn, rr in T.grid(2, 2, 16):
                if (q0 + i * 16 + rr) // gw < oh and (q0 + i * 16 + rr) % gw < ow:
                    for l in T.vectorized(16):
                        out[0, obp * 2 + jn, (q0 + i * 16 + rr) // gw, (q0 + i * 16 + rr) % gw, l] = apply_epilogue(
                            acc[i * 2 + jn, rr, l], ec, res,
                            obp * 2 + jn, (q0 + i * 16 + rr) // gw, (q0 + i * 16 + rr) % gw, l)

    @T.macro
    def run_item(x, sp, wp, ec, res, out, part, acc, item):
        """Item ``item``: a band (split, then every output block over it) or an (output block pair,
        range of tile pairs) over the shared split."""
        if banded:
            for ph, kc, r in T.grid(phases, kc_n, T.min(qpairs, tq - item * qpairs) * 32 + halo):
                split_row(x, sp, ph, kc, r, item * qpairs * 32 + r)
            for obp, kb, qp in T.grid(ob_pairs, k_blocks, T.min(qpairs, tq - item * qpairs)):
                tile_pair(sp, wp, ec, res, out, part, acc, qp * 32, (item * qpairs + qp) * 32, obp, kb, qp)
        else:
            for kb, qp in T.grid(k_blocks, T.min(qpairs, tq - item // ob_pairs * qpairs)):
                tile_pair(sp, wp, ec, res, out, part, acc, (item // ob_pairs * qpairs + qp) * 32,
                          (item // ob_pairs * qpairs + qp) * 32, item % ob_pairs, kb, qp)

    @T.prim_func(private=True)
    def conv(x: T.Buffer((1, c // 16, h, w, 16), "float32"),
             wp: T.Buffer((ob_n, taps, kc_n, 2, 16, 16, 2), "uint16"),
             ec: T.Buffer((n_consts, ob_n, 16), "float32"),
             res: T.Buffer((1, ob_n, oh, ow, 16), "float32"),
             out: T.Buffer((1, ob_n, oh, ow, 16), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.flops": flops})
        claimed = T.alloc_buffer((work,), "int32")  # an item's flag: taken by some thread
        for i in range(work):
            claimed[i] = 0
        if not banded:
            sp = T.alloc_buffer((2, phases, kc_n, rows, 32), "uint16")
            for sel, ph, kc, r, j in T.grid(2, phases, kc_n, rows - grid_rows, 32):  # past the grid: zeros
                sp[sel, ph, kc, grid_rows + r, j] = T.uint16(0)
            for th in T.parallel(threads):
                for kcy in range(th * split_chunk, T.min(split_work, th * split_chunk + split_chunk)):
                    for gx in range(gw):
                        split_row(x, sp, kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx,
                                  kcy // (kc_n * phases) * gw + gx)
        for th in T.parallel(nthreads):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            acc = T.alloc_buffer((4, 16, 16), "float32", scope="local")
            part = T.alloc_buffer((qpairs * 1024,), "float32")
            going = T.alloc_buffer((1,), "int32", scope="local")
            if banded:
                sp = T.alloc_buffer((2, phases, kc_n, buf_rows, 32), "uint16")  # this thread's band, split
            tile_config(cfg)
            # its own range forward, then the others' from their ends (a thread slowed by the host's
            # other tenants leaves its last items to the rest): a walk stops at an item already taken
            for s, j in T.grid(nthreads, chunk):
                r = (th + s) % nthreads  # the range walked
                size = T.min(chunk, work - r * chunk)
                if j == 0:
                    going[0] = 1
                if going[0] == 1 and j < size:
                    item = r * chunk + T.Select(s == 0, j, size - 1 - j)
                    if claimed[item] == 0:
                        claimed[item] = 1
                        run_item(x, sp, wp, ec, res, out, part, acc, item)
                    else:
                        going[0] = 0
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return conv if epilogue.residual else _drop_param(conv, "res")


# Work items per thread at least, so that a thread the host slows can leave some to the others
ITEMS_PER_THREAD = 4

# A band's split input (per thread): a few hundred KB stays in a core's L2 beside the weights' K block
BAND_BYTES = 256 * 1024


def _pair_bytes(c: int, phases: int) -> int:
    """Bytes of split input per tile pair (32 rows, hi and lo, every phase and input tile)."""
    return 2 * phases * (c // K_TILE) * 32 * 64


def use_bands(qt: int, threads: int) -> bool:
    """Banded when every thread gets at least four tile pairs: a small grid (14x14 and less) divides
    better by output channels over one shared split (measured: banded 1.03-1.14x as long there)."""
    return qt // 2 >= 4 * threads


@T.macro
def tile_config(cfg):
    """This thread's AMX tile state: the kernel's permission for it, then 8 tiles of 16 rows x 64 bytes."""
    T.evaluate(T.call_extern("int64", "syscall", T.int64(SYS_ARCH_PRCTL), T.int64(ARCH_REQ_XCOMP_PERM),
                             T.int64(XFEATURE_XTILEDATA)))
    for i in range(64):
        cfg[i] = T.uint8(0)
    cfg[0] = T.uint8(1)
    for t in range(8):
        cfg[16 + t * 2] = T.uint8(64)
        cfg[48 + t] = T.uint8(16)
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))


def _int8(v):
    return tirx.const(v, "int8") if isinstance(v, int) else tirx.Cast("int8", v)


def _load(tile, ptr, stride):
    return tirx.call_llvm_intrin("void", "llvm.x86.tileloadd64", _int8(tile), ptr, tirx.const(stride, "int64"))


def _store(tile, ptr, stride):
    return tirx.call_llvm_intrin("void", "llvm.x86.tilestored64", _int8(tile), ptr, tirx.const(stride, "int64"))


def _zero(tile):
    return tirx.call_llvm_intrin("void", "llvm.x86.tilezero", _int8(tile))


def _dot(acc):
    """Accumulator ``acc`` (0-3: A tile acc // 2 in 4-5, B tile acc % 2 in 6-7) += A·B."""
    return tirx.call_llvm_intrin("void", "llvm.x86.tdpbf16ps", _int8(acc), _int8(4 + acc // 2), _int8(6 + acc % 2))


def _drop_param(func, name: str):
    """``func`` without the buffer parameter ``name`` (one its body does not read)."""
    keep = [p for p in func.params if p.name != name]
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)

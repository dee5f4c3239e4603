"""Integer convolutions on CPU dot-product instructions: x86 VNNI (``vpdpbusd``) and Arm ``sdot``.

For targets with an int8 dot product but no AMX-INT8 (``int8_conv.kernel_for``): a QConv/QGemm of
``lowering/qdq.py`` (uint8 activations x int8 weights -> int32, requantized) becomes one PrimFunc,
its products tensorized with TVM's own intrinsics:

* ``vnni``: ``dot_16x4_vnni`` of ``tvm.s_tir.tensor_intrin.x86`` (AVX-512 VNNI ``vpdpbusd``: 4 uint8
  of one position x 16 output channels of 4 int8 each -> 16 int32 sums);
* ``avxvnni``: the same on 256-bit vectors (AVX-VNNI, 8 output channels), registered here as
  ``graphopt_dot_8x4_avxvnni`` (TVM has no 8-lane one);
* ``sdot``: ``dot_4x4_i8i8s32_sdot`` of ``tvm.s_tir.tensor_intrin.arm_cpu`` (Armv8.2 ``+dotprod``:
  4 int8 x 4 output channels). ``sdot`` multiplies int8 by int8, so the gather stores each uint8
  activation as ``x - 128`` (int8) and the weights' share of that shift, ``128·Σw`` per output
  channel, is added to the bias correction at compile time (``Dot.constants``); ``udot`` would
  need uint8 weights and a per-position correction at run time instead.

``qconv_func`` writes the kernel as TIR blocks and schedules it:

* the gather: the NCHW or NHWC input, padded with its zero point, becomes ``[phases, rows, Cp]``
  (a row per position of the padded grid, channels innermost, padded to 4; ``amx_kernel.geometry``:
  a kxk tap is an offset of ``ky·GW + kx`` rows, a strided kernel reads ``stride²`` phase grids);
* the products: per ``QI`` grid positions x ``OBI`` blocks of ``lanes`` output channels, a register
  tile of ``QI·OBI`` accumulators over every (tap, 4 input channels): the 16x4 (8x4, 4x4) block
  tensorized with the intrinsic, the tile unrolled so its sums stay in registers;
* the requantization on the way out, ``lanes`` channels a vector:
  ``clamp(round(float(acc + corr[o]) · mult[o]) + zy, qmin, qmax)``, to NCHW or NHWC.

The weight is packed once, at compile time (``Dot.pack_weight``): ``[Op/lanes, taps, Cp/4, lanes, 4]``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from tvm import s_tir, tirx
from tvm.script import tirx as T

from .amx_kernel import geometry


@dataclasses.dataclass(frozen=True)
class Dot:
    """A dot-product instruction as the kernel uses it."""

    kind: str
    lanes: int  # int32 sums per instruction (output channels)
    dtype: str  # the activations' type in the gathered input ("int8": stored as x - 128)
    accumulators: int  # vector registers a register tile may hold sums in

    @property
    def intrinsic(self) -> str:
        """The registered TensorIntrin the products are tensorized with."""
        return "dot_4x4_i8i8s32_sdot" if self.kind == "sdot" else _vnni_intrin(self.lanes)

    def padded_channels(self, c: int, o: int) -> tuple[int, int]:
        """(input channels padded to 4, output channels padded to whole register tiles)."""
        return math.ceil(c / 4) * 4, tile_blocks(self, o)[1] * self.lanes

    def pack_weight(self, w: np.ndarray) -> np.ndarray:
        """OIHW int8 ``[O, C, kh, kw]`` -> ``[Op/lanes, kh·kw, Cp/4, lanes, 4]`` (zeros past O and C)."""
        o, c, kh, kw = w.shape
        cp, op_ = self.padded_channels(c, o)
        full = np.zeros((op_, cp, kh * kw), np.int8)
        full[:o, :c] = w.reshape(o, c, kh * kw)
        t = full.reshape(op_ // self.lanes, self.lanes, cp // 4, 4, kh * kw)
        return np.ascontiguousarray(t.transpose(0, 4, 2, 1, 3))  # ob, n, c4, j, tap -> ob, tap, c4, n, j

    def constants(self, w: np.ndarray, corr: np.ndarray, mult: np.ndarray):
        """(packed weight, corr, mult) padded to the kernel's output channels; for int8 activations
        ``corr`` also takes ``128·Σw`` (the products of ``x - 128``)."""
        o = w.shape[0]
        _, op_ = self.padded_channels(w.shape[1], o)
        c, m = np.zeros(op_, np.int32), np.zeros(op_, np.float32)
        c[:o], m[:o] = corr, mult
        if self.dtype == "int8":
            c[:o] += 128 * w.reshape(o, -1).astype(np.int32).sum(axis=1)
        return self.pack_weight(w), c, m


def _vnni_intrin(lanes: int) -> str:
    """The name of a ``lanes``x4 uint8 x int8 VNNI intrinsic (``vpdpbusd``): TVM's own ``dot_16x4_vnni``
    where this LLVM takes its operands as int32 vectors, else graphopt's with TVM's description and
    byte-vector operands (LLVM 21 changed ``llvm.x86.avx512.vpdpbusd.*`` to ``<N x i8>`` operands: TVM
    0.27's implementation then fails LLVM's verifier, "Call parameter type does not match")."""
    from tvm.target.codegen import llvm_version_major

    if lanes == 16 and llvm_version_major() < 21:
        return "dot_16x4_vnni"
    return f"graphopt_dot_{lanes}x4_vnni"


DOTS = {
    "vnni": Dot("vnni", 16, "uint8", 24),
    "avxvnni": Dot("avxvnni", 8, "uint8", 12),
    "sdot": Dot("sdot", 4, "int8", 24),
}


def _vnni_pair(lanes: int):
    """(description, implementation) of the ``lanes``x4 VNNI product, byte-vector operands."""
    nbytes = lanes * 4
    llvm = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            a32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), c.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a32, lanes), dtype=f"uint8x{nbytes}"), b.vload([0, 0], dtype=f"int8x{nbytes}"),
                dtype=f"int32x{lanes}")

    if lanes == 16:  # TVM's own description of dot_16x4_vnni
        from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc as desc
    return desc, impl


_REGISTERED: list = []


def _intrinsics(dot: Dot) -> None:
    """Register the intrinsics ``dot`` tensorizes with: TVM's module of them alone (its package's
    ``__init__`` registers every backend's, 45-60 s here: ``tuning.intrinsics``), and graphopt's."""
    import tvm
    from graphopt.backends.tuning.intrinsics import register_for
    from tvm.s_tir import TensorIntrin

    triple = "aarch64-linux-gnu" if dot.kind == "sdot" else "x86_64-linux-gnu"
    register_for(tvm.target.Target({"kind": "llvm", "mtriple": triple}))
    if not _REGISTERED and dot.kind != "sdot":
        for lanes in (16, 8):
            TensorIntrin.register(f"graphopt_dot_{lanes}x4_vnni", *_vnni_pair(lanes), override=True)
        _REGISTERED.append(True)


def tile_blocks(dot: Dot, o: int) -> tuple[int, int]:
    """(output blocks per register tile ``OBI``, output blocks in all, a multiple of ``OBI``): the
    tile of at most 4 blocks that pads ``o`` least, the larger on a tie."""
    nb = math.ceil(o / dot.lanes)
    best = min(range(min(4, nb), 0, -1), key=lambda obi: math.ceil(nb / obi) * obi)
    return best, math.ceil(nb / best) * best


def tile_positions(dot: Dot, obi: int) -> int:
    """Grid positions per register tile: as many as the accumulator registers allow, at most 12."""
    return max(1, min(12, dot.accumulators // obi))


LAYOUTS = ("NCHW", "NHWC")


def qconv_func(dot: Dot, c: int, h: int, w: int, o: int, k: int, stride: int, pad: int, *, zx: int, zy: int,
               qmin: int, qmax: int, out_dtype: str, threads: int, in_layout: str = "NCHW",
               out_layout: str = "NCHW") -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(x, wp, corr, mult, out)`` of a batch-1 uint8 conv (``k``x``k``,
    ``stride``, symmetric ``pad``) and its requantization; ``wp``, ``corr``, ``mult`` as
    ``dot.constants`` makes them."""
    assert in_layout in LAYOUTS and out_layout in LAYOUTS
    _intrinsics(dot)
    g = geometry(h, w, k, stride, pad)
    oh, ow, gw, grid_h, phases = g["oh"], g["ow"], g["gw"], g["gh"], g["phases"]
    ps = stride if k > 1 else 1
    reach = (k - 1) // stride if k > 1 else 0
    lanes, taps = dot.lanes, k * k
    cp, op_ = dot.padded_channels(c, o)
    obi, nb = tile_blocks(dot, o)
    obo, c4 = nb // obi, cp // 4
    qi = tile_positions(dot, obi)
    qt = math.ceil(oh * gw / qi)
    rows = qt * qi + reach * gw + reach
    grid_rows = grid_h * gw
    shifted = dot.dtype == "int8"
    sdt = dot.dtype
    flops = 2 * c * o * taps * oh * ow

    def inside(ph, r, ch):
        """Whether row ``r`` of phase grid ``ph`` and channel ``ch`` lie in the (unpadded) input."""
        gy, gx = r // gw, r % gw
        y, x_ = gy * ps + ph // ps - pad, gx * ps + ph % ps - pad
        if k == 1:
            y, x_ = gy * stride, gx * stride
        return tirx.all(r < grid_rows, ch < c if cp > c else True, y >= 0, y < h, x_ >= 0, x_ < w)

    def source(ph, r, ch):
        gy, gx = r // gw, r % gw
        y, x_ = gy * ps + ph // ps - pad, gx * ps + ph % ps - pad
        if k == 1:
            y, x_ = gy * stride, gx * stride
        y, x_ = tirx.min(tirx.max(y, 0), h - 1), tirx.min(tirx.max(x_, 0), w - 1)
        ch = ch if cp == c else tirx.min(ch, c - 1)
        return (0, ch, y, x_) if in_layout == "NCHW" else (0, y, x_, ch)

    def stored(v):
        """A uint8 activation as the dot product reads it (int8: ``v - 128``)."""
        if not shifted:
            return v
        return T.Cast("int8", T.Cast("int32", v) - 128)

    x_shape = (1, c, h, w) if in_layout == "NCHW" else (1, h, w, c)
    out_shape = (1, o, oh, ow) if out_layout == "NCHW" else (1, oh, ow, o)

    def out_index(ch, q):
        return (0, ch, q // gw, q % gw) if out_layout == "NCHW" else (0, q // gw, q % gw, ch)

    def phase(tap):
        return tap // k % ps * ps + tap % k % ps

    def shift(tap):
        return tap // k // ps * gw + tap % k // ps

    @T.prim_func(s_tir=True, private=True)
    def qconv(x: T.Buffer(x_shape, "uint8"), wp: T.Buffer((nb, taps, c4, lanes, 4), "int8"),
              corr: T.Buffer((op_,), "int32"), mult: T.Buffer((op_,), "float32"), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "graphopt.flops": flops, "graphopt.layouts": f"{in_layout}-{out_layout}"})
        with T.sblock("root"):
            sp = T.sblock_alloc_buffer((phases, rows, cp), sdt)
            acc = T.sblock_alloc_buffer((qt, obo, qi, obi, lanes), "int32")
            for ph, r, ch in T.grid(phases, rows, cp):
                with T.sblock("gather"):
                    vph, vr, vc = T.axis.remap("SSS", [ph, r, ch])
                    sp[vph, vr, vc] = stored(T.Select(inside(vph, vr, vc), x[source(vph, vr, vc)], T.uint8(zx)))
            for t, b in T.grid(qt, obo):
                for tap, cc, i, j, n, kk in T.grid(taps, c4, qi, obi, lanes, 4):
                    with T.sblock("dot"):
                        vt, vb, vtap, vcc, vi, vj, vn, vk = T.axis.remap("SSRRSSSR", [t, b, tap, cc, i, j, n, kk])
                        with T.init():
                            acc[vt, vb, vi, vj, vn] = 0
                        acc[vt, vb, vi, vj, vn] = acc[vt, vb, vi, vj, vn] + T.Cast(
                            "int32", sp[phase(vtap), vt * qi + vi + shift(vtap), vcc * 4 + vk]) * T.Cast(
                            "int32", wp[vb * obi + vj, vtap, vcc, vn, vk])
                for i, j, n in T.grid(qi, obi, lanes):
                    with T.sblock("requant"):
                        vt, vb, vi, vj, vn = T.axis.remap("SSSSS", [t, b, i, j, n])
                        T.where((t * qi + i) // gw < oh and (t * qi + i) % gw < ow and (b * obi + j) * lanes + n < o)
                        out[out_index((vb * obi + vj) * lanes + vn, vt * qi + vi)] = T.Cast(out_dtype, T.max(T.min(
                            T.round(T.Cast("float32", acc[vt, vb, vi, vj, vn] + corr[(vb * obi + vj) * lanes + vn])
                                    * mult[(vb * obi + vj) * lanes + vn]) + T.float32(zy),
                            T.float32(qmax)), T.float32(qmin)))

    return _schedule(qconv, dot, threads, in_layout)


def _schedule(func: tirx.PrimFunc, dot: Dot, threads: int, in_layout: str) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    gather = sch.get_sblock("gather")
    ph, r, ch = sch.get_loops(gather)
    cp = sch.get(ch).extent.value
    if in_layout == "NHWC":  # channels innermost in both: vector copies
        if cp % 16 == 0:
            sch.vectorize(sch.split(ch, [None, 16])[1])
    else:  # a byte transpose: read along the input's rows
        sch.reorder(ch, r)
    fused = sch.fuse(ph, r) if in_layout == "NHWC" else sch.fuse(ph, ch)
    if threads > 1:
        sch.parallel(sch.split(fused, [threads, None])[0])
    schedule_dot_tile(sch, sch.get_sblock("dot"), dot, threads)
    requant = sch.get_sblock("requant")
    sch.vectorize(sch.get_loops(requant)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_dot_tile(sch: s_tir.Schedule, dot_block, dot: Dot, threads: int) -> None:
    """Schedule a register-tile product block with loops ``(tile, block, reductions..., i, j, lanes, 4)``
    into an accumulator ``[tiles, blocks, i, j, lanes]``: the tiles parallel, the sums kept in
    registers (init vectorized, ``i`` and ``j`` unrolled), the ``lanes``x4 product tensorized with
    ``dot``'s intrinsic. Shared by ``qconv_func`` and ``int8_matmul.qmatmul_func``."""
    loops = sch.get_loops(dot_block)
    t, b, first, (i, j, n) = loops[0], loops[1], loops[2], loops[-4:-1]
    if threads > 1:  # (before the reduction's init is split off: parallel needs a whole reduction block)
        sch.parallel(sch.fuse(t, b))
    init = sch.decompose_reduction(dot_block, first)
    sch.tensorize(n, dot.intrinsic)
    sch.set_scope(init, 0, "local")  # (after tensorize: the intrinsic's buffers are global)
    sch.unroll(i)
    sch.unroll(j)
    ii, ij, inn = sch.get_loops(init)[-3:]
    sch.vectorize(inn)
    sch.unroll(ij)
    sch.unroll(ii)

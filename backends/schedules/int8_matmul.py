"""Integer matmuls with a constant weight: ``MatMulInteger`` as ONNX Runtime's ``quantize_dynamic``
writes it, a Relax rewrite and its kernels, VNNI (``vpdpbusd``) here and AMX-INT8 (``amx_matmul.py``).

``int8_match.match`` finds the chains (``lowering/quant.py`` writes ``MatMulInteger`` with a constant
``b`` as a matmul by the constant ``B = b - b_zp``; a dynamically quantized model follows it with
``Cast(float) -> Mul(scale)``); ``rewrite_int8_matmul`` replaces each by one ``call_tir``:

* the weight, packed once at compile time: ``B = W + d`` per column, ``W`` int8 (``d = 0`` where the
  column fits int8, as for int8 weights with zero point 0; else ``min + 128``), packed by
  ``int8_dot.Dot.pack_weight`` into blocks of ``lanes`` columns x 4 rows (AMX: ``amx_int8.pack_weight``);
* the products: ``qi`` rows x ``obi`` blocks of ``lanes`` columns a register tile, the ``lanes``x4
  block tensorized with the dot-product intrinsic of ``int8_dot``; 16 rows and more on AMX tiles
  where the target has AMX-INT8 (``GRAPHOPT_INT8_AMX=0``: VNNI only);
* the zero points folded in, exact in int32 (``epilogue``):
  ``Σ(x - zx)·B = Σx·W - zx·ΣW[n] + d[n]·(Σx[m] - K·zx)`` (the row sums only when some ``d`` is not 0);
* the dequantization on the way out, ``float32(acc) · scale`` (a scalar or one per column), the
  same float32 operations as the Cast and Mul it replaces: results are bit-identical.

Rows are padded to whole tiles and K to a multiple of 4 (zeros) by a copy only where needed.
``GRAPHOPT_INT8_DOT=0`` keeps the generic integer matmul.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.script import tirx as T

from . import amx_matmul, int8_dot
from .amx_kernel import _drop_param
from .features import features_of, int8_dot_kind
from .int8_conv import SERIAL_MACS, rewrite_matches
from .int8_layout import rewrite_block, shape_of
from .int8_match import match
from .value_range import rewrite_value_range

_MATMUL = tvm.ir.Op.get("relax.matmul")


def tile(m: int, nb: int, dot: int8_dot.Dot) -> tuple[int, int]:
    """(rows ``qi``, column blocks ``obi``) of a register tile: the least padded work over ``m`` rows
    and ``nb`` blocks, then the most accumulators, then the most blocks."""
    options = [(qi, obi) for obi in range(1, min(4, nb) + 1) for qi in range(1, min(12, dot.accumulators // obi) + 1)]
    return min(options, key=lambda t: (math.ceil(m / t[0]) * t[0] * math.ceil(nb / t[1]) * t[1], -t[0] * t[1], -t[1]))


def split_weight(centered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` ``b - b_zp`` (int64) as ``(W, d)``: ``W`` int8, ``centered = W + d`` per column."""
    lo, hi = centered.min(axis=0), centered.max(axis=0)
    if int((hi - lo).max()) > 255:
        raise ValueError("weight columns span more than 8 bits")
    shift = np.where((lo >= -128) & (hi <= 127), 0, lo + 128).astype(np.int64)
    return (centered - shift).astype(np.int8), shift


def column_constants(w: np.ndarray, shift: np.ndarray, cols: int) -> dict:
    """``colsum`` (``ΣW`` per column) and ``shift`` (``d``), int32, padded with zeros to ``cols``."""
    colsum, d = np.zeros(cols, np.int32), np.zeros(cols, np.int32)
    colsum[:w.shape[1]], d[:w.shape[1]] = w.astype(np.int32).sum(axis=0), shift
    return {"colsum": colsum, "shift": d}


def pack(dot: int8_dot.Dot, centered: np.ndarray, m: int) -> dict:
    """The constants of a ``[K, N]`` integer weight ``centered`` (``b - b_zp``, int64) for ``m`` rows:
    ``wp`` ``[blocks, K/4, lanes, 4]`` int8, ``colsum`` and ``shift`` (``d``) per padded column."""
    w, shift = split_weight(centered)
    k, n = centered.shape
    _, obi = tile(m, math.ceil(n / dot.lanes), dot)
    cols = math.ceil(math.ceil(n / dot.lanes) / obi) * obi * dot.lanes
    full = np.zeros((k, cols), np.int8)
    full[:, :n] = w
    wp = dot.pack_weight(np.ascontiguousarray(full.T)[:, :, None, None])  # [blocks, 1, K/4, lanes, 4]
    return {"wp": wp.reshape(wp.shape[0], *wp.shape[2:]), **column_constants(w, shift, cols)}


def out_index(lead: tuple, row, col) -> tuple:
    """The index in an output of shape ``(*lead, n)`` of flattened row ``row`` (``< prod(lead)``), column ``col``."""
    idx, total, stride = [], math.prod(lead), math.prod(lead)
    for d in lead:
        outer, stride = stride, stride // d
        v = row if stride == 1 else row // stride
        idx.append(0 if d == 1 else v if outer == total else v % d)
    return (*idx, col)


def epilogue(k: int, rows: bool, scales: int, wscales: int = 0):
    """The output element from the int32 product ``acc`` of row ``row``, column ``col``:
    ``acc - zx·ΣW[col] (+ d[col]·(Σx[row] - k·zx))``, as float32 times the scale when ``scales``
    (times ``scale · wscale`` when ``wscales``: the product of the activation's and the weight's
    scales, computed as the graph computes it)."""
    ns, nw = max(scales, 1), max(wscales, 1)

    def value(acc, zx, colsum, shift, rsum, scale, wscale, row, col):
        z = T.Cast("int32", zx[0])
        v = acc - z * colsum[col]
        if rows:
            v = v + shift[col] * (rsum[row] - k * z)
        if not scales:
            return v
        s = scale[T.min(col, ns - 1)]
        return T.Cast("float32", v) * (s * wscale[T.min(col, nw - 1)] if wscales else s)

    return value


def qmatmul_func(dot: int8_dot.Dot, m: int, k: int, n: int, *, rows: bool, scales: int, threads: int,
                 lead: tuple = (), wscales: int = 0) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(x, zx, wp, colsum[, shift][, scale[, wscale]], out)``: ``x`` ``[m, k]``
    uint8, ``zx`` ``[1]`` uint8, the constants of ``pack``; ``rows``: some ``shift`` is not 0 (takes
    ``shift``); ``scales``: 0 for an int32 ``out``, else the scale's length (1 or ``n``) for a float32
    one; ``wscales``: the length of a weight scale it is multiplied by (0: none, see ``epilogue``); ``out``
    ``[*lead, n]`` (``lead``: the rows' dims, ``(m,)`` by default; a model output is then no copy)."""
    lead = tuple(lead) or (m,)
    int8_dot._intrinsics(dot)
    lanes = dot.lanes
    qi, obi = tile(m, math.ceil(n / lanes), dot)
    obo = math.ceil(math.ceil(n / lanes) / obi)
    nbp, k4, qt = obo * obi, math.ceil(k / 4), math.ceil(m / qi)
    cols, mp, kp = obo * obi * lanes, qt * qi, k4 * 4
    copy = mp != m or kp != k
    out_dtype = "float32" if scales else "int32"
    ns, nw = max(scales, 1), max(wscales, 1)
    value = epilogue(k, rows, scales, wscales)

    @T.prim_func(s_tir=True, private=True)
    def qmm(x: T.Buffer((m, k), "uint8"), zx: T.Buffer((1,), "uint8"), wp: T.Buffer((nbp, k4, lanes, 4), "int8"),
            colsum: T.Buffer((cols,), "int32"), shift: T.Buffer((cols,), "int32"), scale: T.Buffer((ns,), "float32"),
            wscale: T.Buffer((nw,), "float32"),
            out: T.Buffer((*lead, n), out_dtype)):
        T.func_attr({"tirx.noalias": True, "graphopt.flops": 2 * m * k * n})
        with T.sblock("root"):
            acc = T.sblock_alloc_buffer((qt, obo, qi, obi, lanes), "int32")
            rsum = T.sblock_alloc_buffer((mp if rows else 1,), "int32")
            if copy:
                xs = T.sblock_alloc_buffer((mp, kp), "uint8")
                for r, c in T.grid(mp, kp):
                    with T.sblock("pad"):
                        vr, vc = T.axis.remap("SS", [r, c])
                        xs[vr, vc] = T.if_then_else(vr < m and vc < k, x[T.min(vr, m - 1), T.min(vc, k - 1)], T.uint8(0))
            else:
                xs = x
            if rows:
                for r, c in T.grid(mp, kp):
                    with T.sblock("rowsum"):
                        vr, vc = T.axis.remap("SR", [r, c])
                        with T.init():
                            rsum[vr] = 0
                        rsum[vr] = rsum[vr] + T.Cast("int32", xs[vr, vc])
            for b, t in T.grid(obo, qt):  # a weight tile stays in cache over the rows
                for kc, i, j, nn, kk in T.grid(k4, qi, obi, lanes, 4):
                    with T.sblock("dot"):
                        vb, vt, vkc, vi, vj, vn, vk = T.axis.remap("SSRSSSR", [b, t, kc, i, j, nn, kk])
                        with T.init():
                            acc[vt, vb, vi, vj, vn] = 0
                        acc[vt, vb, vi, vj, vn] = acc[vt, vb, vi, vj, vn] + T.Cast(
                            "int32", xs[vt * qi + vi, vkc * 4 + vk]) * T.Cast("int32", wp[vb * obi + vj, vkc, vn, vk])
                for i, j, nn in T.grid(qi, obi, lanes):
                    with T.sblock("epilogue"):
                        vb, vt, vi, vj, vn = T.axis.remap("SSSSS", [b, t, i, j, nn])
                        T.where(t * qi + i < m and (b * obi + j) * lanes + nn < n)
                        out[out_index(lead, vt * qi + vi, (vb * obi + vj) * lanes + vn)] = value(
                            acc[vt, vb, vi, vj, vn], zx, colsum, shift, rsum, scale, wscale, vt * qi + vi,
                            (vb * obi + vj) * lanes + vn)

    func = qmm
    for name, used in (("shift", rows), ("scale", scales), ("wscale", wscales)):
        func = func if used else _drop_param(func, name)
    threads = threads if m * k * n >= SERIAL_MACS["dot"] else 1
    return _schedule(func, dot, threads, copy, rows)


def _schedule(func: tirx.PrimFunc, dot: int8_dot.Dot, threads: int, copy: bool, rows: bool) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    if copy:
        r, c = sch.get_loops(sch.get_sblock("pad"))
        if threads > 1:
            sch.parallel(r)
        sch.vectorize(sch.split(c, [None, 4])[1])
    if rows:
        r, _ = sch.get_loops(sch.get_sblock("rowsum"))
        if threads > 1:
            sch.parallel(r)
    int8_dot.schedule_dot_tile(sch, sch.get_sblock("dot"), dot, threads)
    sch.vectorize(sch.get_loops(sch.get_sblock("epilogue"))[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _caller(bb, dot: int8_dot.Dot, amx: bool, threads: int, block):
    """``rewrite_block``'s kernel call for the bindings of ``block``."""
    var = relax.DataflowVar if isinstance(block, relax.DataflowBlock) else relax.Var
    return lambda m, x, _in_layout, _out_layout: _call(bb, dot, amx, m, threads, x, var)


def _call(bb, dot: int8_dot.Dot, amx: bool, m: dict, threads: int, x, var=relax.DataflowVar):
    """(the kernel call of match ``m`` reading ``x``, bindings to put before it; new vars of type ``var``):
    on AMX tiles (``amx_matmul.py``) where ``amx`` and there are enough rows, else on ``dot``."""
    shape = shape_of(m["x"])
    rows, (k, n) = math.prod(shape[:-1]), m["weight"].shape
    scales = m["scales"] if m["scale"] is not None else 0
    wscales = m["wscale"].size if scales and m.get("wscale") is not None else 0
    if amx and rows >= amx_matmul.MIN_ROWS:
        w, shift = split_weight(m["weight"])
        consts = {"wp": amx_matmul.pack(w), **column_constants(w, shift, amx_matmul.columns(n))}
        has_rows = bool(consts["shift"].any())
        func = amx_matmul.qmatmul_func(rows, k, n, rows=has_rows, scales=scales, wscales=wscales,
                                       value=epilogue(k, has_rows, scales, wscales),
                                       threads=threads if rows * k * n >= SERIAL_MACS["amx"] else 1,
                                       lead=tuple(shape[:-1]), index=lambda r, c: out_index(tuple(shape[:-1]), r, c))
    else:
        consts = pack(dot, m["weight"], rows)
        has_rows = bool(consts["shift"].any())
        func = qmatmul_func(dot, rows, k, n, rows=has_rows, scales=scales, threads=threads, lead=tuple(shape[:-1]),
                            wscales=wscales)
    flat = var("qmm_rows", relax.TensorType([rows, k], "uint8"))
    pre = [relax.VarBinding(flat, relax.op.reshape(x, [rows, k]))]
    zx = relax.const(np.zeros(1, np.uint8)) if m["zx"] is None else relax.op.reshape(m["zx"], [1])
    args = [flat, zx, relax.const(consts["wp"]), relax.const(consts["colsum"])]
    if has_rows:
        args.append(relax.const(consts["shift"]))
    if scales:
        args.append(relax.op.reshape(m["scale"], [scales]))
    if wscales:
        args.append(relax.const(np.ascontiguousarray(m["wscale"], np.float32)))
    out = relax.TensorType([*shape[:-1], n], "float32" if scales else "int32")
    name = "amx_qmatmul" if amx and rows >= amx_matmul.MIN_ROWS else f"{dot.kind}_qmatmul"
    return relax.call_tir(bb.add_func(func, name), args, out), pre


def rewrite_int8_matmul(mod: tvm.IRModule, spec) -> tvm.IRModule:
    """Every MatMulInteger chain of ``mod`` (``int8_match.match``) as a kernel call, on targets with a
    uint8 x int8 dot product (VNNI, AVX-VNNI; AMX-INT8 from 16 rows); on every CPU target, the range
    of a dynamically quantized tensor in one pass (``value_range.py``)."""
    threads = spec.features.get("cores", 1)
    mod = rewrite_value_range(mod, features_of(spec).lanes(32), threads)
    kind = int8_dot_kind(spec) if not getattr(spec, "is_gpu", False) else None
    if kind not in ("vnni", "avxvnni") or os.environ.get("GRAPHOPT_INT8_DOT", "1") == "0":
        return mod
    dot = int8_dot.DOTS[kind]
    amx = bool(spec.features.get("amx")) and os.environ.get("GRAPHOPT_INT8_AMX", "1") != "0"

    def find(b) -> dict:
        found = {}
        for var, value in b.value.items():
            if isinstance(value, relax.Call) and value.op.same_as(_MATMUL):
                m = match(b, var, value)
                if m is not None:
                    found[m["end"]] = m
        return found

    def blocks_of(bb, func, b, found: dict) -> list:
        return [type(block)(rewrite_block(block, found, set(), _caller(bb, dot, amx, threads, block)))
                for block in func.body.blocks]

    return rewrite_matches(mod, find, blocks_of)[0]

"""Weight-only quantized matmuls that read the quantized weight (CPU): no float copy of the weight.

``graphopt optimize --quantize int8-weights|int4-weights`` writes ``MatMul(x, DequantizeLinear(q, s[,
z], block_size=B))``; lowered, the weight is an elementwise chain (``lowering/quant.py``)::

    w = float32(int32(q) [- int32(repeat(z, B))]) * float32(repeat(s, B))     [permute_dims: Gemm transB]
    y = matmul(x, w)

which, left alone, runs as a kernel of its own at every call, writing the whole float weight, and
the matmul after it loses its packed kernel. ``rewrite_dequant_matmul`` (a Relax pass run before
LegalizeOps, CPU targets only) replaces each such matmul by one ``call_tir`` to ``dequant_matmul_func``:

* parallel over tiles of ``4 x lanes`` output columns; in a tile, ``R`` rows (1 when the matmul has
  one row: a decode step's GEMV; 2 otherwise) accumulate ``x[i, k] * float(q[k, n] - z)`` over one
  quantization block in registers, then add the block's sum times its scale: the weight is read as
  stored (int8/uint8; 4-bit values are held one a byte by the lowering) and converted in registers;
* a constant weight (embedded in the library) is prepacked at compile time to ``[N/T, K, T]`` (a tile
  streams one contiguous panel; a Gemm's ``[N, K]`` weight is transposed there too), scales and zero
  points to ``[N/T, K/B, T]``; a weight passed as an argument (models over the embedding limit) is
  read ``[K, N]`` as stored, the last partial tile with clamped columns.

Taken when: the weight is a constant or an argument of the function, int8/uint8, its scale (and
zero point) likewise, blocks along K dividing K (no partial last block), ``x`` float32 with a static
K. Anything else keeps the elementwise chain. ``GRAPHOPT_DEQUANT_MATMUL=0`` turns the rewrite off.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from graphopt.backends.constants import rewrite_relax_functions

log = logging.getLogger(__name__)
_OPS = {name: tvm.ir.Op.get(f"relax.{name}")
        for name in ("matmul", "astype", "multiply", "subtract", "repeat", "permute_dims")}
_Constant = tvm.ir.expr.Constant
_QTYPES = ("int8", "uint8")
_STYPES = ("float32", "float16")
WIDE_COLUMNS = 1024  # a weight read as stored: columns a task streams per row (accumulators in L1)


def enabled() -> bool:
    return os.environ.get("GRAPHOPT_DEQUANT_MATMUL", "1") != "0"


# ---------------------------------------------------------------- the kernel


def dequant_matmul_func(k: int, n: int, block: int, qdtype: str, sdtype: str, has_zp: bool, packed: bool,
                        tile: int, rows: int) -> tirx.PrimFunc:
    """``Y [m, n] = X [m, k] @ dequantize(Q)`` for any row count ``m``.

    ``packed``: ``Q [ceil(n/tile), k, tile]``, scales and zero points ``[ceil(n/tile), k/block, tile]``
    (zero-padded columns); else ``Q [k, n]``, scales and zero points ``[k/block, n]``."""
    f32, i32 = "float32", "int32"
    TL, R, B = tile, rows, block
    KB, NT, NF = k // block, -(-n // tile), n // tile
    # unpacked: tiles of WIDE columns, then one of W2 (whole vectors) + W3 (the last partial vector)
    WIDE = max(TL, min(WIDE_COLUMNS, n // TL * TL))
    WF = n // WIDE
    W2 = (n - WF * WIDE) // TL * TL
    W3 = n - WF * WIDE - W2
    WR = int(W2 + W3 > 0)
    qshape = (NT, k, TL) if packed else (k, n)
    sshape = (NT, KB, TL) if packed else (KB, n)

    @T.macro
    def tile_rows(nt, i0, m, tail, X, Q, S, Z, Y, acc, blk):
        for r, j in T.grid(R, TL):
            acc[r, j] = T.float32(0)
        for kb in range(KB):
            for r, j in T.grid(R, TL):
                blk[r, j] = T.float32(0)
            for kk in range(B):
                for r in T.unroll(R):
                    for j in T.vectorized(TL):
                        if packed:
                            if has_zp:
                                blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, T.Cast(i32, Q[nt, kb * B + kk, j]) - T.Cast(i32, Z[nt, kb, j]))
                            else:
                                blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, Q[nt, kb * B + kk, j])
                        elif tail:
                            if has_zp:
                                blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, T.Cast(i32, Q[kb * B + kk, T.min(nt * TL + j, n - 1)])
                                    - T.Cast(i32, Z[kb, T.min(nt * TL + j, n - 1)]))
                            else:
                                blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, Q[kb * B + kk, T.min(nt * TL + j, n - 1)])
                        elif has_zp:
                            blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                f32, T.Cast(i32, Q[kb * B + kk, nt * TL + j]) - T.Cast(i32, Z[kb, nt * TL + j]))
                        else:
                            blk[r, j] = blk[r, j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                f32, Q[kb * B + kk, nt * TL + j])
            for r in T.unroll(R):
                for j in T.vectorized(TL):
                    if packed:
                        acc[r, j] = acc[r, j] + blk[r, j] * T.Cast(f32, S[nt, kb, j])
                    elif tail:
                        acc[r, j] = acc[r, j] + blk[r, j] * T.Cast(f32, S[kb, T.min(nt * TL + j, n - 1)])
                    else:
                        acc[r, j] = acc[r, j] + blk[r, j] * T.Cast(f32, S[kb, nt * TL + j])
        for r in range(R):
            if i0 + r < m:
                if tail:
                    for j in range(TL):
                        if nt * TL + j < n:
                            Y[i0 + r, nt * TL + j] = acc[r, j]
                else:
                    for j in T.vectorized(TL):
                        Y[i0 + r, nt * TL + j] = acc[r, j]

    @T.macro
    def wide_tile(n0, nv, vw, clamp, i0, m, X, Q, S, Z, Y, acc, blk):
        # Q [k, n] as stored: ``nv`` vectors of ``vw`` columns from ``n0`` (clamped: the last, partial
        # vector), accumulators in L1; each weight row is read as one contiguous run of nv * vw bytes
        for r, c in T.grid(R, nv * vw):
            acc[r, c] = T.float32(0)
        for kb in range(KB):
            for r, c in T.grid(R, nv * vw):
                blk[r, c] = T.float32(0)
            for kk in range(B):
                for r in T.unroll(R):
                    for jj in range(nv):
                        for j in T.vectorized(vw):
                            if clamp:
                                if has_zp:
                                    blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                        f32, T.Cast(i32, Q[kb * B + kk, T.min(n0 + j, n - 1)])
                                        - T.Cast(i32, Z[kb, T.min(n0 + j, n - 1)]))
                                else:
                                    blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                        f32, Q[kb * B + kk, T.min(n0 + j, n - 1)])
                            elif has_zp:
                                blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, T.Cast(i32, Q[kb * B + kk, n0 + jj * vw + j]) - T.Cast(i32, Z[kb, n0 + jj * vw + j]))
                            else:
                                blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, Q[kb * B + kk, n0 + jj * vw + j])
            for r in T.unroll(R):
                for jj in range(nv):
                    for j in T.vectorized(vw):
                        if clamp:
                            acc[r, j] = acc[r, j] + blk[r, j] * T.Cast(f32, S[kb, T.min(n0 + j, n - 1)])
                        else:
                            acc[r, jj * vw + j] = acc[r, jj * vw + j] + blk[r, jj * vw + j] * T.Cast(
                                f32, S[kb, n0 + jj * vw + j])
        for r in range(R):
            if i0 + r < m:
                if clamp:
                    for j in range(vw):
                        if n0 + j < n:
                            Y[i0 + r, n0 + j] = acc[r, j]
                else:
                    for jj in range(nv):
                        for j in T.vectorized(vw):
                            Y[i0 + r, n0 + jj * vw + j] = acc[r, jj * vw + j]

    @T.macro
    def body(X, Q, S, Z, Y, m):
        if packed:
            for nt in T.parallel(NT):
                acc = T.decl_buffer((R, TL), f32, scope="local")
                blk = T.decl_buffer((R, TL), f32, scope="local")
                for rb in range((m + R - 1) // R):
                    if nt < NF:
                        tile_rows(nt, rb * R, m, False, X, Q, S, Z, Y, acc, blk)
                    else:
                        tile_rows(nt, rb * R, m, True, X, Q, S, Z, Y, acc, blk)
        else:
            for t in T.parallel(WF + WR):
                acc = T.decl_buffer((R, WIDE), f32, scope="local")
                blk = T.decl_buffer((R, WIDE), f32, scope="local")
                for rb in range((m + R - 1) // R):
                    if t < WF:
                        wide_tile(t * WIDE, WIDE // TL, TL, False, rb * R, m, X, Q, S, Z, Y, acc, blk)
                    else:
                        if W2 > 0:
                            wide_tile(WF * WIDE, W2 // TL, TL, False, rb * R, m, X, Q, S, Z, Y, acc, blk)
                        if W3 > 0:
                            wide_tile(WF * WIDE + W2, 1, W3, True, rb * R, m, X, Q, S, Z, Y, acc, blk)

    if has_zp:
        @T.prim_func(private=True)
        def kernel(x: T.handle, q: T.handle, s: T.handle, z: T.handle, y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            m = T.int64()
            X = T.match_buffer(x, (m, k), f32)
            Q = T.match_buffer(q, qshape, qdtype)
            S = T.match_buffer(s, sshape, sdtype)
            Z = T.match_buffer(z, sshape, qdtype)
            Y = T.match_buffer(y, (m, n), f32)
            body(X, Q, S, Z, Y, m)
    else:
        @T.prim_func(private=True)
        def kernel(x: T.handle, q: T.handle, s: T.handle, y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            m = T.int64()
            X = T.match_buffer(x, (m, k), f32)
            Q = T.match_buffer(q, qshape, qdtype)
            S = T.match_buffer(s, sshape, sdtype)
            Y = T.match_buffer(y, (m, n), f32)
            body(X, Q, S, None, Y, m)

    return kernel


def pack_columns(a: np.ndarray, tile: int) -> np.ndarray:
    """``[R, N]`` → ``[ceil(N/tile), R, tile]``, the columns past ``N`` zero."""
    r, n = a.shape
    nt = -(-n // tile)
    padded = np.zeros((r, nt * tile), a.dtype)
    padded[:, :n] = a
    return np.ascontiguousarray(padded.reshape(r, nt, tile).transpose(1, 0, 2))


# ---------------------------------------------------------------- the pattern


class _Match:
    """A dequantized weight: ``q``, ``scale``, ``zero_point`` (Relax leaves: constants or arguments), the
    block size, and whether the float weight is used transposed (``[N, K]`` stored, Gemm transB)."""

    def __init__(self, q, scale, zp, block: int, transposed: bool):
        self.q, self.scale, self.zp, self.block, self.transposed = q, scale, zp, block, transposed


def _is_leaf(e) -> bool:
    return isinstance(e, (_Constant, relax.Var)) and not isinstance(e, relax.DataflowVar)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, lanes: int, arguments: frozenset = frozenset()):
        super().__init__(mod)
        self.tile = 4 * lanes
        self.rewritten = 0
        self.arguments = arguments  # weight arguments this rewrite may repack (read by one matmul only)
        self.packed: dict = {}  # argument Var -> the packed Var replacing it

    # -- looking through bindings --------------------------------------------------------------

    def _value(self, e):
        """The call bound to ``e`` (a dataflow var), ``e`` itself when it is a call, else None."""
        if isinstance(e, relax.Var):
            bound = self.lookup_binding(e)
            return bound if bound is not None else None
        return e if isinstance(e, relax.Call) else None

    def _call(self, e, name: str):
        v = self._value(e)
        return v if isinstance(v, relax.Call) and v.op.same_as(_OPS[name]) else None

    def _leaf(self, e):
        """``e`` when it is a constant or a function argument (looking through a binding to one)."""
        if isinstance(e, relax.Var) and not _is_leaf(e):
            e = self.lookup_binding(e)
        return e if e is not None and _is_leaf(e) else None

    def _strip_astype(self, e, dtype: str | None = None):
        """Through ``astype`` calls (to ``dtype`` only, when given)."""
        while (c := self._call(e, "astype")) is not None and (dtype is None or str(c.attrs.dtype) == dtype):
            e = c.args[0]
        return e

    def _repeat(self, e, axis: int):
        """(leaf, repeats) of ``repeat(leaf, B, axis)`` under any astype, else None."""
        c = self._call(self._strip_astype(e), "repeat")
        if c is None or c.attrs.axis is None or int(c.attrs.axis) != axis:
            return None
        leaf = self._leaf(c.args[0])
        return (leaf, int(c.attrs.repeats)) if leaf is not None else None

    def _integers(self, e, axis: int):
        """(q, zero point, B) of ``float32(int32(q) [- int32(repeat(z, B))])``; B is None without z."""
        e = self._strip_astype(e, "float32")
        sub = self._call(e, "subtract")
        if sub is None:
            q = self._leaf(self._strip_astype(e, "int32"))
            return (q, None, None) if q is not None else None
        q = self._leaf(self._strip_astype(sub.args[0], "int32"))
        z = self._repeat(sub.args[1], axis)
        if q is None or z is None:
            return None
        return q, z[0], z[1]

    def match(self, w) -> _Match | None:
        transposed = False
        perm = self._call(w, "permute_dims")
        if perm is not None:
            axes = perm.attrs.axes
            if axes is None or [int(a) for a in axes] != [1, 0]:
                return None
            w, transposed = perm.args[0], True
        mul = self._call(w, "multiply")
        if mul is None:
            return None
        axis = 1 if transposed else 0
        for a, b in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            s = self._repeat(b, axis)
            ints = self._integers(a, axis)
            if s is None or ints is None:
                continue
            q, zp, zblock = ints
            if zblock is not None and zblock != s[1]:
                return None
            return _Match(q, s[0], zp, s[1], transposed)
        return None

    # -- the rewrite ---------------------------------------------------------------------------

    def why_not(self, call, m: _Match) -> str | None:
        x = call.args[0]
        shape = getattr(x.ty, "shape", None)
        if shape is None or len(shape) < 2 or not isinstance(shape[-1], tirx.IntImm):
            return "the input's last dim (K) is not static"
        if x.ty.dtype != "float32" or str(call.attrs.out_dtype) not in ("", "None", "void", "float32"):
            return "not a float32 product"
        q, s = m.q.ty, m.scale.ty
        if q.dtype not in _QTYPES or len(q.shape) != 2 or s.dtype not in _STYPES or len(s.shape) != 2:
            return f"weight {q.dtype} {len(q.shape)}-D, scale {s.dtype}"
        if m.zp is not None and (m.zp.ty.dtype != q.dtype or list(m.zp.ty.shape) != list(s.shape)):
            return "zero point of another type or shape than the scale"
        k_axis = 1 if m.transposed else 0
        kq, ks = int(q.shape[k_axis]), int(s.shape[k_axis])
        if kq != int(shape[-1]) or ks * m.block != kq:
            return f"blocks of {m.block} do not tile K = {kq} exactly"
        if m.transposed and not isinstance(m.q, _Constant):
            return "a transposed weight passed as an argument"
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_OPS["matmul"])):
            return call
        m = self.match(call.args[1])
        if m is None:
            return call
        why = self.why_not(call, m)
        if why is not None:
            log.debug("dequantized matmul %s keeps its float weight: %s", call.args[1].ty.shape, why)
            return call
        self.rewritten += 1
        return self._kernel_call(call, m)

    def _kernel_call(self, call, m: _Match):
        x = call.args[0]
        k = int(x.ty.shape[-1])
        n = int(m.q.ty.shape[0 if m.transposed else 1])
        packed = isinstance(m.q, _Constant) and isinstance(m.scale, _Constant) and (
            m.zp is None or isinstance(m.zp, _Constant))
        leaves = [m.q, m.scale] + ([m.zp] if m.zp is not None else [])
        if packed:
            arrays = [leaf.value.numpy() for leaf in leaves]
            if m.transposed:
                arrays = [a.T for a in arrays]
            leaves = [relax.const(pack_columns(a, self.tile)) for a in arrays]
        elif not m.transposed and all(any(leaf.same_as(v) for v in self.arguments) for leaf in leaves):
            packed = True  # arguments packed like constants, lazily (pack_dequant_params)
            for i, leaf in enumerate(leaves):
                done = next((v for old, v in self.packed.items() if old.same_as(leaf)), None)
                if done is not None:  # a weight read by two matmuls: packed once
                    leaves[i] = done
                    continue
                rows, cols = (int(d) for d in leaf.ty.shape)
                new = relax.Var(f"{leaf.name}_packed",
                                relax.TensorType([-(-cols // self.tile), rows, self.tile], leaf.ty.dtype))
                self.packed[leaf] = new
                leaves[i] = new
        lead = list(x.ty.shape)[:-1]
        rows1 = all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in lead)
        func = dequant_matmul_func(k, n, m.block, m.q.ty.dtype, m.scale.ty.dtype, m.zp is not None, packed,
                                   self.tile, 1 if rows1 else 2)
        gv = self.builder_.add_func(func, "dequant_matmul")
        x2 = x if len(lead) == 1 else self.builder_.emit(relax.op.reshape(x, [-1, k]))
        rows = x2.ty.shape[0]
        y = relax.call_tir(gv, [x2, *leaves], relax.TensorType([rows, n], "float32"))
        if len(lead) == 1:
            return y
        return relax.op.reshape(self.builder_.emit(y), call.ty.shape)


def rewrite_dequant_matmul(mod, lanes: int):
    """Every matmul of ``mod`` whose weight is a dequantized int8/uint8 weight (see the module
    docstring) as one kernel reading the quantized weight; ``lanes``: float32 vector lanes."""
    if not enabled():
        return mod
    rw = _Rewriter(mod, lanes)
    new = rewrite_relax_functions(mod, rw)
    if not rw.rewritten:
        return mod
    log.debug("%d matmuls read their quantized weights", rw.rewritten)
    return relax.transform.DeadCodeElimination()(new)


def _uses(func) -> dict:
    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def pack_dequant_params(mod, params: dict, lanes: int):
    """``(mod, params)`` with each dequantized matmul whose weight, scale and zero point are arguments
    of ``main`` (weights left outside the library) rewritten to the kernel over packed arguments: their
    types in ``mod`` become ``[ceil(N/T), rows, T]``, their arrays in ``params`` ``PackedWeight`` (packed
    one at a time when the bundle is written or a runner takes them, never all held twice). Only
    arguments read by that one dequantization are packed; the others are left to
    ``rewrite_dequant_matmul``, which reads them as stored."""
    from graphopt.backends.packed_params import PackedWeight

    if not enabled() or not params:
        return mod, params
    main = mod["main"]
    num_input = len(main.params) - len(params)
    weights = dict(zip(main.params[num_input:], params))  # Var -> name
    uses = _uses(main)
    arguments = frozenset(v for v, name in weights.items()
                          if uses.get(v, 0) == 1 and np.asarray(params[name]).ndim == 2)
    if not arguments:
        return mod, params
    rw = _Rewriter(mod, lanes, arguments)
    body = rw.visit_expr(main)
    if not rw.packed:
        return mod, params
    new_params = [next((new for old, new in rw.packed.items() if old.same_as(p)), p) for p in body.params]
    func = relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs, body.span)
    rw.builder_.update_func(mod.get_global_var("main"), func)
    tile = rw.tile
    out = {name: PackedWeight(np.asarray(params[name]), tile) if any(v.same_as(o) for o in rw.packed) else params[name]
           for v, name in weights.items()}
    log.debug("%d weight arguments packed for dequantized matmuls", len(rw.packed))
    return relax.transform.DeadCodeElimination()(rw.builder_.get()), out

"""Weight-only quantized matmuls that read the quantized weight (CPU): no float copy of the weight.

``graphopt optimize --quantize int8-weights|int4-weights`` writes ``MatMul(x, DequantizeLinear(q, s[,
z], block_size=B))``; lowered, the weight is an elementwise chain (``lowering/quant.py``)::

    w = float32(int32(q) [- int32(repeat(z, B))]) * float32(repeat(s, B))     [permute_dims: Gemm transB]
    y = matmul(x, w)

which, left alone, runs as a kernel of its own at every call, writing the whole float weight, and
the matmul after it loses its packed kernel. ``rewrite_dequant_matmul`` (a Relax pass run before
LegalizeOps, CPU targets only) replaces each such matmul by one ``call_tir`` to ``dequant_matmul_func``:

* parallel over tiles of ``4 x lanes`` output columns; one row (a decode step's GEMV) accumulates
  ``x[k] * float(q[k, n])`` over one quantization block in registers (two sets of accumulators, alternate
  rows; the panel's codes prefetched 2 KB ahead; 4-bit codes on AVX-512 turned into floats by a 16-entry
  permute), then adds the block's sum, less the zero point times the block's sum of ``x``, times its
  scale: bound by memory bandwidth for int8 (one byte a weight), by its vector ops for 4-bit codes
  (shift, permute, FMA per 16 weights, against int8's sign-extend, convert, FMA); more rows dequantize each block of
  the tile once into L1 (scale folded in) and run 4 rows a register tile over it; the codes are read as
  bytes (int8/uint8), or eight a 32-bit word when they fit 4 bits (int4/uint4, which the lowering
  holds one a byte), and converted in registers;
* a constant weight (embedded in the library) is prepacked at compile time to ``[N/T, K, T]`` (a tile
  streams one contiguous panel; a Gemm's ``[N, K]`` weight is transposed there too), scales and zero
  points to ``[N/T, K/B, T]``; so is a weight passed as an argument (models over the embedding limit,
  ``pack_dequant_params``: packed lazily when the bundle is written) that nothing else reads; any
  other argument is read ``[K, N]`` as stored, in wide column runs.

Taken when: the weight is a constant or an argument of the function, int8/uint8, its scale (and
zero point) likewise, blocks along K dividing K (no partial last block), ``x`` float32 with a static
K, and a transposed weight (``[N, K]``) constant or packed. Anything else keeps the elementwise
chain. ``GRAPHOPT_DEQUANT_MATMUL=0`` turns the rewrite off.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tvm
from graphopt.backends.constants import rewrite_relax_functions
from graphopt.backends.schedules.dequant_kernel import (
    dequant_matmul_func,
    nibble_offset,
    pack_columns,
    pack_nibbles,
)
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)
_OPS = {name: tvm.ir.Op.get(f"relax.{name}")
        for name in ("matmul", "astype", "multiply", "subtract", "repeat", "permute_dims")}
_Constant = tvm.ir.expr.Constant
_QTYPES = ("int8", "uint8")
_STYPES = ("float32", "float16")


def enabled() -> bool:
    return os.environ.get("GRAPHOPT_DEQUANT_MATMUL", "1") != "0"


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
    def __init__(self, mod, lanes: int, arguments: tuple = ()):
        super().__init__(mod)
        self.tile = 4 * lanes
        self.rewritten = 0
        self.arguments = arguments  # (Var, array) of weight arguments this rewrite may repack
        self.packed: list = []  # (argument Var, its packed Var, nibble offset or None, read transposed)

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
        if m.transposed and not isinstance(m.q, _Constant) and not self._packable(m):
            return "a transposed weight passed as an argument that is not packed"
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

    def _argument(self, leaf):
        return next((a for v, a in self.arguments if v.same_as(leaf)), None)

    def _packable(self, m: _Match) -> bool:
        """Whether the weight's leaves are arguments this rewrite packs (each one way round only)."""
        leaves = [m.q, m.scale] + ([m.zp] if m.zp is not None else [])
        return all(self._argument(leaf) is not None and all(
            t == m.transposed for old, _, _, t in self.packed if old.same_as(leaf)) for leaf in leaves)

    def _pack_arguments(self, leaves: list, offset: int | None, transposed: bool) -> list:
        """The packed Vars replacing argument ``leaves`` (codes first; ``offset``: 4-bit codes)."""
        out = []
        for i, leaf in enumerate(leaves):
            done = next((new for old, new, _, _ in self.packed if old.same_as(leaf)), None)
            if done is None:  # not yet packed (a weight read by two matmuls is packed once)
                rows, cols = (int(d) for d in leaf.ty.shape)
                if transposed:
                    rows, cols = cols, rows
                nib = offset is not None and i == 0
                dtype = "int32" if nib else leaf.ty.dtype
                done = relax.Var(f"{leaf.name}_packed",
                                 relax.TensorType([-(-cols // self.tile), rows // 8 if nib else rows, self.tile], dtype))
                self.packed.append((leaf, done, offset if nib else None, transposed))
            out.append(done)
        return out

    def _kernel_call(self, call, m: _Match):
        x = call.args[0]
        k = int(x.ty.shape[-1])
        n = int(m.q.ty.shape[0 if m.transposed else 1])
        leaves = [m.q, m.scale] + ([m.zp] if m.zp is not None else [])
        offset, packed = None, all(isinstance(leaf, _Constant) for leaf in leaves)
        if packed:
            arrays = [leaf.value.numpy() for leaf in leaves]
            if m.transposed:
                arrays = [a.T for a in arrays]
            offset = nibble_offset(arrays[0], m.block)
            leaves = [relax.const(pack_columns(a, self.tile)) for a in arrays]
            if offset is not None:
                leaves[0] = relax.const(pack_nibbles(leaves[0].value.numpy(), offset))
        elif self._packable(m):
            packed = True  # arguments packed like constants, lazily (pack_dequant_params)
            done = [o for old, _, o, _ in self.packed if old.same_as(m.q)]
            q = self._argument(m.q)
            offset = done[0] if done else nibble_offset(q.T if m.transposed else q, m.block)
            leaves = self._pack_arguments(leaves, offset, m.transposed)
        lead = list(x.ty.shape)[:-1]
        rows1 = all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in lead)
        func = dequant_matmul_func(k, n, m.block, m.q.ty.dtype, m.scale.ty.dtype, m.zp is not None, packed,
                                   self.tile, 1 if rows1 else 2, offset)
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


def pack_dequant_params(mod, params: dict, lanes: int):
    """``(mod, params)`` with each dequantized matmul whose weight, scale and zero point are arguments
    of ``main`` (weights left outside the library) rewritten to the kernel over packed arguments: their
    types in ``mod`` become ``[ceil(N/T), rows, T]``, their arrays in ``params`` ``PackedWeight`` (packed
    one at a time when the bundle is written or a runner takes them, never all held twice). Only
    arguments read by that one dequantization are packed; a matmul over other arguments gets the
    kernel too, reading them as stored (as ``rewrite_dequant_matmul`` would)."""
    from graphopt.backends.packed_params import PackedWeight, weight_arguments, with_main_params

    NibbleWeight = _nibble_weight_class()
    if not enabled() or not params:
        return mod, params
    main = mod["main"]
    weights, single = weight_arguments(main, params)
    arguments = tuple((v, np.asarray(params[weights[v]])) for v in single)
    if not arguments:
        return mod, params
    rw = _Rewriter(mod, lanes, arguments)
    body = rw.visit_expr(main)
    if not rw.packed:
        return mod, params
    new_mod = with_main_params(rw.builder_, mod, body, [(old, new) for old, new, _, _ in rw.packed])
    out = {}
    for v, name in weights.items():
        how = next(((o, t) for old, _, o, t in rw.packed if old.same_as(v)), None)
        if how is None:
            out[name] = params[name]
            continue
        source = np.asarray(params[name]).T if how[1] else np.asarray(params[name])  # [K or blocks, N]
        out[name] = PackedWeight(source, rw.tile) if how[0] is None else NibbleWeight(source, rw.tile, how[0])
    log.debug("%d weight arguments packed for dequantized matmuls", len(rw.packed))
    return relax.transform.DeadCodeElimination()(new_mod), out


def _nibble_weight_class():
    from graphopt.backends.packed_params import PackedWeight

    class NibbleWeight(PackedWeight):
        """``PackedWeight`` of 4-bit codes, eight a 32-bit word (``pack_nibbles``), packed on request."""

        def __init__(self, source: np.ndarray, lanes: int, offset: int) -> None:
            super().__init__(source, lanes)
            self.offset = offset
            self.shape = (self.shape[0], self.shape[1] // 8, self.shape[2])
            self.dtype = np.dtype(np.int32)
            self.nbytes = int(np.prod(self.shape)) * 4

        def __array__(self, dtype=None, copy=None) -> np.ndarray:
            panels = PackedWeight(self.source, self.lanes).__array__()
            out = pack_nibbles(panels, self.offset)
            return out if dtype is None else out.astype(dtype, copy=False)

    return NibbleWeight

"""Matmuls with a constant right operand read it packed: ``[K, N]`` → ``[ceil(N/L), K, L]`` (CPU).

A Relax pass (``rewrite_packed_matmul``, run before LegalizeOps beside the Winograd rewrite) replaces
``relax.matmul(x, W)`` with a constant 2-D ``W`` by a ``call_te`` to a function of two stages:

* ``packed_matmul``      ``[..., M, ceil(N/L), L]``: the product with the packed weight (zero columns
  pad ``N`` up to a multiple of the lanes ``L``), register-tiled by the matmul rule with the ``L``
  lanes as the vector axis;
* ``packed_matmul_out``  ``[..., M, N]``: the columns back in order (the bias and what else fuses
  after the matmul follow it).

Two things this fixes, as GEMM libraries do with their packed B panels:

* an ``N`` with no power-of-two divisor: the rule vectorizes over a divisor of ``N``, 5 lanes for
  PP-OCRv4 rec's 6625 classes (40x120 times 120x6625: 2.3 ms, against 0.6 for numpy's SGEMM);
* one register tile reads ``K`` weight vectors of one panel from consecutive cache lines, not one
  cache line per row of a ``[K, N]`` weight (120 rows 26 KB apart: a page and a prefetch stream each).

A panel is 1 to 3 vectors wide (``panel_lanes``): the register tile spans the whole panel, so each
broadcast of ``x`` feeds up to 3 FMAs (schedules/tiling.py, ``PANEL_BLOCK``).

The weight is packed once, at compile time, in numpy. ``GRAPHOPT_PACKED_MATMUL=0`` turns it off.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.constants import bound_constant, rewrite_relax_functions

log = logging.getLogger(__name__)
_MATMUL = tvm.ir.Op.get("relax.matmul")
MIN_COLUMNS = 16  # narrower weights (a handful of outputs) stay as they are
PAD_ROWS = 8  # a symbolic row count is computed in whole tiles of this many rows (schedules/symbolic.py)
MAX_PADDING = 0.25  # zero columns, as a share of N, above which packing does more work than it saves
# Vectors a panel spans -> the share of its peak a register tile of that many vectors reaches. One tile
# holds nvec x rows accumulators (rows = the accumulator registers // nvec): each broadcast of x feeds
# nvec FMAs, each weight vector ``rows``. 128x768 @ 768x3072 on 2 cores, AVX-512: 3 vectors x 8 rows
# 297 GFLOP/s, 2 x 8 273, 1 x 16 255 (ORT 285); 128x3072 @ 3072x768: 301 against 230 (ORT 303).
PANEL_EFFICIENCY = {3: 1.0, 2: 0.92, 1: 0.85}


def panel_lanes(n: int, lanes: int) -> int:
    """Columns of one packed panel for an ``N`` of ``n``: 1 to 3 vectors of ``lanes``, the widest
    unless its zero padding costs more than the wider register tile gains (64 columns: 2 vectors)."""
    def score(nvec: int) -> float:
        width = nvec * lanes
        return PANEL_EFFICIENCY[nvec] * n / (math.ceil(n / width) * width)

    return lanes * max(PANEL_EFFICIENCY, key=lambda nvec: (score(nvec), nvec))


def pack_weight(w: np.ndarray, lanes: int) -> np.ndarray:
    """``[K, N]`` → ``[ceil(N/lanes), K, lanes]``, the columns past ``N`` zero (``lanes``: the panel's
    width, ``panel_lanes``)."""
    k, n = w.shape
    nb = math.ceil(n / lanes)
    padded = np.zeros((k, nb * lanes), w.dtype)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, nb, lanes).transpose(1, 0, 2))


def packed_matmul_te(x: te.Tensor, wp: te.Tensor, n: int) -> te.Tensor:
    """``x [..., M, K]`` times the packed weight ``wp [NB, K, L]``: ``[..., M, n]``."""
    *lead, m, k = (int(d) if isinstance(d, tirx.IntImm) else d for d in x.shape)  # M may be symbolic
    nb, _, lanes = (int(d) for d in wp.shape)
    rk = te.reduce_axis((0, k), "rk")
    if isinstance(m, int) and (m % PAD_ROWS == 0 or m < PAD_ROWS):
        rows, row = m, lambda r: r
    else:  # a symbolic M, or a static one with no whole register tile (ViT's 197 rows, a prime: a tile of
        # 1 row ran 10x slower than 200 rows): rows padded to a whole tile, the row index clamped (in
        # bounds, no branch)
        rows = tirx.floordiv(m + PAD_ROWS - 1, PAD_ROWS) * PAD_ROWS
        row = lambda r: tirx.min(r, m - 1)  # noqa: E731
    mm = te.compute(
        (*lead, rows, nb, lanes),
        lambda *i: te.sum(x[(*i[:-3], row(i[-3]), rk)] * wp[i[-2], rk, i[-1]], axis=rk),
        name="packed_matmul",
    )
    return te.compute(
        (*lead, m, n), lambda *i: mm[(*i[:-1], i[-1] // lanes, i[-1] % lanes)], name="packed_matmul_out"
    )


def why_not(call: relax.Call, w, lanes: int) -> str | None:
    """None when ``call`` (a relax.matmul with right operand ``w``) takes the packed weight, else why not."""
    if not isinstance(w, tvm.ir.expr.Constant):
        return "the weight is not a constant"
    return why_not_shape(call, w, lanes)


def why_not_shape(call: relax.Call, w, lanes: int) -> str | None:
    """``why_not`` for any weight expression ``w`` (a constant, or a weight the caller packs itself)."""
    x = call.args[0]
    shape = x.ty.shape if hasattr(x.ty, "shape") and x.ty.shape is not None else None
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], tirx.IntImm):
        return "the input's last dim (K) is not static"
    if x.ty.dtype != "float32" or w.ty.dtype != "float32" or len(w.ty.shape) != 2:
        return "not a float32 matrix times a 2-D weight"
    if str(call.attrs.out_dtype) not in ("", "None", "void", "float32"):
        return "the result is not float32"
    n = int(w.ty.shape[1])
    if n < MIN_COLUMNS:
        return f"{n} columns: too narrow to pay for a packed weight"
    width = panel_lanes(n, lanes)
    if (math.ceil(n / width) * width - n) > MAX_PADDING * n:
        return f"{n} columns pad to a multiple of {width} with too many zeros"
    return None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_MATMUL)):
            return call
        w = bound_constant(self, call.args[1]) or call.args[1]
        why = why_not(call, w, self.lanes)
        if why is not None:
            log.debug("matmul %s keeps its weight: %s", w.ty.shape, why)
            return call
        weight = w.value.numpy()
        self.rewritten += 1
        wp = relax.const(pack_weight(weight, panel_lanes(int(weight.shape[1]), self.lanes)))
        return self.builder_.call_te(packed_matmul_te, call.args[0], wp, int(weight.shape[1]),
                                     primfunc_name_hint="packed_matmul")


def enabled() -> bool:
    return os.environ.get("GRAPHOPT_PACKED_MATMUL", "1") != "0"


def rewrite_packed_matmul(mod, lanes: int):
    """Every matmul of ``mod`` with a constant 2-D weight (``why_not``) reading it packed by ``lanes``."""
    if not enabled():
        return mod
    rw = _Rewriter(mod, lanes)
    new = rewrite_relax_functions(mod, rw)
    return new if rw.rewritten else mod

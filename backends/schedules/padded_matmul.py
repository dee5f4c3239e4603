"""Matmuls of two activations over a symbolic dim computed in whole tiles (attention's QK^T and PV).

With a sequence length left symbolic (``--max seq=N``), attention's scores ``[.., seq, seq]`` have a
symbolic row count and a symbolic column count. A split of either by the kernel's tile leaves a
partial tile, and the predicate that guards it sits inside the vectorized loop: TVM then emits
scalar code. This Relax rewrite (before LegalizeOps, CPU only) replaces such a ``relax.matmul(a, b)``
by a ``call_te`` of three stages:

* ``padded_rhs``     ``b`` with its columns padded with zeros to a multiple of the vector lanes
  (only when ``N`` is symbolic; a copy of the small operand, K x N per head);
* ``padded_matmul``  ``[.., Mp, Np]``: rows padded to a multiple of ``ROWS`` (the row index clamped to
  the last real row: in bounds, no branch), columns read from ``padded_rhs``: every tile is whole;
* ``padded_matmul_out`` ``[.., M, N]``: the real part.

Static matmuls are left alone (graphopt's static rules serve them).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.constants import rewrite_relax_functions

_MATMUL = tvm.ir.Op.get("relax.matmul")
ROWS = 8  # schedules/symbolic.py REG_TILE


def _pad(n, tile: int):
    return tirx.floordiv(n + tile - 1, tile) * tile


def padded_matmul_te(a: te.Tensor, b: te.Tensor, lanes: int) -> te.Tensor:
    *lead, m, k = a.shape
    n = b.shape[-1]
    static = lambda d: isinstance(d, tirx.IntImm)  # noqa: E731
    rows = m if static(m) else _pad(m, ROWS)
    cols = n if static(n) else _pad(n, lanes)
    if not static(n):
        rhs = te.compute((*lead, k, cols), lambda *i: tirx.if_then_else(
            i[-1] < n, b[(*i[:-1], tirx.min(i[-1], n - 1))], tirx.const(0, b.dtype)), name="padded_rhs")
    else:
        rhs = b
    row = (lambda r: r) if static(m) else (lambda r: tirx.min(r, m - 1))
    rk = te.reduce_axis((0, k), "rk")
    mm = te.compute((*lead, rows, cols), lambda *i: te.sum(
        a[(*i[:-2], row(i[-2]), rk)] * rhs[(*i[:-2], rk, i[-1])], axis=rk), name="padded_matmul")
    return te.compute((*lead, m, n), lambda *i: mm[i], name="padded_matmul_out")


def applies(call: relax.Call) -> bool:
    """Two float32 operands of the same rank and batch dims, K static or not, M or N symbolic."""
    a, b = call.args
    sa, sb = (getattr(x.ty, "shape", None) for x in (a, b))
    if not isinstance(sa, relax.ShapeExpr) or not isinstance(sb, relax.ShapeExpr):
        return False
    da, db = list(sa.values), list(sb.values)
    if len(da) < 2 or len(da) != len(db) or a.ty.dtype != "float32" or b.ty.dtype != "float32":
        return False
    if str(call.attrs.out_dtype) not in ("", "None", "void", "float32"):
        return False
    ana = tvm.sym.Analyzer()
    if not all(ana.can_prove_equal(x, y) for x, y in zip(da[:-2], db[:-2])) or not ana.can_prove_equal(da[-1], db[-2]):
        return False
    return not isinstance(da[-2], tirx.IntImm) or not isinstance(db[-1], tirx.IntImm)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_MATMUL)) or not applies(call):
            return call
        self.rewritten += 1
        return self.builder_.call_te(padded_matmul_te, call.args[0], call.args[1], self.lanes,
                                     primfunc_name_hint="padded_matmul")


def rewrite_padded_matmul(mod, lanes: int):
    """Every activation x activation matmul of ``mod`` with a symbolic M or N, computed in whole tiles."""
    rw = _Rewriter(mod, lanes)
    new = rewrite_relax_functions(mod, rw)
    return new if rw.rewritten else mod

"""Weights repacked once at compile time for the schedules that want another layout.

A rule that reads a weight in a blocked layout (the channel-vector conv wants ``[O/L, I, KH, KW, L]``)
may rewrite the PrimFunc's parameter layout directly, but only for parameters that are Relax
constants at every call site (``constant_params``); it records the change in the function attribute
``REPACK_ATTR`` (``{param index: layout name}``), and ``repack_constants`` then rewrites those constants
with numpy, so nothing is repacked at run time.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

REPACK_ATTR = "graphopt.repack"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def oihw_blocked(w: np.ndarray, lanes: int) -> np.ndarray:
    """``[O, I, KH, KW]`` → ``[O/L, I, KH, KW, L]``: the L output channels of one tap are contiguous."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o // lanes, lanes, i, kh, kw).transpose(0, 2, 3, 4, 1))


def layout_name(lanes: int) -> str:
    """The attribute value naming ``oihw_blocked`` with ``lanes`` channels per block, e.g. ``OIHW16o``."""
    return f"OIHW{lanes}o"


def _apply_layout(name: str, w: np.ndarray) -> np.ndarray:
    if not (name.startswith("OIHW") and name.endswith("o")):
        raise ValueError(f"unknown weight layout {name!r}")
    return oihw_blocked(w, int(name[4:-1]))


def _is_const(e) -> bool:
    return isinstance(e, tvm.ir.expr.Constant)


def _call_tir_sites(mod):
    """Every ``call_tir(gv, args)`` in the module's Relax functions."""
    sites = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: sites.append(e) if isinstance(e, relax.Call) and e.op.same_as(_CALL_TIR) else None
            )
    return sites


def constant_params(mod) -> dict[str, frozenset[int]]:
    """For each PrimFunc called with call_tir: the argument positions that are constants at every call."""
    seen: dict[str, frozenset[int]] = {}
    for call in _call_tir_sites(mod):
        name = call.args[0].name_hint
        args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else []
        consts = frozenset(i for i, a in enumerate(args) if _is_const(a))
        seen[name] = consts if name not in seen else seen[name] & consts
    return seen


def repack_constants(mod):
    """Rewrite the constants of every PrimFunc carrying ``REPACK_ATTR``; the attribute is dropped.

    Such a function's signature changed, so it gets a fresh GlobalVar (the old one's type still
    names the old weight shape) and its call sites are pointed at it.
    """
    plans, replaced = {}, {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs and REPACK_ATTR in func.attrs:
            plans[gv.name_hint] = {int(k): str(v) for k, v in func.attrs[REPACK_ATTR].items()}
            replaced[gv.name_hint] = func.without_attr(REPACK_ATTR)
    if not plans:
        return mod
    rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint not in plans},
                        attrs=mod.attrs, global_infos=mod.global_infos)
    bb = relax.BlockBuilder(rest)
    new_gvs = {name: bb.add_func(func, name) for name, func in replaced.items()}  # typed by the new signature

    @mutator
    class _Repack(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)):
                return call
            name = call.args[0].name_hint
            if name not in plans:
                return call
            fields = list(call.args[1].fields)
            for i, layout in plans[name].items():
                fields[i] = relax.const(_apply_layout(layout, fields[i].value.numpy()))
            return relax.Call(call.op, [new_gvs[name], relax.Tuple(fields), *call.args[2:]], call.attrs, call.ty_args)

    for gv, func in rest.functions_items():
        if isinstance(func, relax.Function):
            bb.update_func(gv, _Repack().visit_expr(func))
    return bb.get()

"""GPU schedules: every fused function goes to the first rule of ``gpu_rules()`` that takes it.

The order puts graphopt's rules where TVM's dlight rules are slow (see ``gpu_window.py``) and keeps
dlight's where they are right: ``Matmul`` (convs and matmuls as tiled GEMMs in shared memory),
``GEMV``, ``Reduction`` and ``GeneralReduction`` (softmax, layer norm, large means), and
``Fallback`` (one thread per element: the right schedule for copies, transposes, concats, resizes).
A function no rule takes is a bug (TVM would refuse to build it, asking for thread bindings): it is
reported by name. ``last_gpu_report()`` returns ``{function: rule}`` of the latest call.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from tvm import tirx

from .analysis import is_scheduled, with_functions
from .gpu_window import WindowReduction

_LAST: dict[str, str] = {}


def gpu_rules(graphopt_rules: bool = True) -> list[tuple[str, object]]:
    """(name, rule) in the order they are tried; ``graphopt_rules=False``: dlight's alone (for comparison)."""
    from tvm.s_tir import dlight as dl

    ours = [("window", WindowReduction())] if graphopt_rules else []
    return [
        ("dlight.Matmul", dl.gpu.Matmul()),
        *ours,
        ("dlight.GEMV", dl.gpu.GEMV()),
        ("dlight.Reduction", dl.gpu.Reduction()),
        ("dlight.GeneralReduction", dl.gpu.GeneralReduction()),
        ("dlight.Fallback", dl.gpu.Fallback()),
    ]


def apply_gpu_schedules(mod, target, *, rules: Sequence[tuple[str, object]] | None = None,
                        report: dict | None = None):
    """Schedule every PrimFunc of ``mod`` not scheduled yet for the GPU ``target`` (a ``tvm.target.Target``).

    ``report`` (and ``last_gpu_report()``) receives ``{function: rule name}``; functions that were
    already scheduled (a tuning record, graphopt's CPU rules never run here) are reported as "scheduled".
    Raises RuntimeError naming the functions no rule could schedule.
    """
    rules = gpu_rules() if rules is None else rules
    report = {} if report is None else report
    _LAST.clear()
    updates, missing = {}, []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if is_scheduled(func):
            report[gv.name_hint] = "scheduled"
            continue
        for name, rule in rules:
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            report[gv.name_hint] = name
            break
        else:
            missing.append(gv.name_hint)
    _LAST.update(report)
    if missing:
        raise RuntimeError(f"no GPU schedule rule applies to {', '.join(missing)}")
    return with_functions(mod, updates)


def last_gpu_report() -> dict[str, str]:
    return dict(_LAST)


def rule_counts(report: dict[str, str]) -> dict[str, int]:
    """``{rule: number of functions}``, most used first."""
    return dict(collections.Counter(report.values()).most_common())


__all__ = ["apply_gpu_schedules", "gpu_rules", "last_gpu_report", "rule_counts"]

"""graphopt's default CPU schedules, applied to every fused PrimFunc without a tuning record.

TVM's llvm pipeline applies no schedule to a PrimFunc that has no tuning record, so without these
every conv and matmul runs as serial scalar loops. Each fused function goes to the first rule that
recognises its main block (``RULES``, one module per op family); every block the rule left at the
root (pads, transposes, reductions it did not fuse) then gets the injective / row-reduction schedule.
Functions that already carry a schedule (``tirx.is_scheduled``, e.g. from a tuning database) are
left alone. Rules take the target's vector width and core count (``features.CPUFeatures``), so the
same rules serve x86 (AVX-512: 16 fp32 lanes) and aarch64 (NEON: 4 lanes). Constant conv weights
that a rule reads in a blocked layout are repacked once, at compile time (``prepack.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tvm import s_tir, tirx

from .analysis import (int_extent, is_copy, is_data_movement, is_kept, is_reduction_block, is_scheduled,
                       is_spatial_block, root_blocks, with_functions)
from .conv2d import schedule_conv2d
from .conv2d_blocked import schedule_conv2d_blocked
from .features import CPUFeatures, Knobs, RuleContext, features_of
from .injective import schedule_injective
from .layer_norm import schedule_layer_norm
from .matmul import schedule_matmul
from .pooling import schedule_pool
from .prepack import constant_params, repack_constants
from .reduction import schedule_normalization, schedule_row_reduction
from .softmax import schedule_softmax
from .winograd import schedule_winograd

__all__ = ["RULES", "Knobs", "apply_default_schedules", "features_of", "last_report", "schedule_primfunc",
           "schedule_with_knobs"]

log = logging.getLogger(__name__)

Rule = Callable[[tirx.PrimFunc, RuleContext], "s_tir.Schedule | None"]

# Tried in order; the first that returns a schedule wins.
RULES: tuple[tuple[str, Rule], ...] = (
    ("winograd", schedule_winograd),
    ("softmax", schedule_softmax),
    ("layer_norm", schedule_layer_norm),
    ("normalization", schedule_normalization),
    ("conv2d_blocked", schedule_conv2d_blocked),
    ("conv2d", schedule_conv2d),
    ("matmul", schedule_matmul),
    ("pool", schedule_pool),
)


def _inline_data_movement(sch: s_tir.Schedule) -> None:
    """Fold pad / dilate / transpose blocks into the spatial blocks that read them (one pass, not two).

    Only into spatial consumers: a pad folded into a conv's reduction would put a branch in its
    vector loop. A plain copy (a pad of zero width before a 1x1 conv) has no branch and goes into
    any consumer.
    """
    for block in root_blocks(sch):
        try:
            cons = list(sch.get_consumers(block))
            if cons and is_data_movement(sch, block) and not is_kept(sch, block) and (
                    is_copy(sch, block) or all(is_spatial_block(sch, c) for c in cons)):
                sch.compute_inline(block)
        except Exception as e:  # noqa: BLE001 - an output, or a consumer that cannot take it
            log.debug("block %s not inlined: %s", sch.get(block).name_hint, e)


def _schedule_rest(sch: s_tir.Schedule, feats: CPUFeatures) -> None:
    """Injective / row-reduction schedules for every root block whose loops are still untouched."""
    _inline_data_movement(sch)
    for block in root_blocks(sch):
        loops = sch.get_loops(block)
        if not loops or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
            continue
        if not sch.get(block).iter_vars:  # opaque: a rule's loop partition (softmax.py), already scheduled
            continue
        if any(int_extent(sch, lp) is None for lp in loops):
            continue
        try:
            if is_reduction_block(sch, block):
                schedule_row_reduction(sch, block, feats)
            else:
                schedule_injective(sch, block, feats)
        except Exception as e:  # noqa: BLE001 - a block we cannot schedule stays as it was
            log.debug("block %s left unscheduled: %s", sch.get(block).name_hint, e)


def schedule_primfunc(func: tirx.PrimFunc, feats: CPUFeatures, constants: frozenset = frozenset(),
                      choice: dict | None = None) -> tuple[tirx.PrimFunc, str]:
    """The scheduled function and the name of the rule that scheduled its main block ("generic").

    ``constants``: positions of parameters that are compile-time constants at every call site;
    ``choice``: decisions that replace the rules' defaults (a tuning record, see ``Knobs``).
    """
    out, name, _ = schedule_with_knobs(func, feats, constants, choice)
    return out, name


def schedule_with_knobs(func: tirx.PrimFunc, feats: CPUFeatures, constants: frozenset = frozenset(),
                        choice: dict | None = None) -> tuple[tirx.PrimFunc, str, Knobs]:
    """``schedule_primfunc``, also returning the decisions taken and their alternatives."""
    for name, rule in RULES:
        ctx = RuleContext(feats, frozenset(constants), knobs=Knobs(choice))
        try:
            sch = rule(func, ctx)
        except Exception as e:  # noqa: BLE001 - a rule that fails mid-way means "not applicable"
            log.debug("rule %s failed: %s", name, e)
            sch = None
        if sch is not None:
            break
    else:
        name, sch, ctx = "generic", s_tir.Schedule(func), RuleContext(feats, knobs=Knobs(choice))
    try:
        _schedule_rest(sch, feats)
    except Exception as e:  # noqa: BLE001
        log.debug("rest of %s left unscheduled: %s", name, e)
    out = sch.mod["main"]
    return (out.with_attrs(ctx.attrs) if ctx.attrs else out), name, ctx.knobs


_LAST: dict[str, str] = {}


def last_report() -> dict[str, str]:
    """``{function: rule}`` of the most recent ``apply_default_schedules`` call in this process."""
    return dict(_LAST)


def apply_default_schedules(mod, target_spec, *, report: dict | None = None, choices: Callable | None = None):
    """Schedule every PrimFunc of ``mod`` that has no schedule yet; returns the new IRModule.

    ``target_spec``: a graphopt ``TargetSpec`` or a ``tvm.target.Target``; GPU targets are returned
    unchanged (TVM's GPU rules bind them). ``report``, if given, receives ``{function: rule}``
    (``last_report()`` returns the same for the latest call). ``choices(func, constants)``: the tuned
    decisions for a function, or None for the rules' defaults (``tuning.records``).
    """
    report = {} if report is None else report
    _LAST.clear()
    feats = features_of(target_spec)
    if feats.target is not None and feats.target.kind.name != "llvm":
        return mod
    consts = constant_params(mod)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        constants = consts.get(gv.name_hint, frozenset())
        choice = choices(func, constants) if choices is not None else None
        new, rule = schedule_primfunc(func, feats, constants, choice)
        updates[gv] = new.with_attr("tirx.is_scheduled", True)
        report[gv.name_hint] = rule
    _LAST.update(report)
    if not updates:
        return mod
    return repack_constants(with_functions(mod, updates))

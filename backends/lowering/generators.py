"""Lowering rules: ops whose output depends only on small constant inputs (window functions, MelWeightMatrix).

graphopt computes them at compile time: the lowering folds any node whose inputs are all constant before
it looks for a rule, so these rules only run when an input is computed at run time (and then say so), or
when the output is too large to have been folded.
"""

from __future__ import annotations

import numpy as np

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule


def lower_constant_only(ctx, ins):
    arrays = [ctx.require_const(i, "a compile-time constant") if ctx.has_input(i) else None
              for i in range(ctx.num_inputs)]
    from graphopt.backends.lowering.convert import _reference_eval  # the folding evaluator

    outs = _reference_eval(ctx.node, ctx.opset, arrays)
    return [None if o is None else H.const(np.asarray(o)) for o in outs]


RULES = tuple(
    OpRule(op, lower_constant_only, since=17, kind="decomposed")
    for op in ("HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix")
)

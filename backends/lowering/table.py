"""The op table: every (domain, op, opset range) graphopt lowers to Relax, gathered from one module per op family.

The modules are listed here explicitly (no registration by import side effect).
"""

from __future__ import annotations

from graphopt.backends.lowering import (
    casts,
    control,
    elementwise,
    generators,
    graphopt_ops,
    indexing,
    losses,
    nn,
    ort_contrib,
    ort_transformer,
    qdq,
    quant,
    reduce,
    rnn,
    signal,
    tensor,
    training,
)
from graphopt.backends.lowering.rules import OpRule

RULES: tuple[OpRule, ...] = (
    *elementwise.RULES,
    *casts.RULES,
    *tensor.RULES,
    *indexing.RULES,
    *reduce.RULES,
    *losses.RULES,
    *generators.RULES,
    *training.RULES,
    *signal.RULES,
    *nn.RULES,
    *rnn.RULES,
    *control.RULES,
    *quant.RULES,
    *qdq.RULES,
    *graphopt_ops.RULES,
    *ort_contrib.RULES,
    *ort_transformer.RULES,
)


def find_rule(domain: str, op: str, opset: int) -> OpRule | None:
    """The rule implementing ``op`` at ``opset`` in ``domain`` ("" and "ai.onnx" are the same), or None."""
    domain = "" if domain == "ai.onnx" else domain
    for rule in RULES:
        if rule.covers(domain, op, opset):
            return rule
    return None

"""Lowering rules: the graphopt-domain ops (version 1) the fusion passes emit.

Contracts are those of :mod:`graphopt.passes.graphopt_ops`: Gelu, HardSwish, Mish and
LayerNormalization behave as their standard-opset namesakes (Gelu-20, HardSwish-14, Mish-18,
LayerNormalization-17 first output); ``Attention(Q, K, V[, Mask]; scale)`` is
softmax(Q·Kᵀ·scale + Mask)·V over the last two axes, with numpy broadcasting over leading dims.
"""

from __future__ import annotations

from tvm import relax

from graphopt.backends.lowering import elementwise, helpers, nn
from graphopt.backends.lowering.rules import OpRule

op = relax.op
DOMAIN = "graphopt"


def _standard(op_type: str):
    """The standard-domain elementwise rule for ``op_type`` (same contract)."""
    for rule in elementwise.RULES:
        if rule.op == op_type and rule.domain == "":
            return rule.fn
    raise LookupError(op_type)


def _elementwise(op_type: str):
    def lower(ctx, inputs):
        return _standard(op_type)(ctx, inputs)

    return lower


def _layer_norm(ctx, inputs):
    bias = inputs[2] if len(inputs) > 2 else None
    y, _, _ = nn.layer_norm(ctx, inputs[0], inputs[1], bias, int(ctx.attr("axis", -1)),
                            float(ctx.attr("epsilon", 1e-5)), False, need_stats=False)
    return y


def scaled_dot_product(ctx, q, k, v, scale: float, mask=None) -> relax.Expr:
    """softmax(q·kᵀ·scale + mask)·v over the last two axes (mask: additive, or bool where True keeps)."""
    rank = helpers.rank_of(k)
    kt = op.permute_dims(k, list(range(rank - 2)) + [rank - 1, rank - 2])
    scores = op.multiply(op.matmul(q, kt), helpers.scalar(scale, helpers.dtype_of(q)))
    if mask is not None:
        if helpers.dtype_of(mask) == "bool":
            scores = op.where(mask, scores, helpers.scalar(float("-inf"), helpers.dtype_of(q)))
        else:
            scores = op.add(scores, mask)
    probs = ctx.emit(op.nn.softmax(scores, axis=-1))
    return op.matmul(probs, v)


def _attention(ctx, inputs):
    from graphopt.backends.lowering.flash_attention import lower_fused_attention

    q, k, v = inputs[:3]
    mask = inputs[3] if len(inputs) > 3 else None
    scale = float(ctx.attr("scale", 1.0))
    fused = lower_fused_attention(ctx, q, k, v, mask, scale)  # one kernel, no score matrix
    return fused if fused is not None else scaled_dot_product(ctx, q, k, v, scale, mask)


RULES = (
    OpRule("Gelu", _elementwise("Gelu"), domain=DOMAIN, kind="decomposed"),
    OpRule("HardSwish", _elementwise("HardSwish"), domain=DOMAIN, kind="decomposed"),
    OpRule("Mish", _elementwise("Mish"), domain=DOMAIN, kind="decomposed"),
    OpRule("LayerNormalization", _layer_norm, domain=DOMAIN, kind="decomposed"),
    OpRule("Attention", _attention, domain=DOMAIN, kind="decomposed"),
)

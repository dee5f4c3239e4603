"""Lowering rules: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (gather + masked reductions)."""

from __future__ import annotations

from tvm import relax

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule

R = relax.op


def _nll(ctx, logp, target, weight):
    """-logp[n, target[n, ...], ...] * weight[target], with ignore_index and the reduction attribute."""
    dtype = H.dtype_of(logp)
    tdtype = H.dtype_of(target)
    ignore = ctx.attr("ignore_index")
    keep = None
    if ignore is not None:
        keep = ctx.emit(R.not_equal(target, H.scalar(ignore, tdtype)))
        target = ctx.emit(R.where(keep, target, H.scalar(0, tdtype)))
    picked = ctx.emit(R.gather_elements(logp, ctx.emit(R.expand_dims(target, 1)), axis=1))
    picked = ctx.emit(R.squeeze(picked, [1]))
    w = ctx.emit(R.take(weight, target, axis=0)) if weight is not None else None
    if keep is not None:
        mask = ctx.emit(R.astype(keep, dtype))
        w = mask if w is None else ctx.emit(R.multiply(w, mask))
    loss = ctx.emit(R.negative(picked if w is None else R.multiply(picked, w)))
    reduction = ctx.attr("reduction", "mean")
    if reduction == "none":
        return loss
    total = ctx.emit(R.sum(loss))
    if reduction == "sum":
        return total
    if reduction != "mean":
        ctx.unsupported(f"reduction {reduction!r}")
    if w is None:
        return R.divide(total, H.scalar(H.numel(H.static_shape(loss) or ()), dtype)) \
            if H.static_shape(loss) is not None else R.mean(loss)
    return R.divide(total, R.sum(w))


def lower_nll_loss(ctx, ins):
    weight = ins[2] if len(ins) > 2 else None
    return _nll(ctx, ins[0], ins[1], weight)


def lower_softmax_cross_entropy(ctx, ins):
    scores = ins[0]
    compute = H.dtype_of(scores)
    if compute in ("float16", "bfloat16"):  # as ONNX Runtime: log-softmax in float32
        scores = ctx.emit(R.astype(scores, "float32"))
    logp = ctx.emit(R.nn.log_softmax(scores, axis=1))
    weight = ins[2] if len(ins) > 2 else None
    if weight is not None and H.dtype_of(weight) != H.dtype_of(logp):
        weight = ctx.emit(R.astype(weight, H.dtype_of(logp)))
    loss = ctx.emit(_nll(ctx, logp, ins[1], weight))
    if compute != H.dtype_of(logp):
        loss = ctx.emit(R.astype(loss, compute))
        logp = ctx.emit(R.astype(logp, compute))
    return [loss, logp] if ctx.num_outputs > 1 else loss


RULES = (
    OpRule("NegativeLogLikelihoodLoss", lower_nll_loss, since=12, kind="decomposed"),
    OpRule("SoftmaxCrossEntropyLoss", lower_softmax_cross_entropy, since=12, kind="decomposed"),
)

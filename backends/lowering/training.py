"""Lowering rules: the ai.onnx.preview.training optimizers (Adagrad, Momentum, Adam), one update step.

Inputs are R (learning rate), T (update count), then the n tensors X, their gradients G, and their
per-optimizer state; outputs are the n new X followed by the new state tensors.
"""

from __future__ import annotations

from tvm import relax

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule

R = relax.op
DOMAIN = "ai.onnx.preview.training"


def _groups(ctx, ins, k: int):
    tensors = ins[2:]
    n = len(tensors) // k
    if n * k != len(tensors):
        ctx.unsupported(f"expects R, T and {k} groups of equally many tensors, got {len(ins)} inputs")
    return [tensors[i * n:(i + 1) * n] for i in range(k)]


def _f(x, v):
    return H.scalar(v, H.dtype_of(x))


def _scalar_as(ctx, s, like):
    return s if H.dtype_of(s) == H.dtype_of(like) else ctx.emit(R.astype(s, H.dtype_of(like)))


def lower_adagrad(ctx, ins):
    xs, gs, hs = _groups(ctx, ins, 3)
    norm, decay = ctx.attr("norm_coefficient", 0.0), ctx.attr("decay_factor", 0.0)
    eps = ctx.attr("epsilon", 1e-6)
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        r = _scalar_as(ctx, ins[0], x)
        t = _scalar_as(ctx, ins[1], x)
        r = ctx.emit(R.divide(r, R.add(_f(x, 1.0), R.multiply(t, _f(x, decay)))))
        greg = ctx.emit(R.add(R.multiply(_f(x, norm), x), g))
        hn = ctx.emit(R.add(h, R.multiply(greg, greg)))
        new_x.append(R.subtract(x, R.multiply(r, R.divide(greg, R.add(R.sqrt(hn), _f(x, eps))))))
        new_h.append(hn)
    return new_x + new_h


def lower_momentum(ctx, ins):
    xs, gs, vs = _groups(ctx, ins, 3)
    norm, alpha, beta = ctx.attr("norm_coefficient"), ctx.attr("alpha"), ctx.attr("beta")
    nesterov = ctx.attr("mode") == "nesterov"
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        r = _scalar_as(ctx, ins[0], x)
        first = R.greater(ins[1], H.scalar(0, H.dtype_of(ins[1])))
        beta_adj = ctx.emit(R.where(first, _f(x, beta), _f(x, 1.0)))
        greg = ctx.emit(R.add(R.multiply(_f(x, norm), x), g))
        vn = ctx.emit(R.add(R.multiply(_f(x, alpha), v), R.multiply(beta_adj, greg)))
        step = R.add(greg, R.multiply(_f(x, alpha), vn)) if nesterov else vn
        new_x.append(R.subtract(x, R.multiply(r, step)))
        new_v.append(vn)
    return new_x + new_v


def lower_adam(ctx, ins):
    xs, gs, vs, hs = _groups(ctx, ins, 4)
    alpha, beta = ctx.attr("alpha", 0.9), ctx.attr("beta", 0.999)
    norm, post = ctx.attr("norm_coefficient", 0.0), ctx.attr("norm_coefficient_post", 0.0)
    eps = ctx.attr("epsilon", 1e-6)
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs):
        r = _scalar_as(ctx, ins[0], x)
        t = _scalar_as(ctx, ins[1], x)
        greg = ctx.emit(R.add(R.multiply(_f(x, norm), x), g))
        vn = ctx.emit(R.add(R.multiply(_f(x, alpha), v), R.multiply(_f(x, 1 - alpha), greg)))
        hn = ctx.emit(R.add(R.multiply(_f(x, beta), h), R.multiply(_f(x, 1 - beta), R.multiply(greg, greg))))
        hs_ = ctx.emit(R.add(R.sqrt(hn), _f(x, eps)))
        corr = R.divide(R.sqrt(R.subtract(_f(x, 1.0), R.power(_f(x, beta), t))),
                        R.subtract(_f(x, 1.0), R.power(_f(x, alpha), t)))
        r_adj = ctx.emit(R.where(R.greater(t, _f(x, 0.0)), R.multiply(r, corr), r))
        xn = R.subtract(x, R.multiply(r_adj, R.divide(vn, hs_)))
        new_x.append(R.multiply(_f(x, 1.0 - post), xn))
        new_v.append(vn)
        new_h.append(hn)
    return new_x + new_v + new_h


RULES = (
    OpRule("Adagrad", lower_adagrad, domain=DOMAIN, kind="decomposed"),
    OpRule("Momentum", lower_momentum, domain=DOMAIN, kind="decomposed"),
    OpRule("Adam", lower_adam, domain=DOMAIN, kind="decomposed"),
)

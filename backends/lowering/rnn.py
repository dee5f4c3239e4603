"""Lowering rules: LSTM, GRU and RNN, unrolled over the (static) sequence length.

The input projection X·Wᵀ + Wb of every time step is one matmul; each step then adds H·Rᵀ, applies the
cell's gates and, with ``sequence_lens``, keeps the previous state (and writes zeros to Y) past each batch
entry's length. Reverse directions walk the steps backwards, so a shorter sequence starts at its own end.
Outputs follow ``layout`` 0 ([T, D, B, H]) or 1 ([B, T, D, H]).
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering import nan_minmax as NM
from graphopt.backends.lowering.helpers import scalar
from graphopt.backends.lowering.rules import OpRule

op = relax.op

MAX_STEPS = 4096  # unrolling longer sequences makes modules too large to compile in reasonable time


def _act(name: str, alpha: float | None, beta: float | None, dtype: str):
    """The activation function ``name`` (ONNX RNN activation names) with its alpha/beta."""
    def s(_x, v):
        return scalar(v, dtype)

    a = alpha
    b = beta
    table = {
        "Sigmoid": lambda x: op.sigmoid(x),
        "Tanh": lambda x: op.tanh(x),
        "Relu": lambda x: op.maximum(s(x, 0.0), x),  # constant first: NaN kept (nan_minmax)
        "Affine": lambda x: op.add(op.multiply(x, s(x, 1.0 if a is None else a)), s(x, 0.0 if b is None else b)),
        "LeakyRelu": lambda x: op.where(op.less(x, s(x, 0.0)), op.multiply(x, s(x, 0.01 if a is None else a)), x),
        "ThresholdedRelu": lambda x: op.where(op.greater(x, s(x, 1.0 if a is None else a)), x, s(x, 0.0)),
        "ScaledTanh": lambda x: op.multiply(s(x, 1.0 if a is None else a), op.tanh(op.multiply(x, s(x, 1.0 if b is None else b)))),
        "HardSigmoid": lambda x: NM.clip(op.add(op.multiply(x, s(x, 0.2 if a is None else a)), s(x, 0.5 if b is None else b)), s(x, 0.0), s(x, 1.0)),
        "Elu": lambda x: op.where(op.less(x, s(x, 0.0)), op.multiply(s(x, 1.0 if a is None else a), op.subtract(op.exp(x), s(x, 1.0))), x),
        "Softsign": lambda x: op.divide(x, op.add(op.abs(x), s(x, 1.0))),
        "Softplus": lambda x: op.log(op.add(op.exp(x), s(x, 1.0))),
    }
    key = {k.lower(): k for k in table}.get(name.lower())
    if key is None:
        raise ValueError(f"activation {name!r} is not one of {', '.join(table)}")
    return table[key]


def _activations(ctx, defaults: list[str], num_dirs: int, dtype: str) -> list[list]:
    """Per direction, the cell's activation functions (attributes activations/alpha/beta, else defaults)."""
    names = ctx.attr("activations") or defaults * num_dirs
    alphas = ctx.attr("activation_alpha") or []
    betas = ctx.attr("activation_beta") or []
    ctx.check(len(names) == len(defaults) * num_dirs, lambda: f"{len(names)} activations, expected {len(defaults) * num_dirs}")
    try:
        fns = [_act(n, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None, dtype)
               for i, n in enumerate(names)]
    except ValueError as e:
        ctx.unsupported(str(e))
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(num_dirs)]


def _lstm_cell(ctx, gates, h, c, p, acts, hidden, clip, input_forget):
    f, g, hact = acts
    i_, o_, f_, c_ = (op.strided_slice(gates, axes=[1], begin=[k * hidden], end=[(k + 1) * hidden]) for k in range(4))
    if p is not None:
        pi, po, pf = p
        i_ = op.add(i_, op.multiply(pi, c))
        f_ = op.add(f_, op.multiply(pf, c))
    i_, f_, c_ = (clip(t) for t in (i_, f_, c_))
    it = ctx.emit(f(i_))
    ft = op.subtract(scalar(1.0, helpers.dtype_of(h)), it) if input_forget else f(f_)
    c_new = ctx.emit(op.add(op.multiply(ft, c), op.multiply(it, g(c_))))
    if p is not None:
        o_ = op.add(o_, op.multiply(p[1], c_new))
    ot = f(clip(o_))
    return ctx.emit(op.multiply(ot, hact(c_new))), c_new


def _gru_cell(ctx, xg, hr, h, acts, hidden, clip, linear_before_reset, rb_h):
    """xg: X·Wᵀ+Wb (z r h); hr: H·Rᵀ of z and r (and h when linear_before_reset) with Rb added except Rbh."""
    f, g = acts
    sl = lambda t, k: op.strided_slice(t, axes=[1], begin=[k * hidden], end=[(k + 1) * hidden])  # noqa: E731
    zt = ctx.emit(f(clip(op.add(sl(xg, 0), sl(hr, 0)))))
    rt = f(clip(op.add(sl(xg, 1), sl(hr, 1))))
    if linear_before_reset:
        hh = op.add(sl(xg, 2), op.multiply(rt, sl(hr, 2)))
    else:
        hh = op.add(sl(xg, 2), op.add(op.matmul(op.multiply(rt, h), rb_h[0]), rb_h[1]))
    ht = g(clip(hh))
    one = scalar(1.0, helpers.dtype_of(h))
    return ctx.emit(op.add(op.multiply(op.subtract(one, zt), ht), op.multiply(zt, h))), None


def _lower_rnn(ctx, inputs, kind: str):
    x, w, r = inputs[0], inputs[1], inputs[2]
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    b, seq_lens, h0, c0, p = get(3), get(4), get(5), get(6), get(7)
    layout = int(ctx.attr("layout", 0))
    direction = ctx.attr("direction", "forward")
    ctx.check(direction in ("forward", "reverse", "bidirectional"), lambda: f"direction {direction!r}")
    num_dirs = 2 if direction == "bidirectional" else 1
    xshape = helpers.static_shape(x)
    ctx.check(xshape is not None, "X needs a static shape")
    if layout == 1:
        x = ctx.emit(op.permute_dims(x, [1, 0, 2]))
        xshape = (xshape[1], xshape[0], xshape[2])
        h0 = ctx.emit(op.permute_dims(h0, [1, 0, 2])) if h0 is not None else None
        c0 = ctx.emit(op.permute_dims(c0, [1, 0, 2])) if c0 is not None else None
    steps, batch, _ = xshape
    ctx.check(steps <= MAX_STEPS, lambda: f"sequence length {steps} is over the unrolling limit {MAX_STEPS}")
    ngates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    hidden = int(ctx.attr("hidden_size") or helpers.static_shape(r)[-1])
    dtype = helpers.dtype_of(x)
    clip_v = ctx.attr("clip")
    clip = (lambda t: op.clip(t, -float(clip_v), float(clip_v))) if clip_v is not None else (lambda t: t)
    defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[kind]
    acts = _activations(ctx, defaults, num_dirs, dtype)
    lbr = int(ctx.attr("linear_before_reset", 0))

    masks = None
    lens = ctx.const(4)
    if seq_lens is not None and not (lens is not None and np.all(lens == steps)):
        lens_e = ctx.emit(op.reshape(op.astype(seq_lens, "int64"), [batch, 1]))
        masks = [ctx.emit(op.less(relax.const(t, "int64"), lens_e)) for t in range(steps)]

    zeros = helpers.const(np.zeros((batch, hidden)), dtype)
    ys, hs, cs = [], [], []
    for d in range(num_dirs):
        reverse = direction == "reverse" or d == 1
        wd = op.take(w, relax.const(d, "int64"), axis=0)  # [G*H, I]
        rd = ctx.emit(op.permute_dims(op.take(r, relax.const(d, "int64"), axis=0), [1, 0]))  # [H, G*H]
        xw = op.matmul(x, op.permute_dims(wd, [1, 0]))  # [T, B, G*H]
        rb = None
        if b is not None:
            bd = ctx.emit(op.take(b, relax.const(d, "int64"), axis=0))
            wb = op.strided_slice(bd, axes=[0], begin=[0], end=[ngates * hidden])
            rb = ctx.emit(op.strided_slice(bd, axes=[0], begin=[ngates * hidden], end=[2 * ngates * hidden]))
            if kind == "GRU" and lbr:  # all of Rb goes with H·Rᵀ, inside the reset product for h
                xw = op.add(xw, wb)
            elif kind == "GRU":  # Rbz, Rbr here; Rbh is added after the reset product
                rb_zr = op.concat([op.strided_slice(rb, axes=[0], begin=[0], end=[2 * hidden]),
                                   helpers.const(np.zeros(hidden), dtype)], axis=0)
                xw = op.add(op.add(xw, wb), rb_zr)
            else:
                xw = op.add(op.add(xw, wb), rb)
        xw = ctx.emit(xw)
        x_steps = ctx.emit(op.split(xw, steps, axis=0)) if steps > 1 else None
        h = ctx.emit(op.take(h0, relax.const(d, "int64"), axis=0)) if h0 is not None else zeros
        c = ctx.emit(op.take(c0, relax.const(d, "int64"), axis=0)) if c0 is not None else zeros
        peep = None
        if p is not None:
            pd = ctx.emit(op.take(p, relax.const(d, "int64"), axis=0))
            peep = [ctx.emit(op.strided_slice(pd, axes=[0], begin=[k * hidden], end=[(k + 1) * hidden])) for k in range(3)]
        rd_zr = rb_h = None
        if kind == "GRU" and not lbr:
            rd_h = ctx.emit(op.strided_slice(rd, axes=[1], begin=[2 * hidden], end=[3 * hidden]))
            rd_zr = ctx.emit(op.strided_slice(rd, axes=[1], begin=[0], end=[2 * hidden]))
            rbh = (op.strided_slice(rb, axes=[0], begin=[2 * hidden], end=[3 * hidden]) if rb is not None
                   else helpers.const(np.zeros(hidden), dtype))
            rb_h = (rd_h, ctx.emit(rbh))
        y_steps: list = [None] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            xt = op.squeeze(relax.TupleGetItem(x_steps, t), [0]) if x_steps is not None else op.squeeze(xw, [0])
            xt = ctx.emit(xt)
            if kind == "LSTM":
                gates = op.add(xt, op.matmul(h, rd))
                h_new, c_new = _lstm_cell(ctx, gates, h, c, peep, acts[d], hidden, clip, int(ctx.attr("input_forget", 0)))
            elif kind == "GRU":
                hr = op.matmul(h, rd_zr if not lbr else rd)
                if lbr and rb is not None:
                    hr = op.add(hr, rb)
                h_new, c_new = _gru_cell(ctx, xt, ctx.emit(hr), h, acts[d], hidden, clip, lbr, rb_h)
            else:
                h_new = ctx.emit(acts[d][0](clip(op.add(xt, op.matmul(h, rd)))))
                c_new = None
            if masks is not None:
                y_steps[t] = ctx.emit(op.where(masks[t], h_new, zeros))
                h = ctx.emit(op.where(masks[t], h_new, h))
                if c_new is not None:
                    c = ctx.emit(op.where(masks[t], c_new, c))
            else:
                y_steps[t] = h = h_new
                if c_new is not None:
                    c = c_new
        ys.append(ctx.emit(op.stack(y_steps, axis=0)))  # [T, B, H]
        hs.append(h)
        cs.append(c)
    y = op.stack(ys, axis=1)  # [T, D, B, H]
    y_h = op.stack(hs, axis=0)  # [D, B, H]
    y_c = op.stack(cs, axis=0) if kind == "LSTM" else None
    if layout == 1:
        y = op.permute_dims(y, [2, 0, 1, 3])
        y_h = op.permute_dims(y_h, [1, 0, 2])
        y_c = op.permute_dims(y_c, [1, 0, 2]) if y_c is not None else None
    return [y, y_h, y_c][: max(ctx.num_outputs, 1)] if kind == "LSTM" else [y, y_h][: max(ctx.num_outputs, 1)]


def _rule(kind):
    def lower(ctx, inputs):
        return _lower_rnn(ctx, inputs, kind)

    lower.__name__ = f"lower_{kind.lower()}"
    return lower


RULES = (
    OpRule("LSTM", _rule("LSTM"), since=7, kind="decomposed"),
    OpRule("GRU", _rule("GRU"), since=7, kind="decomposed"),
    OpRule("RNN", _rule("RNN"), since=7, kind="decomposed"),
)

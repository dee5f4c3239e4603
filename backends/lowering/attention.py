"""Lowering rules: ONNX Attention (opsets 23-25), as matmuls, an additive bias and a guarded softmax.

The additive bias gathers every masking source: ``attn_mask`` (bool or additive, padded with -inf up
to the key length), ``is_causal`` and the sliding window (``left_window_size``/``right_window_size``),
both bottom-right aligned on the past length or on ``nonpad_kv_seqlen``, and the padding of
``nonpad_kv_seqlen``. Parts known at lowering time are folded into one numpy constant. Rows whose bias
is -inf everywhere produce zeros (not NaN), as the specification requires.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering.helpers import const, scalar
from graphopt.backends.lowering.rules import OpRule

op = relax.op

_ONNX_FLOAT = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


def _to_4d(ctx, x, heads: int | None, what: str):
    """[B, S, H*D] -> [B, H, S, D] (3-D inputs need q_num_heads/kv_num_heads)."""
    shape = helpers.static_shape(x)
    ctx.check(shape is not None, lambda: f"{what} needs a static shape")
    if len(shape) == 4:
        return x
    ctx.check(len(shape) == 3 and heads, lambda: f"{what} of rank {len(shape)} needs rank 4, or rank 3 with num_heads")
    b, s, hidden = shape
    return ctx.emit(op.permute_dims(op.reshape(x, [b, s, heads, hidden // heads]), [0, 2, 1, 3]))


def _allowed_bias(ctx, q_len, kv_len, offset, causal, left, right, dtype):
    """-inf where the causal / window frontier forbids a key, 0 elsewhere.

    ``offset``: an int (same for every batch: [q, kv]) or a Relax [B] int64 tensor ([B, 1, q, kv]).
    """
    neg_inf = float("-inf")
    if isinstance(offset, int):
        diff = np.arange(q_len)[:, None] + offset - np.arange(kv_len)[None, :]
        allowed = np.ones_like(diff, dtype=bool)
        if causal:
            allowed &= diff >= 0
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        return const(np.where(allowed, 0.0, neg_inf), dtype)
    batch = helpers.static_shape(offset)[0]
    i = const(np.arange(q_len, dtype="int64").reshape(1, q_len, 1))
    j = const(np.arange(kv_len, dtype="int64").reshape(1, 1, kv_len))
    diff = ctx.emit(op.subtract(op.add(i, op.reshape(offset, [batch, 1, 1])), j))
    conds = []
    zero = relax.const(0, "int64")
    if causal:
        conds.append(op.greater_equal(diff, zero))
    if left >= 0:
        conds.append(op.less_equal(diff, relax.const(left, "int64")))
    if right >= 0:
        conds.append(op.less_equal(op.negative(diff), relax.const(right, "int64")))
    allowed = conds[0]
    for c in conds[1:]:
        allowed = op.logical_and(allowed, c)
    bias = op.where(allowed, scalar(0.0, dtype), scalar(neg_inf, dtype))
    return ctx.emit(op.reshape(bias, [batch, 1, q_len, kv_len]))


def _mask_bias(ctx, mask, kv_len, dtype):
    """attn_mask as an additive bias: bool True keeps (0) and False masks (-inf); padded to kv_len with -inf."""
    if helpers.dtype_of(mask) == "bool":
        mask = op.where(mask, scalar(0.0, dtype), scalar(float("-inf"), dtype))
    elif helpers.dtype_of(mask) != dtype:
        mask = op.astype(mask, dtype)
    mask = ctx.emit(mask)
    shape = helpers.static_shape(mask)
    pad = kv_len - shape[-1]
    if pad > 0:
        mask = ctx.emit(op.nn.pad(mask, [0, 0] * (len(shape) - 1) + [0, pad], pad_value=float("-inf")))
    return mask


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    va, vb = helpers.const_value(a), helpers.const_value(b)
    if va is not None and vb is not None:
        return const((va + vb).astype(va.dtype), helpers.dtype_of(a))
    return op.add(a, b)


def _matmul(a, b, dtype):
    """a·b accumulated in float32 for 16-bit floats (and rounded once), as numpy does."""
    if dtype in ("float16", "bfloat16"):
        return op.astype(op.matmul(a, b, out_dtype="float32"), dtype)
    return op.matmul(a, b)


def _softmax(x, dtype, n_keys: int):
    """Softmax over the last axis; 16-bit floats compute each step in float32 and round it back, as numpy does."""
    if dtype not in ("float16", "bfloat16"):
        return op.nn.softmax(x, axis=-1)
    shifted = op.subtract(x, op.max(x, axis=[-1], keepdims=True))
    e = op.astype(op.exp(op.astype(shifted, "float32")), dtype)
    if dtype == "bfloat16" and n_keys <= 64:  # numpy adds bfloat16 one term at a time, rounding each sum
        total = None
        for j in range(n_keys):
            term = op.strided_slice(e, axes=[-1], begin=[j], end=[j + 1])
            total = term if total is None else op.astype(op.add(op.astype(total, "float32"), op.astype(term, "float32")), dtype)
    else:
        total = op.astype(op.sum(op.astype(e, "float32"), axis=[-1], keepdims=True), dtype)
    return op.astype(op.divide(op.astype(e, "float32"), op.astype(total, "float32")), dtype)


def _attention(ctx, inputs):
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    q_in, k_in, v_in = inputs[:3]
    mask, past_k, past_v, nonpad = get(3), get(4), get(5), get(6)
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    three_d = helpers.rank_of(q_in) == 3
    dtype = helpers.dtype_of(q_in)
    q = _to_4d(ctx, q_in, q_heads, "Q")
    k = _to_4d(ctx, k_in, kv_heads, "K")
    v = _to_4d(ctx, v_in, kv_heads, "V")
    qs, ks = helpers.static_shape(q), helpers.static_shape(k)
    batch, heads_q, q_len, head = qs
    scale = ctx.attr("scale")
    scale = 1.0 / np.sqrt(head) if scale is None else float(scale)
    root = scalar(float(np.sqrt(scale)), dtype)
    if past_k is not None:
        k = ctx.emit(op.concat([past_k, k], axis=2))
        v = ctx.emit(op.concat([past_v, v], axis=2))
    present_k, present_v = k, v
    kv_len = helpers.static_shape(k)[2]
    heads_kv = ks[1]

    causal = bool(ctx.attr("is_causal", 0))
    left, right = int(ctx.attr("left_window_size", -1)), int(ctx.attr("right_window_size", -1))
    bias = _mask_bias(ctx, mask, kv_len, dtype) if mask is not None else None
    if causal or left >= 0 or right >= 0:
        if past_k is None and nonpad is not None:
            offset = ctx.emit(op.subtract(op.astype(nonpad, "int64"), relax.const(q_len, "int64")))
        else:
            offset = helpers.static_shape(past_k)[2] if past_k is not None else 0
        bias = _add(bias, _allowed_bias(ctx, q_len, kv_len, offset, causal, left, right, dtype))
    if nonpad is not None:
        keep = op.less(const(np.arange(kv_len, dtype="int64")), op.reshape(op.astype(nonpad, "int64"), [batch, 1]))
        pad_bias = op.where(keep, scalar(0.0, dtype), scalar(float("-inf"), dtype))
        bias = _add(bias, ctx.emit(op.reshape(pad_bias, [batch, 1, 1, kv_len])))
    if bias is not None and not isinstance(bias, relax.Var) and helpers.const_value(bias) is None:
        bias = ctx.emit(bias)

    fused = _fused(ctx, q, k, v, bias, scale, dtype, heads_q == heads_kv)
    if fused is not None:
        return _from_4d(ctx, fused) if three_d else fused
    if heads_q != heads_kv:
        ctx.check(heads_q % heads_kv == 0, lambda: f"{heads_q} query heads do not group over {heads_kv} key/value heads")
        k = ctx.emit(op.repeat(k, heads_q // heads_kv, axis=1))
        v = ctx.emit(op.repeat(v, heads_q // heads_kv, axis=1))
    scores = ctx.emit(_matmul(op.multiply(q, root), op.permute_dims(op.multiply(k, root), [0, 1, 3, 2]), dtype))
    softcap = ctx.attr("softcap")
    if softcap is not None and float(softcap) > 0:
        c = scalar(float(softcap), dtype)
        scores = ctx.emit(op.multiply(op.tanh(op.divide(scores, c)), c))
    with_bias = ctx.emit(op.add(scores, bias)) if bias is not None else scores
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    qk_out = with_bias if mode == 2 else scores

    precision = ctx.attr("softmax_precision")
    sm_dtype = _ONNX_FLOAT.get(int(precision), dtype) if precision is not None else dtype
    logits = with_bias if sm_dtype == dtype else ctx.emit(op.astype(with_bias, sm_dtype))
    probs = ctx.emit(_softmax(logits, sm_dtype, kv_len))
    if bias is not None:  # rows with no attendable key give zeros
        bias_value = helpers.const_value(bias)
        if bias_value is not None:
            dead = np.isneginf(np.max(bias_value, axis=-1, keepdims=True))
            if dead.any():
                probs = ctx.emit(op.where(const(dead), scalar(0.0, sm_dtype), probs))
        else:
            # Relax's max starts from the lowest finite value, so an all -inf row reduces to it.
            lowest = float(ml_dtypes.finfo(helpers.numpy_dtype(dtype)).min)
            dead = op.less_equal(op.max(bias, axis=[-1], keepdims=True), scalar(lowest, dtype))
            probs = ctx.emit(op.where(dead, scalar(0.0, sm_dtype), probs))
    if mode == 3:
        qk_out = probs
    if sm_dtype != dtype:
        probs = ctx.emit(op.astype(probs, dtype))
    if helpers.dtype_of(qk_out) != dtype:
        qk_out = op.astype(qk_out, dtype)
    y = _matmul(probs, v, dtype)
    if three_d:
        y = _from_4d(ctx, ctx.emit(y))
    outs = [y, present_k, present_v, qk_out]
    return outs[: ctx.num_outputs] if ctx.num_outputs > 1 else y


def _from_4d(ctx, y):
    """[B, H, S, Dv] -> [B, S, H*Dv]."""
    ys = helpers.static_shape(y)
    return op.reshape(op.permute_dims(y, [0, 2, 1, 3]), [ys[0], ys[2], ys[1] * ys[3]])


def _fused(ctx, q, k, v, bias, scale: float, dtype: str, same_heads: bool):
    """The float32 cases the fused kernel (``flash_attention.py``) computes exactly as specified: only Y
    asked for, as many key/value heads as query heads, no softcap or other softmax precision, and a
    bias known at lowering time with no row masked everywhere (those rows must give zeros, the
    kernel's softmax would give NaN). None otherwise."""
    from graphopt.backends.lowering.flash_attention import lower_fused_attention

    softcap, precision = ctx.attr("softcap"), ctx.attr("softmax_precision")
    if dtype != "float32" or ctx.num_outputs > 1 or not same_heads or (softcap is not None and float(softcap) > 0):
        return None
    if precision is not None and _ONNX_FLOAT.get(int(precision)) != dtype:
        return None
    if bias is not None:
        value = helpers.const_value(bias)
        if value is None or value.dtype != np.float32 or np.isneginf(np.max(value, axis=-1)).any():
            return None
        bias = const(value, dtype)
    return lower_fused_attention(ctx, q, k, v, bias, scale)


def _rotary_embedding(ctx, inputs):
    x, cos, sin = inputs[:3]
    pos = inputs[3] if len(inputs) > 3 else None
    shape = helpers.static_shape(x)
    ctx.check(shape is not None and len(shape) in (3, 4), "the input needs a static rank-3 or rank-4 shape")
    if len(shape) == 4:  # [B, H, S, D] -> [B, S, H, D]
        x = ctx.emit(op.permute_dims(x, [0, 2, 1, 3]))
    else:
        heads = int(ctx.attr("num_heads", 0))
        ctx.check(heads > 0 and shape[2] % heads == 0, "a rank-3 input needs num_heads dividing its hidden size")
        x = ctx.emit(op.reshape(x, [shape[0], shape[1], heads, shape[2] // heads]))
    head = helpers.static_shape(x)[3]
    rot = int(ctx.attr("rotary_embedding_dim", 0)) or head
    half = rot // 2
    if pos is not None:
        cos, sin = op.take(cos, pos, axis=0), op.take(sin, pos, axis=0)
    cos, sin = ctx.emit(op.expand_dims(cos, [2])), ctx.emit(op.expand_dims(sin, [2]))  # [B, S, 1, rot/2]
    interleaved = bool(ctx.attr("interleaved", 0))
    if interleaved:
        x1 = op.strided_slice(x, axes=[3], begin=[0], end=[rot], strides=[2])
        x2 = op.strided_slice(x, axes=[3], begin=[1], end=[rot], strides=[2])
    else:
        x1 = op.strided_slice(x, axes=[3], begin=[0], end=[half])
        x2 = op.strided_slice(x, axes=[3], begin=[half], end=[rot])
    x1, x2 = ctx.emit(x1), ctx.emit(x2)
    real = op.subtract(op.multiply(cos, x1), op.multiply(sin, x2))
    imag = op.add(op.multiply(sin, x1), op.multiply(cos, x2))
    xs = helpers.static_shape(x)
    if interleaved:
        rotated = op.reshape(op.stack([real, imag], axis=4), [xs[0], xs[1], xs[2], rot])
    else:
        rotated = op.concat([real, imag], axis=3)
    if rot < head:
        rotated = op.concat([rotated, op.strided_slice(x, axes=[3], begin=[rot], end=[head])], axis=3)
    out = ctx.emit(rotated)
    if len(shape) == 4:
        return op.permute_dims(out, [0, 2, 1, 3])
    return op.reshape(out, list(shape))


MAX_STEPS = 1024  # LinearAttention unrolls its recurrence over the sequence


def _heads(ctx, x, heads: int):
    """(B, T, H*D) -> (B, H, T, D), in float32."""
    b, t, hd = helpers.static_shape(x)
    y = op.permute_dims(op.reshape(x, [b, t, heads, hd // heads]), [0, 2, 1, 3])
    return ctx.emit(y if helpers.dtype_of(x) == "float32" else op.astype(y, "float32"))


def _step(ctx, x4, i: int):
    """Time step i of a (B, H, T, D) tensor: (B, H, D)."""
    return ctx.emit(op.squeeze(op.strided_slice(x4, axes=[2], begin=[i], end=[i + 1]), [2]))


def _linear_attention(ctx, inputs):
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    q, k, v = inputs[:3]
    past, decay, beta = get(3), get(4), get(5)
    rule = ctx.attr("update_rule", "gated_delta")
    ctx.check(rule in ("linear", "gated", "delta", "gated_delta"), lambda: f"update_rule {rule!r}")
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    ctx.check(not gating or decay is not None, "a gated update_rule needs decay")
    ctx.check(not delta or beta is not None, "a delta update_rule needs beta")
    hq, hkv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
    ctx.check(hq > 0 and hkv > 0 and hq % hkv == 0, "q_num_heads must be a positive multiple of kv_num_heads")
    b, t, _ = helpers.static_shape(q)
    ctx.check(t <= MAX_STEPS, lambda: f"sequence length {t} is over the unrolling limit {MAX_STEPS}")
    dtype = helpers.dtype_of(q)
    q4, k4, v4 = _heads(ctx, q, hq), _heads(ctx, k, hkv), _heads(ctx, v, hkv)
    dk, dv = helpers.static_shape(q4)[3], helpers.static_shape(v4)[3]
    if gating:
        g4 = _heads(ctx, decay, hkv)  # per key dim (B, H, T, d_k) or per head (B, H, T, 1)
    if delta:
        last = helpers.static_shape(beta)[-1]
        beta4 = _heads(ctx, beta, last)  # (B, H_kv or 1, T, 1)
    scale = ctx.attr("scale")
    scale = 1.0 / np.sqrt(dk) if not scale else float(scale)
    state_dtype = helpers.dtype_of(past) if past is not None else dtype
    if past is not None:
        state = ctx.emit(past if state_dtype == "float32" else op.astype(past, "float32"))
    else:
        state = const(np.zeros((b, hkv, dk, dv)), "float32")
    group = hq // hkv
    outs = []
    for i in range(t):
        k_t, v_t = _step(ctx, k4, i), _step(ctx, v4, i)
        if gating:
            state = op.multiply(state, op.expand_dims(op.exp(_step(ctx, g4, i)), [3]))
        if delta:
            retrieved = op.squeeze(op.matmul(op.expand_dims(k_t, [2]), state), [2])  # (B, H, d_v)
            v_t = op.multiply(_step(ctx, beta4, i), op.subtract(v_t, retrieved))
        state = ctx.emit(op.add(state, op.multiply(op.expand_dims(k_t, [3]), op.expand_dims(v_t, [2]))))
        read = ctx.emit(op.repeat(state, group, axis=1)) if group > 1 else state
        o = op.matmul(op.expand_dims(_step(ctx, q4, i), [2]), read)  # (B, H_q, 1, d_v)
        outs.append(ctx.emit(op.multiply(o, scalar(scale, "float32"))))
    y = op.permute_dims(op.concat(outs, axis=2), [0, 2, 1, 3])  # (B, T, H_q, d_v)
    y = op.reshape(y, [b, t, hq * dv])
    y = y if dtype == "float32" else op.astype(y, dtype)
    present = state if state_dtype == "float32" else op.astype(state, state_dtype)
    return [y, present]


RULES = (
    OpRule("Attention", _attention, since=23, kind="decomposed"),
    OpRule("LinearAttention", _linear_attention, kind="decomposed"),
    OpRule("RotaryEmbedding", _rotary_embedding, since=23, kind="decomposed"),
)

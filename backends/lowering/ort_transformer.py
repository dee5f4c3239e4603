"""Lowering rules: the ``com.microsoft`` transformer ops that ONNX Runtime's transformer optimizer and
exporters write (contracts: ONNX Runtime's ContribOperators.md; tests compare each with ONNX Runtime).

* ``SkipLayerNormalization(input, skip, gamma[, beta][, bias])`` -> (output, mean, inv_std_var,
  input_skip_bias_sum); ``SkipSimplifiedLayerNormalization`` the same with RMS normalization;
  ``SimplifiedLayerNormalization(X, scale)`` (ONNX Runtime registers it in the ONNX domain) RMSNorm.
* ``EmbedLayerNormalization(input_ids, segment_ids, word, position, segment embeddings, gamma, beta[,
  mask][, position_ids])`` -> (output, mask_index: the ones in each mask row, embedding_sum).
* ``Gelu`` (erf), ``BiasGelu(A, B)`` = Gelu(A + B), ``FastGelu(X[, bias])`` (tanh form),
  ``QuickGelu(X; alpha)`` = X * sigmoid(alpha X).
* ``Attention(input, weights[, bias][, mask_index][, past][, attention_bias])``: packed QKV projection,
  ``num_heads``, ``qkv_hidden_sizes``, ``unidirectional``, ``scale``, ``mask_filter_value``;
  masks: a key padding mask [B, T] or [B, S, T] (0 masks), or right-padding lengths [B].
* ``MultiHeadAttention(query, key, value[, bias][, key_padding_mask][, attention_bias])``: 3-D Q/K/V
  (or K/V already split into heads, [B, N, L, H]).
* ``GroupQueryAttention(query[, key, value][, past_key, past_value], seqlens_k, total_sequence_length[,
  cos_cache, sin_cache])``: grouped key/value heads, a cache grown by concatenation (static past length
  P, seqlens_k = P + S - 1: no padding inside the cache), causal, rotary when ``do_rotary``.
* ``RotaryEmbedding(input, position_ids, cos_cache, sin_cache)``: position_ids [B, S], or [1] as the
  offset of the first position.
* ``MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias])``: 4- or 8-bit block-quantized weights,
  dequantized once at compile time (the bundle holds float32 weights: graphopt's own
  ``--quantize int4-weights`` keeps them packed).

Masked positions get ``mask_filter_value`` (-10000 by default) added before softmax, as ONNX Runtime
does, not -inf. Attention and MultiHeadAttention refuse a past key/value cache with a clear error.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from graphopt.backends.lowering import attention, elementwise, helpers, nn
from graphopt.backends.lowering.graphopt_ops import scaled_dot_product
from graphopt.backends.lowering.rules import OpRule

op = relax.op
DOMAIN = "com.microsoft"


def _opt(inputs, i):
    return inputs[i] if len(inputs) > i else None


def _split(ctx, x, indices, axis: int):
    parts = ctx.emit(op.split(x, indices, axis=axis))
    return [ctx.emit(relax.TupleGetItem(parts, i)) for i in range(len(indices) + 1)]


def _s(x, value: float):
    return helpers.scalar(value, helpers.dtype_of(x))


# ---- normalizations ----

def _rms(ctx, x, scale, epsilon: float):
    """RMS normalization over the last axis: (y, inv_std_var)."""
    ms = op.mean(op.multiply(x, x), axis=[-1], keepdims=True)
    inv = ctx.emit(op.rsqrt(op.add(ms, _s(x, epsilon))))
    return op.multiply(op.multiply(x, inv), scale), inv


def _skip_norm(simplified: bool):
    def lower(ctx, inputs):
        x, skip, gamma = inputs[:3]
        beta = None if simplified else _opt(inputs, 3)
        bias = _opt(inputs, 3 if simplified else 4)
        total = op.add(x, skip)
        if bias is not None:
            total = op.add(total, bias)
        total = ctx.emit(total)
        eps = float(ctx.attr("epsilon", 1e-12))
        if simplified:
            y, inv = _rms(ctx, total, gamma, eps)
            outs = [y, None, inv, total]
        else:
            need = ctx.output_used(1) or ctx.output_used(2)
            y, mean, inv = nn.layer_norm(ctx, total, gamma, beta, -1, eps, False, need_stats=need)
            outs = [y, mean, inv, total]
        for j in range(1, ctx.num_outputs):
            ctx.check(not ctx.output_used(j) or outs[j] is not None, f"output {j} is not computed by this op")
        return outs[: ctx.num_outputs] if ctx.num_outputs > 1 else outs[0]

    return lower


def _embed_layer_norm(ctx, inputs):
    ids, segments, word, position, segment_table, gamma, beta = (_opt(inputs, i) for i in range(7))
    mask, position_ids = _opt(inputs, 7), _opt(inputs, 8)
    seq = helpers.shape_of(ids)[1]
    if position_ids is None:
        position_ids = op.expand_dims(op.arange(0, seq, 1, dtype="int64"), [0])
    total = op.add(op.take(word, op.astype(ids, "int64"), axis=0),
                   op.take(position, op.astype(position_ids, "int64"), axis=0))
    if segments is not None and segment_table is not None:
        total = op.add(total, op.take(segment_table, op.astype(segments, "int64"), axis=0))
    total = ctx.emit(total)
    y, _, _ = nn.layer_norm(ctx, total, gamma, beta, -1, float(ctx.attr("epsilon", 1e-12)), False, need_stats=False)
    if mask is None:
        count = helpers.const(np.zeros(helpers.shape_of(ids)[0], np.int32), "int32")
    else:  # ONNX Runtime counts the ones (a right-padded mask's length)
        count = op.sum(op.astype(op.equal(mask, helpers.scalar(1, helpers.dtype_of(mask))), "int32"), axis=[1])
    return [y, count, total][: ctx.num_outputs] if ctx.num_outputs > 1 else y


def _simplified_norm(ctx, inputs):
    x, scale = inputs[:2]
    ctx.check(int(ctx.attr("axis", -1)) in (-1, helpers.rank_of(x) - 1), "only axis -1 is supported")
    y, inv = _rms(ctx, x, scale, float(ctx.attr("epsilon", 1e-5)))
    return [y, inv][: ctx.num_outputs] if ctx.num_outputs > 1 else y


# ---- activations ----

def _gelu(ctx, x, tanh: bool):
    x = ctx.emit(x)
    if tanh:
        inner = op.multiply(_s(x, math.sqrt(2.0 / math.pi)), op.add(x, op.multiply(_s(x, 0.044715),
                                                                                  op.multiply(x, op.multiply(x, x)))))
        return op.multiply(op.multiply(_s(x, 0.5), x), op.add(_s(x, 1.0), op.tanh(inner)))
    return op.multiply(op.multiply(_s(x, 0.5), x), op.add(_s(x, 1.0), op.erf(op.multiply(x, _s(x, 1 / math.sqrt(2))))))


def _biased(inputs):
    b = _opt(inputs, 1)
    return inputs[0] if b is None else op.add(inputs[0], b)


# ---- attention ----

def _heads(ctx, x, heads: int):
    """[B, S, N*H] -> [B, N, S, H]."""
    b, s, d = helpers.shape_of(x)
    ctx.check(d is not None and d % heads == 0, f"hidden size {d} is not a multiple of num_heads {heads}")
    return ctx.emit(op.permute_dims(op.reshape(x, [b, s, heads, d // heads]), [0, 2, 1, 3]))


def _merge(ctx, y):
    """[B, N, S, H] -> [B, S, N*H]."""
    b, n, s, h = helpers.shape_of(y)
    return op.reshape(op.permute_dims(y, [0, 2, 1, 3]), [b, s, n * h])


def _mask_bias(ctx, mask, q_len, kv_len, dtype: str, filter_value: float, causal: bool, bias):
    """The additive [B|1, N|1, S, T] term of masks, causality and attention_bias (None when none)."""
    terms = []
    if mask is not None:
        rank = helpers.rank_of(mask)
        if rank == 1:  # right padding: keys at or after each batch's length are masked
            keys = op.arange(0, kv_len, 1, dtype="int32")
            keep = op.less(op.expand_dims(keys, [0]), op.expand_dims(op.astype(mask, "int32"), [1]))
        else:
            ctx.check(rank in (2, 3), f"a rank-{rank} mask is not supported (1-D lengths, [B, T] or [B, S, T])")
            keep = op.greater(mask, helpers.scalar(0, helpers.dtype_of(mask)))
        keep = op.expand_dims(keep, [1, 2] if rank in (1, 2) else [1])  # -> [B, 1, 1|S, T]
        terms.append(op.where(keep, helpers.scalar(0.0, dtype), helpers.scalar(filter_value, dtype)))
    if bias is not None:
        terms.append(bias)
    out = None
    for term in terms:
        out = term if out is None else op.add(out, term)
    if causal:  # ONNX Runtime sets future keys to the lowest float (masks only add mask_filter_value)
        rows = np.arange(q_len)[:, None] + (kv_len - q_len)
        allowed = (np.arange(kv_len)[None, :] <= rows).reshape(1, 1, q_len, kv_len)
        lowest = float(np.finfo(helpers.numpy_dtype(dtype)).min)
        out = op.where(helpers.const(allowed, "bool"), helpers.scalar(0.0, dtype) if out is None else out,
                       helpers.scalar(lowest, dtype))
    if out is None:
        return None
    return ctx.emit(out)


def _attend(ctx, q, k, v, heads: int, mask, attn_bias, dtype: str):
    """Multi-head attention of [B, S, D] query with [B, N, T, H] keys/values: [B, S, N*Hv]."""
    qh = _heads(ctx, q, heads)
    head = helpers.shape_of(qh)[3]
    scale = float(ctx.attr("scale", 0.0)) or 1.0 / math.sqrt(head)
    q_len, kv_len = helpers.shape_of(qh)[2], helpers.shape_of(k)[2]
    ctx.check(isinstance(q_len, int) and isinstance(kv_len, int) or (mask is None and not ctx.attr("unidirectional", 0)),
              "masks and unidirectional attention need static sequence lengths")
    add = _mask_bias(ctx, mask, q_len, kv_len, dtype, float(ctx.attr("mask_filter_value", -10000.0)),
                     bool(ctx.attr("unidirectional", 0)), attn_bias)
    return _merge(ctx, ctx.emit(scaled_dot_product(ctx, qh, k, v, scale, add)))


def _no_cache(ctx, inputs, indices, what: str):
    for i in indices:
        ctx.check(_opt(inputs, i) is None, f"{what} (a key/value cache) is not supported: compile the model without it")


def _attention(ctx, inputs):
    x, w = inputs[:2]
    bias, mask = _opt(inputs, 2), _opt(inputs, 3)
    _no_cache(ctx, inputs, (4, 6), "past")
    ctx.check(not ctx.attr("do_rotary", 0), "do_rotary is not supported")
    ctx.check(ctx.num_outputs == 1 or not ctx.output_used(1), "the present output is not supported")
    heads = int(ctx.attr("num_heads"))
    wshape = helpers.static_shape(w)
    ctx.check(wshape is not None, "the packed QKV weights need a static shape")
    sizes = list(ctx.attr("qkv_hidden_sizes", None) or [wshape[1] // 3] * 3)
    proj = op.matmul(x, w)
    if bias is not None:
        proj = op.add(proj, bias)
    proj = ctx.emit(proj)
    q, k, v = _split(ctx, proj, [sizes[0], sizes[0] + sizes[1]], axis=-1)
    return _attend(ctx, q, _heads(ctx, k, heads), _heads(ctx, v, heads), heads, mask, _opt(inputs, 5), ctx.dtype(0))


def _multi_head_attention(ctx, inputs):
    q, k, v = inputs[:3]
    bias, mask, attn_bias = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    _no_cache(ctx, inputs, (6, 7), "past_key/past_value")
    ctx.check(k is not None and v is not None, "packed query/key/value in one input is not supported")
    ctx.check(ctx.num_outputs == 1 or not any(ctx.output_used(j) for j in range(1, ctx.num_outputs)),
              "the present_key/present_value outputs are not supported")
    heads = int(ctx.attr("num_heads"))
    split_kv = helpers.rank_of(k) == 4  # already [B, N, L, H]
    if bias is not None:
        dq = helpers.shape_of(q)[2]
        dk = dq if split_kv else helpers.shape_of(k)[2]
        parts = _split(ctx, bias, [dq, dq + dk], axis=0)
        q = op.add(q, parts[0])
        if not split_kv:
            k, v = op.add(k, parts[1]), op.add(v, parts[2])
    if not split_kv:
        k, v = _heads(ctx, ctx.emit(k), heads), _heads(ctx, ctx.emit(v), heads)
    return _attend(ctx, ctx.emit(q), k, v, heads, mask, attn_bias, ctx.dtype(0))


def _rotary(ctx, inputs):
    x, pos, cos, sin = inputs[:4]
    ctx.check(not ctx.attr("is_packed_batching", 0), "is_packed_batching is not supported")
    ctx.check(float(ctx.attr("scale", 1.0)) == 1.0, "a scale other than 1 is not supported")
    if helpers.rank_of(pos) == 1:  # [1]: the offset of the first position
        seq = helpers.shape_of(x)[1 if helpers.rank_of(x) == 3 else 2]
        pos = op.add(op.expand_dims(op.arange(0, seq, 1, dtype="int64"), [0]), op.astype(pos, "int64"))
    return attention._rotary_embedding(ctx, [x, cos, sin, ctx.emit(pos)])


def _rotate(ctx, x, cos, sin, pos, interleaved: bool):
    """Rotary embedding of ``x`` [B, N, S, H] at positions ``pos`` [B, S] (caches [max, rot/2])."""
    b, n, s, h = helpers.shape_of(x)
    half = helpers.shape_of(cos)[1]
    rot = 2 * half
    c = ctx.emit(op.expand_dims(op.take(cos, pos, axis=0), [1]))  # [B, 1, S, rot/2]
    sn = ctx.emit(op.expand_dims(op.take(sin, pos, axis=0), [1]))
    if interleaved:
        x1 = ctx.emit(op.strided_slice(x, axes=[3], begin=[0], end=[rot], strides=[2]))
        x2 = ctx.emit(op.strided_slice(x, axes=[3], begin=[1], end=[rot], strides=[2]))
    else:
        x1 = ctx.emit(op.strided_slice(x, axes=[3], begin=[0], end=[half]))
        x2 = ctx.emit(op.strided_slice(x, axes=[3], begin=[half], end=[rot]))
    real = op.subtract(op.multiply(c, x1), op.multiply(sn, x2))
    imag = op.add(op.multiply(sn, x1), op.multiply(c, x2))
    out = op.reshape(op.stack([real, imag], axis=4), [b, n, s, rot]) if interleaved else op.concat([real, imag], axis=3)
    if rot < h:
        out = op.concat([out, op.strided_slice(x, axes=[3], begin=[rot], end=[h])], axis=3)
    return ctx.emit(out)


def _group_query_attention(ctx, inputs):
    """GroupQueryAttention with a cache that grows by concatenation (past [B, kvN, P, H] + S new keys):
    ``seqlens_k`` must be P + S - 1 for every batch (no padding inside the cache); the query at
    position P + i sees keys 0..P + i (exact causal softmax, as ONNX Runtime computes it)."""
    q, k, v, past_k, past_v, seqlens = (_opt(inputs, i) for i in range(6))
    for attr, default, what in (("local_window_size", -1, "local_window_size"), ("softcap", 0.0, "softcap"),
                                ("smooth_softmax", 0, "smooth_softmax")):
        ctx.check(ctx.attr(attr, default) == default, f"{what} is not supported")
    ctx.check(all(_opt(inputs, i) is None for i in (9, 10, 11)), "position_ids, attention_bias and head_sink are not supported")
    heads, kv_heads = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
    b, s, d = helpers.shape_of(q)
    if k is None:  # packed [B, S, D + 2 kv_hidden]
        kv_hidden = (d // (heads + 2 * kv_heads)) * kv_heads
        q, k, v = _split(ctx, q, [d - 2 * kv_hidden, d - kv_hidden], axis=2)
    qh, kh, vh = _heads(ctx, q, heads), _heads(ctx, ctx.emit(k), kv_heads), _heads(ctx, ctx.emit(v), kv_heads)
    past = 0 if past_k is None else helpers.shape_of(past_k)[2]
    ctx.check(isinstance(past, int) and isinstance(s, int), "the cache and sequence lengths must be static")
    if ctx.attr("do_rotary", 0):
        ctx.check(_opt(inputs, 7) is not None and _opt(inputs, 8) is not None, "do_rotary needs cos_cache and sin_cache")
        start = op.subtract(op.add(op.astype(seqlens, "int64"), helpers.scalar(1, "int64")), helpers.scalar(s, "int64"))
        pos = ctx.emit(op.add(op.expand_dims(start, [1]), op.expand_dims(op.arange(0, s, 1, dtype="int64"), [0])))
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        qh = _rotate(ctx, qh, inputs[7], inputs[8], pos, interleaved)
        kh = _rotate(ctx, kh, inputs[7], inputs[8], pos, interleaved)
    if past:
        kh = ctx.emit(op.concat([past_k, kh], axis=2))
        vh = ctx.emit(op.concat([past_v, vh], axis=2))
    present_k, present_v = kh, vh
    if heads != kv_heads:
        kh = ctx.emit(op.repeat(kh, heads // kv_heads, axis=1))
        vh = ctx.emit(op.repeat(vh, heads // kv_heads, axis=1))
    total = past + s
    allowed = np.arange(total)[None, :] <= (np.arange(s)[:, None] + past)
    head = helpers.shape_of(qh)[3]
    scale = float(ctx.attr("scale", 0.0)) or 1.0 / math.sqrt(head)
    y = ctx.emit(scaled_dot_product(ctx, qh, kh, vh, scale, helpers.const(allowed.reshape(1, 1, s, total), "bool")))
    outs = [_merge(ctx, y), present_k, present_v]
    ctx.check(ctx.num_outputs <= 3 or not ctx.output_used(3), "the output_qk output is not supported")
    return outs[: ctx.num_outputs] if ctx.num_outputs > 1 else outs[0]


# ---- block-quantized weights ----

def _unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-endian packed ``bits``-bit unsigned values of ``data`` (uint8, last axis), first ``count``."""
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    vals = (data[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*data.shape[:-1], -1)[..., :count]


def _matmul_nbits(ctx, inputs):
    a = inputs[0]
    k, n = int(ctx.attr("K")), int(ctx.attr("N"))
    bits, block = int(ctx.attr("bits", 4)), int(ctx.attr("block_size"))
    ctx.check(bits in (2, 4, 8), f"bits={bits} is not supported (2, 4 or 8)")
    ctx.check(ctx.num_inputs < 5 or inputs[4] is None, "g_idx is not supported")
    packed = ctx.require_const(1, "the packed weights")
    scales = ctx.require_const(2, "the scales").astype(np.float32)
    blocks = (k + block - 1) // block
    q = _unpack(packed.reshape(n, blocks, -1), bits, block).astype(np.float32)  # [N, blocks, block]
    zp = ctx.const(3) if ctx.num_inputs > 3 and inputs[3] is not None else None
    if zp is None:
        if ctx.num_inputs > 3 and inputs[3] is not None:
            ctx.unsupported("zero_points must be a constant")
        zero = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    elif zp.dtype == np.uint8:
        zero = _unpack(zp.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = zp.astype(np.float32).reshape(n, blocks)
    w = ((q - zero[..., None]) * scales.reshape(n, blocks)[..., None]).reshape(n, -1)[:, :k]  # [N, K]
    y = op.matmul(a, helpers.const(np.ascontiguousarray(w.T), ctx.dtype(0)))
    bias = _opt(inputs, 5)
    return y if bias is None else op.add(y, bias)


RULES = (
    OpRule("SkipLayerNormalization", _skip_norm(False), domain=DOMAIN, kind="decomposed"),
    OpRule("SkipSimplifiedLayerNormalization", _skip_norm(True), domain=DOMAIN, kind="decomposed"),
    OpRule("SimplifiedLayerNormalization", _simplified_norm, kind="decomposed"),
    OpRule("EmbedLayerNormalization", _embed_layer_norm, domain=DOMAIN, kind="decomposed"),
    OpRule("Gelu", lambda ctx, ins: _gelu(ctx, ins[0], False), domain=DOMAIN, kind="decomposed"),
    OpRule("BiasGelu", lambda ctx, ins: _gelu(ctx, _biased(ins), False), domain=DOMAIN, kind="decomposed"),
    OpRule("FastGelu", lambda ctx, ins: _gelu(ctx, _biased(ins), True), domain=DOMAIN, kind="decomposed"),
    OpRule("QuickGelu", lambda ctx, ins: elementwise._swish(ins[0], float(ctx.attr("alpha", 1.702))),
           domain=DOMAIN, kind="decomposed"),
    OpRule("Attention", _attention, domain=DOMAIN, kind="decomposed"),
    OpRule("MultiHeadAttention", _multi_head_attention, domain=DOMAIN, kind="decomposed"),
    OpRule("RotaryEmbedding", _rotary, domain=DOMAIN, kind="decomposed"),
    OpRule("GroupQueryAttention", _group_query_attention, domain=DOMAIN, kind="decomposed"),
    OpRule("MatMulNBits", _matmul_nbits, domain=DOMAIN, kind="decomposed"),
)

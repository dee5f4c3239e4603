"""The com.microsoft transformer ops ONNX Runtime's optimizer writes, lowered and compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.lowering.testing import run_lowered

MS = "com.microsoft"
RNG = np.random.default_rng(11)
B, S, H, HEADS = 2, 5, 16, 4


def _f(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits=()):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT if a.dtype == np.float32 else
                                        helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs.items()]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    graph = helper.make_graph(nodes, "m", vi, vo, [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _check(model, feeds, rtol=1e-4, atol=1e-5):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(names, feeds)))
    got = run_lowered(model, feeds)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
    return got


def test_skip_layer_normalizations_all_outputs_and_simplified_layer_normalization():
    x, skip = _f(B, S, H), _f(B, S, H)
    inits = [("gamma", _f(H)), ("beta", _f(H)), ("bias", _f(H)), ("scale", _f(H))]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                              ["y", "mean", "inv", "sum"], domain=MS, epsilon=1e-5),
             helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"],
                              ["ys", "", "invs", "sums"], domain=MS, epsilon=1e-5),
             helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["yr"], axis=-1, epsilon=1e-6)]
    outputs = ["y", "mean", "inv", "sum", "ys", "invs", "sums", "yr"]
    _check(_model(nodes, {"x": x, "skip": skip}, outputs, inits), {"x": x, "skip": skip})


def test_embed_layer_normalization():
    ids = RNG.integers(0, 30, (B, S)).astype(np.int32)
    feeds = {"ids": ids, "seg": RNG.integers(0, 2, (B, S)).astype(np.int32),
             "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}
    inits = [("word", _f(30, H)), ("pos", _f(8, H)), ("segt", _f(2, H)), ("gamma", _f(H)), ("beta", _f(H))]
    node = helper.make_node("EmbedLayerNormalization", ["ids", "seg", "word", "pos", "segt", "gamma", "beta", "mask"],
                            ["y", "mask_index", "sum"], domain=MS, epsilon=1e-5)
    model = _model([node], feeds, ["y", "mask_index", "sum"], inits)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.INT32
    got = _check(model, feeds)
    assert got["mask_index"].tolist() == [3, 5]


def test_gelu_family():
    x = _f(B, S, H, scale=3.0)  # the tails matter: erf and tanh saturate differently
    nodes = [helper.make_node("Gelu", ["x"], ["gelu"], domain=MS),
             helper.make_node("BiasGelu", ["x", "bias"], ["bias_gelu"], domain=MS),
             helper.make_node("FastGelu", ["x", "bias"], ["fast_gelu_bias"], domain=MS),
             helper.make_node("FastGelu", ["x"], ["fast_gelu"], domain=MS),
             helper.make_node("QuickGelu", ["x"], ["quick_gelu"], domain=MS, alpha=1.5)]
    outputs = ["gelu", "bias_gelu", "fast_gelu_bias", "fast_gelu", "quick_gelu"]
    _check(_model(nodes, {"x": x}, outputs, [("bias", _f(H))]), {"x": x})


@pytest.mark.parametrize(("mask", "unidirectional"), [(None, 1), ("raw", 0), ("lengths", 1), ("raw3d", 1)])
def test_attention_packed_qkv(mask, unidirectional):
    x = _f(B, S, H)
    feeds, ins = {"x": x}, ["x", "w", "b"]
    if mask == "raw":
        feeds["mask"] = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    elif mask == "lengths":
        feeds["mask"] = np.array([3, 5], np.int32)
    elif mask == "raw3d":
        feeds["mask"] = (RNG.random((B, S, S)) > 0.3).astype(np.int32)
    if mask:
        ins.append("mask")
    node = helper.make_node("Attention", ins, ["y"], domain=MS, num_heads=HEADS, unidirectional=unidirectional)
    _check(_model([node], feeds, ["y"], [("w", _f(H, 3 * H, scale=0.3)), ("b", _f(3 * H))]), feeds)


def test_attention_attention_bias_and_qkv_sizes():
    x = _f(B, S, H)
    feeds = {"x": x, "ab": _f(1, HEADS, S, S)}
    node = helper.make_node("Attention", ["x", "w", "b", "", "", "ab"], ["y"], domain=MS, num_heads=HEADS,
                            qkv_hidden_sizes=[H, H, 2 * H], scale=0.2)
    _check(_model([node], feeds, ["y"], [("w", _f(H, 4 * H, scale=0.3)), ("b", _f(4 * H))]), feeds)


@pytest.mark.parametrize("split_kv", [False, True])
def test_multi_head_attention_cross(split_kv):
    q, kv_len = _f(B, S, H), 7
    if split_kv:
        k, v = _f(B, HEADS, kv_len, H // HEADS), _f(B, HEADS, kv_len, H // HEADS)
    else:
        k, v = _f(B, kv_len, H), _f(B, kv_len, H)
    feeds = {"q": q, "k": k, "v": v, "kpm": np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)}
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "kpm"], ["y"], domain=MS, num_heads=HEADS)
    _check(_model([node], feeds, ["y"], [("bias", _f(3 * H))]), feeds)


@pytest.mark.parametrize(("interleaved", "offset"), [(0, True), (1, False)])
def test_rotary_embedding(interleaved, offset):
    head = H // HEADS
    x = _f(B, S, H)
    feeds = {"x": x, "pos": np.array([3], np.int64) if offset else RNG.integers(0, 16, (B, S)).astype(np.int64)}
    angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(head // 2) / (head // 2)))[None]
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS,
                            interleaved=interleaved, num_heads=HEADS)
    inits = [("cos", np.cos(angles).astype(np.float32)), ("sin", np.sin(angles).astype(np.float32))]
    _check(_model([node], feeds, ["y"], inits), feeds)


def _nbits_node(name, bits, zero_points, k, n, block, inits):
    blocks = (k + block - 1) // block
    per = 8 // bits
    q = RNG.integers(0, 1 << bits, (n, blocks * block)).astype(np.uint8)
    packed = np.zeros((n, blocks * block // per), np.uint8)
    for i in range(per):
        packed |= (q[:, i::per] << (i * bits)).astype(np.uint8)
    inits += [(f"{name}_B", packed.reshape(n, blocks, -1)),
              (f"{name}_scales", (RNG.random(n * blocks) * 0.1 + 0.01).astype(np.float32))]
    ins = ["a", f"{name}_B", f"{name}_scales"]
    if zero_points == "packed":
        zpb = (blocks * bits + 7) // 8
        zpp = np.zeros((n, zpb * per), np.uint8)
        zpp[:, :blocks] = RNG.integers(0, 1 << bits, (n, blocks))
        packed_zp = np.zeros((n, zpb), np.uint8)
        for i in range(per):
            packed_zp |= (zpp[:, i::per] << (i * bits)).astype(np.uint8)
        inits.append((f"{name}_zp", packed_zp.reshape(-1)))
        ins.append(f"{name}_zp")
    elif zero_points == "float":
        inits.append((f"{name}_zp", (RNG.random(n * blocks) * 8).astype(np.float32)))
        ins.append(f"{name}_zp")
    return helper.make_node("MatMulNBits", ins, [name], domain=MS, K=k, N=n, bits=bits, block_size=block)


def test_matmul_nbits():
    k, n, block = 40, 12, 16  # K not a multiple of the block: the last block is padded
    inits = []
    cases = {"b4": (4, None), "b4_zp": (4, "packed"), "b8_zp": (8, "packed"), "b4_float_zp": (4, "float")}
    nodes = [_nbits_node(name, bits, zp, k, n, block, inits) for name, (bits, zp) in cases.items()]
    a = _f(3, k)
    _check(_model(nodes, {"a": a}, list(cases), inits), {"a": a}, rtol=1e-4, atol=1e-4)


def test_a_key_value_cache_is_refused():
    from graphopt.backends.lowering.convert import lower
    from graphopt.core.errors import GraphoptError
    import onnx_ir as ir

    x = _f(B, S, H)
    node = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y"], domain=MS, num_heads=HEADS)
    model = _model([node], {"x": x, "past": _f(2, B, HEADS, 3, H // HEADS)}, ["y"],
                   [("w", _f(H, 3 * H)), ("b", _f(3 * H))])
    with pytest.raises(GraphoptError, match="past .*not supported"):
        lower(ir.serde.deserialize_model(model))


@pytest.mark.parametrize(("past", "rotary", "packed"), [(0, 1, False), (3, 0, False), (3, 1, True)])
def test_group_query_attention(past, rotary, packed):
    heads, kv_heads, head = 4, 2, 16  # ORT wants a head size that is a multiple of 16 with rotary
    s = 1 if past else 4
    feeds = {"q": _f(1, s, heads * head), "k": _f(1, s, kv_heads * head), "v": _f(1, s, kv_heads * head),
             "pk": _f(1, kv_heads, past, head), "pv": _f(1, kv_heads, past, head),
             "seqlens": np.array([past + s - 1], np.int32), "total": np.array(past + s, np.int32)}
    if packed:
        feeds["q"] = np.concatenate([feeds.pop("q"), feeds.pop("k"), feeds.pop("v")], axis=2)
    angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(head // 2) / (head // 2)))[None]
    inits = [("cos", np.cos(angles).astype(np.float32)), ("sin", np.sin(angles).astype(np.float32))]
    ins = ["q", "" if packed else "k", "" if packed else "v", "pk", "pv", "seqlens", "total"]
    ins += ["cos", "sin"] if rotary else []
    node = helper.make_node("GroupQueryAttention", ins, ["y", "present_k", "present_v"], domain=MS, num_heads=heads,
                            kv_num_heads=kv_heads, do_rotary=rotary)
    _check(_model([node], feeds, ["y", "present_k", "present_v"], inits), feeds)

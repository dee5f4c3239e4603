"""Fused attention (``backends/lowering/flash_attention.py``): softmax(Q·Kᵀ·scale + mask)·V as one
kernel, compared with ONNX Runtime running the unfused graph, static and symbolic sequence lengths."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def attention_model(q_shape, kv_len, dv=None, mask_shape=None, scale=0.125, kt_input=False) -> onnx.ModelProto:
    """Q [.., sq, d], K [.., skv, d], V [.., skv, dv] as inputs; MatMul(Q, Kᵀ)·scale (+ mask) -> Softmax
    -> MatMul V, the pattern ``fuse_attention`` recognises. Dims may be names (symbolic)."""
    *lead, sq, d = q_shape
    dv = dv or d
    k_shape, v_shape = [*lead, kv_len, d], [*lead, kv_len, dv]
    rank = len(q_shape)
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    inputs = [helper.make_tensor_value_info("q", F, q_shape), helper.make_tensor_value_info("k", F, k_shape),
              helper.make_tensor_value_info("v", F, v_shape)]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=swap),
             helper.make_node("MatMul", ["q", "kt"], ["s0"]),
             helper.make_node("Mul", ["s0", "scale"], ["s1"])]
    scores = "s1"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", F, mask_shape))
        nodes.append(helper.make_node("Add", ["s1", "mask"], ["s2"]))
        scores = "s2"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", F, [*lead, sq, dv])],
                              initializer=[numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _feeds(shapes: dict, rng, mask_shape=None):
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    if mask_shape is not None:  # padding as BERT writes it: 0 to keep, float32's lowest to drop
        keep = rng.random(mask_shape) < 0.8
        keep[..., 0] = True
        feeds["mask"] = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return feeds


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _compile(model, shapes=None, bounds=None):
    import graphopt

    return graphopt.compile(ir.serde.deserialize_model(model), target="x86", input_shapes=shapes, dim_bounds=bounds)


def _assert_fused(model, bounds=None):
    """Lowered (default -O2), the attention is one call of the fused kernel and no softmax is left."""
    from graphopt.backends.compile import _front_end, _Stages

    lowered, _ = _front_end(ir.serde.deserialize_model(model), _Stages(), 2, "graphopt", bounds)
    names = [gv.name_hint for gv, _ in lowered.mod.functions_items()]
    assert any(n.startswith("flash_attention") for n in names), names
    assert "softmax" not in lowered.mod["main"].script(show_meta=False)


CASES = [
    # (q shape, kv length, dv, mask shape): full key blocks, a tail block, fewer rows than a row tile,
    # a mask over every dim, a causal [sq, skv] mask, rank 3, a value dim that is not a vector multiple
    ((1, 4, 128, 32), 128, None, (1, 1, 1, 128)),
    ((2, 3, 37, 16), 100, 24, (2, 1, 37, 100)),
    ((1, 2, 3, 64), 5, None, None),
    ((1, 8, 4, 52), 207, None, (1, 1, 4, 207)),
    ((6, 19, 32), 19, None, (19, 19)),
]


@pytest.mark.parametrize("q_shape, kv_len, dv, mask_shape", CASES)
def test_fused_attention_matches_ort(q_shape, kv_len, dv, mask_shape):
    model = attention_model(list(q_shape), kv_len, dv, list(mask_shape) if mask_shape else None)
    rng = np.random.default_rng(0)
    *lead, sq, d = q_shape
    feeds = _feeds({"q": q_shape, "k": (*lead, kv_len, d), "v": (*lead, kv_len, dv or d)}, rng, mask_shape)
    if mask_shape is not None and len(mask_shape) == 2:  # causal
        feeds["mask"] = np.triu(np.full(mask_shape, -np.inf, np.float32), 1)
    _assert_fused(model)
    got = np.asarray(_compile(model)(**feeds)["y"])
    np.testing.assert_allclose(got, _ort(model, feeds), rtol=1e-3, atol=1e-4)


def test_symbolic_length_one_bundle():
    """One library for every length up to the bound: lengths 1, 16, 64 (one full key block), 65 and 100."""
    model = attention_model([1, 12, "seq", 32], "seq", None, [1, 1, 1, "seq"])
    _assert_fused(model, {"seq": 128})
    compiled = _compile(model, ["q:1,12,seq,32", "k:1,12,seq,32", "v:1,12,seq,32", "mask:1,1,1,seq"], {"seq": 128})
    rng = np.random.default_rng(1)
    for n in (1, 16, 64, 65, 100):
        feeds = _feeds({"q": (1, 12, n, 32), "k": (1, 12, n, 32), "v": (1, 12, n, 32)}, rng, (1, 1, 1, n))
        got = np.asarray(compiled(**feeds)["y"])
        np.testing.assert_allclose(got, _ort(model, feeds), rtol=1e-3, atol=1e-4, err_msg=f"seq {n}")


def test_large_scores_stay_finite():
    """Scores of +-80 (exp overflows float32 above 88): the online softmax's running max keeps every
    exp <= 1, as ORT's softmax does."""
    model = attention_model([1, 2, 8, 16], 70, None, None, scale=1.0)
    rng = np.random.default_rng(2)
    feeds = {"q": (rng.standard_normal((1, 2, 8, 16)) * 3).astype(np.float32),
             "k": (rng.standard_normal((1, 2, 70, 16)) * 3).astype(np.float32),
             "v": rng.standard_normal((1, 2, 70, 16)).astype(np.float32)}
    got = np.asarray(_compile(model)(**feeds)["y"])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _ort(model, feeds), rtol=1e-3, atol=1e-4)


def test_gpu_targets_keep_the_decomposed_attention():
    """The fused kernel is CPU code: for a CUDA target attention lowers to matmuls and a softmax, which
    TVM's GPU rules bind to threads (built to PTX without a GPU)."""
    import graphopt
    from graphopt.backends.schedules.gpu_rules import last_gpu_report

    model = attention_model([1, 2, 16, 32], 16, None, [1, 1, 1, 16])
    graphopt.compile(ir.serde.deserialize_model(model), target="cuda-sm80")
    names = list(last_gpu_report())
    assert any("softmax" in n for n in names) and not any("flash" in n for n in names), names


@pytest.mark.parametrize("causal", [0, 1])
def test_onnx_attention_op_uses_the_kernel(causal):
    """The standard Attention (opset 23, [B, H, S, D], is_causal folded into a constant bias) lowers to
    the fused kernel and matches ORT."""
    shape = [1, 4, 20, 16]
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=causal)
    graph = helper.make_graph([node], "a", [helper.make_tensor_value_info(n, F, shape) for n in "qkv"],
                              [helper.make_tensor_value_info("y", F, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    _assert_fused(model)
    feeds = _feeds({n: shape for n in "qkv"}, np.random.default_rng(3))
    np.testing.assert_allclose(np.asarray(_compile(model)(**feeds)["y"]), _ort(model, feeds), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("q_shape, kv_len", [
    ((1, 8, 4, 52), 207),  # Moonshine's cross-attention: 4 queries (a 4-row tile), keys padded 207 -> 208
    ((1, 4, 1, 20), 33),  # one query; keys padded to 48
])
def test_head_dims_off_the_vector_take_no_padded_copy(q_shape, kv_len):
    """Head dims 52 and 20 (not a multiple of 16) go to the kernel unpadded: the one copy left is K
    transposed (its keys padded to whole vectors, the head dim as it is); V is read with its own keys and
    the output comes back without a slice. Matches ORT."""
    from graphopt.backends.compile import fused_module

    model = attention_model(list(q_shape), kv_len)
    mod = fused_module(ir.serde.deserialize_model(model), "x86")
    others = [gv.name_hint for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and not gv.name_hint.startswith("flash_attention")]
    *lead, _, d = q_shape
    assert len(others) == 1 and "transpose" in others[0], others
    assert [int(x) for x in mod[others[0]].params[-1].ty.shape] == [*lead, d, kv_len + -kv_len % 16]
    rng = np.random.default_rng(6)
    feeds = _feeds({"q": q_shape, "k": (*lead, kv_len, d), "v": (*lead, kv_len, d)}, rng)
    np.testing.assert_allclose(np.asarray(_compile(model)(**feeds)["y"]), _ort(model, feeds), rtol=1e-3, atol=1e-4)

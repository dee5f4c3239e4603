"""QuantizeWeightsPass: weight-only block-wise int4/int8 MatMul/Gemm weights, checked in ONNX Runtime.

The transformer is generated: a BERT-style encoder (MatMul attention and a GELU feed-forward with
biases, residuals and LayerNorm), weights drawn from a Student-t distribution (heavier tails than a
normal, as trained weights have) at BERT's 0.02 scale.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import UnsupportedError, UsageError
from graphopt.passes.quantize_weights import QuantizeWeightsPass, quantize_blocks, quantize_weights
from graphopt.core.verify import verify

D, HEADS, FFN, SEQ, LAYERS = 256, 4, 1024, 32, 2


def _weight(rng, shape):
    return (0.02 * rng.standard_t(5, size=shape)).astype(np.float32)


def bert_like(opset: int = 17, seed: int = 0) -> ir.Model:
    """x [1, SEQ, D] -> LAYERS encoder layers -> y [1, SEQ, D]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    init("heads_shape", np.array([1, SEQ, HEADS, D // HEADS], np.int64))
    init("flat_shape", np.array([1, SEQ, D], np.int64))
    init("scale", np.array(1 / np.sqrt(D // HEADS), np.float32))
    init("half", np.array(0.5, np.float32))
    init("one", np.array(1.0, np.float32))
    init("rsqrt2", np.array(1 / np.sqrt(2), np.float32))
    x = "x"
    for i in range(LAYERS):
        def linear(inp, name, k, n):
            mm = node("MatMul", [inp, init(f"l{i}.{name}.w", _weight(rng, (k, n)))], f"l{i}.{name}.mm")
            return node("Add", [mm, init(f"l{i}.{name}.b", _weight(rng, n))], f"l{i}.{name}")

        def heads(t, perm):
            r = node("Reshape", [t, "heads_shape"], f"{t}.r")
            return node("Transpose", [r], f"{t}.t", perm=perm)

        q = heads(linear(x, "q", D, D), [0, 2, 1, 3])
        kt = heads(linear(x, "k", D, D), [0, 2, 3, 1])
        v = heads(linear(x, "v", D, D), [0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, kt], f"l{i}.qk"), "scale"], f"l{i}.scaled")
        a = node("MatMul", [node("Softmax", [s], f"l{i}.p", axis=-1), v], f"l{i}.att")
        a = node("Reshape", [node("Transpose", [a], f"l{i}.att.t", perm=[0, 2, 1, 3]), "flat_shape"], f"l{i}.att.r")
        h = node("Add", [x, linear(a, "o", D, D)], f"l{i}.res1")
        h = node("LayerNormalization", [h, init(f"l{i}.ln1.g", np.ones(D, np.float32)),
                                        init(f"l{i}.ln1.b", np.zeros(D, np.float32))], f"l{i}.ln1", axis=-1)
        f = linear(h, "ff1", D, FFN)
        erf = node("Erf", [node("Mul", [f, "rsqrt2"], f"l{i}.ff.s")], f"l{i}.ff.erf")
        g = node("Mul", [node("Mul", [f, "half"], f"l{i}.ff.h"), node("Add", [erf, "one"], f"l{i}.ff.e1")], f"l{i}.gelu")
        h2 = node("Add", [h, linear(g, "ff2", FFN, D)], f"l{i}.res2")
        x = node("LayerNormalization", [h2, init(f"l{i}.ln2.g", np.ones(D, np.float32)),
                                         init(f"l{i}.ln2.b", np.zeros(D, np.float32))], f"l{i}.out", axis=-1)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    g = helper.make_graph(nodes, "bert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, D])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def run(model: ir.Model, feeds, *, optimize: bool = True) -> np.ndarray:
    """ORT's output; ``optimize=False`` keeps DequantizeLinear + MatMul apart (ORT would fuse them into
    MatMulNBits computing with int8-quantized activations, accuracy level 4)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _feeds(seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, SEQ, D)).astype(np.float32)}


def _matmul_weight_bytes(model):
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.name.endswith(".w"))


@pytest.fixture(scope="module")
def reference():
    model = bert_like()
    return _matmul_weight_bytes(model), run(model, _feeds())


def _quantized_weight_bytes(model):
    """Bytes of the MatMul weights' codes, scales and zero points as stored (int4: two per byte)."""
    proto = ir.to_proto(model)
    return sum(len(t.raw_data) for t in proto.graph.initializer if ".w__" in t.name)


@pytest.mark.parametrize("bits, symmetric, min_ratio, min_cos", [
    (4, True, 6.0, 0.99), (4, False, 5.5, 0.99), (8, True, 3.5, 0.9999), (8, False, 3.4, 0.9999)])
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_bert_like_weights_shrink_and_outputs_hold(reference, target, bits, symmetric, min_ratio, min_cos):
    float_bytes, before = reference
    model = bert_like()
    p = QuantizeWeightsPass(bits, 32, target, symmetric)
    result = p(model)
    verify(result.model)
    assert len(p.quantized) == 6 * LAYERS and p.float_bytes == float_bytes
    stored = _quantized_weight_bytes(result.model)
    assert stored == p.quantized_bytes
    assert float_bytes / stored >= min_ratio
    counts = collections.Counter(n.op_type for n in result.model.graph)
    if target == "onnx":
        assert result.model.opset_imports[""] == 21  # upgraded for block-wise DequantizeLinear
        assert counts["DequantizeLinear"] == 6 * LAYERS and counts["MatMul"] == 8 * LAYERS
        after = run(result.model, _feeds(), optimize=False)
    else:
        assert result.model.opset_imports[""] == 17 and counts["MatMulNBits"] == 6 * LAYERS
        assert "DequantizeLinear" not in counts
        after = run(result.model, _feeds())
    assert _cosine(after, before) >= min_cos


def test_dequantize_linear_and_matmulnbits_compute_the_same_product():
    """Both forms decode the same codes: ORT's outputs agree to float rounding, on a Gemm (transB)
    whose K is not a multiple of the block (the last block padded)."""
    rng = np.random.default_rng(3)
    w = _weight(rng, (48, 80))  # [N, K] with transB=1, K = 80 = 2.5 blocks of 32
    c = _weight(rng, 48)
    g = helper.make_graph([helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 80])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 48])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"a": rng.standard_normal((3, 80)).astype(np.float32)}
    q, scale, zp = quantize_blocks(w, 4, 32, symmetric=False)
    decoded = (q - np.repeat(zp, 32, axis=1)[:, :80]) * np.repeat(scale, 32, axis=1)[:, :80]
    expected = feeds["a"] @ decoded.T + c
    for target in ("onnx", "ort"):
        model = ir.serde.deserialize_model(proto)
        QuantizeWeightsPass(4, 32, target, symmetric=False, min_elements=1)(model)
        ops = {n.op_type for n in model.graph}
        assert ("MatMulNBits" in ops) == (target == "ort")
        np.testing.assert_allclose(run(model, feeds, optimize=False), expected, rtol=1e-5, atol=1e-5)


def test_quantize_blocks_codes_and_ranges():
    w = np.array([[0.0, 0.7, -0.36, 0.1] * 8 + [2.0] * 32], np.float32)
    q, scale, zp = quantize_blocks(w, 4, 32, symmetric=True)
    assert zp is None and scale.shape == (1, 2) and np.allclose(scale, [0.1, 2 / 7])
    assert q[0, :4].tolist() == [0, 7, -4, 1] and set(q[0, 32:].tolist()) == {7}
    q, scale, zp = quantize_blocks(w, 8, 32, symmetric=False)
    assert q.min() >= 0 and q.max() <= 255 and zp[0, 1] == 0  # an all-positive block still covers 0
    np.testing.assert_allclose((q[0, :32] - zp[0, 0]) * scale[0, 0], w[0, :32], atol=scale[0, 0] / 2 + 1e-7)


def test_int4_codes_are_stored_packed_and_typed():
    model = quantize_weights(bert_like(), bits=4)
    proto = ir.to_proto(model)
    codes = [t for t in proto.graph.initializer if t.name.endswith("__q4")]
    assert len(codes) == 6 * LAYERS and all(t.data_type == TensorProto.INT4 for t in codes)
    assert all(len(t.raw_data) * 2 == np.prod(t.dims) for t in codes)
    stored = model.graph.initializers["l0.q.w__q4"].const_value.numpy()
    assert stored.dtype == ml_dtypes.int4


def test_bad_options_and_nothing_to_quantize():
    for kwargs, match in (({"bits": 3}, "bits"), ({"bits": 4, "block_size": 24}, "block_size"),
                          ({"bits": 4, "target_runtime": "tflite"}, "tflite")):
        with pytest.raises(UsageError, match=match):
            quantize_weights(bert_like(), **kwargs)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    with pytest.raises(UnsupportedError, match="no MatMul/Gemm"):
        quantize_weights(ir.serde.deserialize_model(helper.make_model(g)), bits=4)


def test_refuses_when_the_opset_cannot_be_upgraded_exactly():
    """Softmax on a non-last axis changed meaning at opset 13: DequantizeLinear's opset 21 is refused,
    MatMulNBits (a contrib op, no upgrade) is not."""
    w = _weight(np.random.default_rng(0), (64, 64))
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["s"], axis=1), helper.make_node("MatMul", ["s", "w"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 64])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    with pytest.raises(UnsupportedError, match="opset 21.*Softmax"):
        quantize_weights(ir.serde.deserialize_model(proto), bits=4)
    model = quantize_weights(ir.serde.deserialize_model(proto), bits=4, target_runtime="ort")
    assert model.opset_imports[""] == 12
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)}
    assert _cosine(run(model, feeds), run(ir.serde.deserialize_model(proto), feeds)) > 0.99

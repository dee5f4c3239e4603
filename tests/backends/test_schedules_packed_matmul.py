"""Matmuls with a constant weight read it packed: which matmuls the rewrite takes, and numerics
against ONNX Runtime through the whole compile pipeline (the rewrite, the matmul rule, the unpacking)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import api
from graphopt.backends import schedules
from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import packed_matmul
from graphopt.backends.schedules.testing import ort_run


def head_model(a_shape, n, rng, op="MatMul", bias=True):
    """x @ W (+ b): W a [K, N] initializer; Gemm takes it transposed ([N, K], transB=1)."""
    k = a_shape[-1]
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(w.T.copy() if op == "Gemm" else w, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ins + (["b"] if bias else []), ["y"], transB=1)]
    else:
        nodes = [helper.make_node("MatMul", ins, ["m" if bias else "y"])]
        if bias:
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(a_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*a_shape[:-1], n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def compile_onnx(model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compiled = compile_model(api.load(path), target="x86")
    return compiled, schedules.last_report()


@pytest.mark.parametrize("a_shape,n,op,bias", [
    ((1, 40, 120), 6625, "MatMul", True),  # PP-OCRv4 rec's classifier: 6625 has no power-of-two divisor
    ((1, 40, 120), 360, "MatMul", False),  # 360 = 22.5 vectors of 16
    ((1, 2048), 1000, "Gemm", True),  # ResNet-50's classifier: one row, transposed weight
    ((3, 7, 33), 64, "MatMul", True),  # a batch of 3, K not a lane multiple, N a lane multiple
])
def test_packed_matmul_matches_ort(tmp_path, a_shape, n, op, bias):
    rng = np.random.default_rng(0)
    model = head_model(a_shape, n, rng, op, bias)
    compiled, report = compile_onnx(model, tmp_path)
    assert any("packed_matmul" in f for f in report), report
    assert report[next(f for f in report if "packed_matmul" in f)] == "matmul"
    x = rng.standard_normal(a_shape).astype(np.float32)
    got = compiled(x=x)["y"]
    want = ort_run(model, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_packed_matmul_off_keeps_plain_matmul(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_PACKED_MATMUL", "0")
    rng = np.random.default_rng(1)
    model = head_model((1, 40, 120), 360, rng)
    compiled, report = compile_onnx(model, tmp_path)
    assert not any("packed_matmul" in f for f in report), report
    x = rng.standard_normal((1, 40, 120)).astype(np.float32)
    np.testing.assert_allclose(compiled(x=x)["y"], ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_pack_weight_layout():
    w = np.arange(3 * 20, dtype=np.float32).reshape(3, 20)
    p = packed_matmul.pack_weight(w, 16)
    assert p.shape == (2, 3, 16)
    np.testing.assert_array_equal(p[0], w[:, :16])
    np.testing.assert_array_equal(p[1, :, :4], w[:, 16:])
    assert not p[1, :, 4:].any()  # the padding columns are zero


def _matmul_call(x_shape, w_shape, w_const=True, dtype="float32"):
    from tvm import relax

    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    w = relax.const(np.zeros(w_shape, dtype)) if w_const else relax.Var("w", relax.TensorType(w_shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x] + ([] if w_const else [w])):
        call = bb.normalize(relax.op.matmul(x, w))
        bb.emit_func_output(call)
    return call, w


@pytest.mark.parametrize("x_shape,w_shape,w_const,dtype,why", [
    ((4, 32), (32, 64), False, "float32", "not a constant"),
    ((4, 32), (32, 8), True, "float32", "too narrow"),
    ((4, 32), (32, 20), True, "float32", "too many zeros"),  # 20 columns pad to 32
    ((4, 32), (32, 64), True, "float16", "float32"),
])
def test_why_not_says_why(x_shape, w_shape, w_const, dtype, why):
    call, w = _matmul_call(x_shape, w_shape, w_const, dtype)
    reason = packed_matmul.why_not(call, w, 16)
    assert reason is not None and why in reason, reason


def test_why_not_accepts_a_wide_constant():
    call, w = _matmul_call((4, 32), (32, 6625))
    assert packed_matmul.why_not(call, w, 16) is None
    assert isinstance(w, tvm.ir.expr.Constant)


@pytest.mark.parametrize("n,lanes,width", [
    (3072, 16, 48),  # BERT's FFN: whole 3-vector panels
    (384, 16, 48),
    (64, 16, 32),  # 48 would pad 64 to 96: two vectors fit exactly
    (16, 16, 16),
    (1000, 16, 48),  # 1008 columns: 0.8% padding for the wider tile
    (384, 8, 24),  # AVX2: 3 vectors of 8
])
def test_panel_lanes_prefers_wide_panels_without_much_padding(n, lanes, width):
    assert packed_matmul.panel_lanes(n, lanes) == width


def test_three_vector_panel_is_one_register_tile(tmp_path):
    """A 48-column panel: 8 rows x 3 vectors of accumulators, the 3 vectors unrolled inside the rows."""
    from graphopt.backends.compile import fused_module
    from graphopt.backends.schedules import apply_default_schedules
    from graphopt.backends.targets import get_target

    rng = np.random.default_rng(3)
    model = head_model((1, 64, 96), 192, rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    spec = get_target({"preset": "x86", "mcpu": "skylake-avx512"})
    mod = apply_default_schedules(fused_module(api.load(path), spec), spec)
    func = next(f for gv, f in mod.functions.items() if "packed_matmul" in gv.name_hint)
    text = func.script()
    assert "T.Buffer((T.int64(4), T.int64(96), T.int64(48))" in text  # 192 columns as 4 panels of 48
    assert "T.unroll(T.int64(8))" in text and "T.unroll(T.int64(3))" in text and "T.vectorized(T.int64(16))" in text


@pytest.mark.parametrize("m,k,n", [(96, 512, 96), (40, 768, 48)])
def test_rows_larger_than_l2_take_k_blocks(m, k, n):
    """Rows x K over L2: the K loop in blocks outside the row tiles (k_block), numerics unchanged."""
    from tvm import te

    from graphopt.backends.schedules.features import CPUFeatures
    from graphopt.backends.schedules.matmul import schedule_matmul
    from graphopt.backends.schedules.features import RuleContext

    width = packed_matmul.panel_lanes(n, 16)
    x = te.placeholder((1, m, k), name="x")
    wp = te.placeholder((-(-n // width), k, width), name="wp")
    func = te.create_prim_func([x, wp, packed_matmul.packed_matmul_te(x, wp, n)])
    feats = CPUFeatures(vector_bits=512, cores=2, l2=64 * 1024)  # rows of m x k floats: over 64 KB
    sch = schedule_matmul(func, RuleContext(feats=feats))
    text = sch.mod["main"].script()
    assert "rk_0" in text and "rk_1" in text, text  # K split into blocks
    rng = np.random.default_rng(5)
    xa = rng.standard_normal((1, m, k)).astype(np.float32)
    wa = rng.standard_normal((k, n)).astype(np.float32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, m, n), np.float32))
    lib(tvm.runtime.tensor(xa), tvm.runtime.tensor(packed_matmul.pack_weight(wa, width)), out)
    np.testing.assert_allclose(out.numpy(), xa @ wa, rtol=1e-4, atol=1e-3)


def test_one_row_with_a_large_weight_stays_parallel_and_unblocked():
    """A GEMV's register axis is the panels, and its weight (larger than L2) moves with it: that is no
    reason to block K, and blocking K left the GEMV serial (gen:gpt2's decode step 21 -> 33 ms)."""
    from tvm import te

    from graphopt.backends.schedules.features import CPUFeatures, RuleContext
    from graphopt.backends.schedules.matmul import schedule_matmul

    k, n = 768, 3072
    width = packed_matmul.panel_lanes(n, 16)
    x = te.placeholder((1, 1, k), name="x")
    wp = te.placeholder((n // width, k, width), name="wp")
    func = te.create_prim_func([x, wp, packed_matmul.packed_matmul_te(x, wp, n)])
    sch = schedule_matmul(func, RuleContext(feats=CPUFeatures(vector_bits=512, cores=2, l2=1 << 20)))
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "rk_0" not in text, text


def test_rows_and_a_panel_over_l2_take_k_blocks():
    """BERT-base's second FFN matmul: 128 rows of K 3072 (1.5 MB) fit a 2 MB L2 but not with a 48-column
    panel (0.6 MB) beside them: K in blocks of 1536; with K 768 (0.4 + 0.15 MB) it stays whole."""
    from tvm import te

    from graphopt.backends.schedules.features import CPUFeatures, RuleContext
    from graphopt.backends.schedules.matmul import schedule_matmul

    feats = CPUFeatures(vector_bits=512, cores=2, l2=2 * 1024 * 1024)
    texts = {}
    for k in (3072, 768):
        x = te.placeholder((1, 128, k), name="x")
        wp = te.placeholder((16, k, 48), name="wp")
        func = te.create_prim_func([x, wp, packed_matmul.packed_matmul_te(x, wp, 768)])
        texts[k] = schedule_matmul(func, RuleContext(feats=feats)).mod["main"].script()
    assert "for rk_0, i1_0, rk_1 in T.grid(2, 16, 1536)" in texts[3072], texts[3072]
    assert "rk_0" not in texts[768]

"""The few-row (GEMV) paths of packed matmuls over a symbolic row count (backends/schedules/gemv.py):
which functions get them, and numerics at one row (the 1-row nest), 2 to 4 rows (the 4-row nest), 5
to 8 (two 4-row tiles) and more (the tiled nest) against numpy and, through the whole compile pipeline, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import te, tirx

from graphopt.backends.schedules import features_of, gemv, packed_matmul
from graphopt.backends.schedules.features import as_target
from graphopt.backends.schedules.symbolic import schedule_function
from graphopt.backends.targets import get_target
from graphopt.front import api

SPEC = get_target("x86")
FEATS = features_of(SPEC)
ROWS = (1, 2, 4, 5, 8, 9, 17)  # the 1-row nest, the 4-row nest (2, 4), two 4-row tiles (5, 8), the tiled nest


def _function(k: int, n: int, epilogue: str = "bias"):
    """x [1, seq, k] times a packed [k, n] weight, plus a bias (and a relu); seq symbolic."""
    lanes = packed_matmul.panel_lanes(n, FEATS.lanes(32))
    m = tirx.Var("seq", "int64")
    x = te.placeholder((1, m, k), "float32", "x")
    wp = te.placeholder((-(-n // lanes), k, lanes), "float32", "wp")
    b = te.placeholder((n,), "float32", "b")
    y = packed_matmul.packed_matmul_te(x, wp, n)
    if epilogue == "relu":
        z = te.compute((1, m, n), lambda a, i, j: te.max(y[a, i, j] + b[j], tirx.const(0.0, "float32")), name="z")
    else:
        z = te.compute((1, m, n), lambda a, i, j: y[a, i, j] + b[j], name="z")
    return te.create_prim_func([x, wp, b, z]), lanes


def _conditions(stmt) -> list[str]:
    """The conditions of the if/elif chain at the root of a versioned body (inside the parallel
    version, when the body first picks parallel or serial loops by the work at run time)."""
    from graphopt.backends.schedules.symbolic import PARALLEL_MIN

    out = []
    if isinstance(stmt, tirx.IfThenElse) and str(stmt.condition).endswith(f">= T.int64({PARALLEL_MIN})"):
        stmt = stmt.then_case
    while isinstance(stmt, tirx.IfThenElse):
        out.append(str(stmt.condition))
        stmt = stmt.else_case
    return out


@pytest.mark.parametrize("k,n,epilogue", [
    (48, 200, "bias"),  # N not a multiple of 48 (padded panel), K one 48-lane block
    (720, 1000, "relu"),  # K an odd multiple of 48 (15 x 48) and of 16, N with a partial last panel
    (100, 77, "bias"),  # K no lane multiple, N prime
])
def test_few_row_paths_match_numpy(k, n, epilogue):
    func, lanes = _function(k, n, epilogue)
    assert str(gemv.row_count(func)) == "seq"
    scheduled, _ = schedule_function(func, FEATS, {"seq": 64})
    assert _conditions(scheduled.body.block.body) == ["seq == T.int64(1)", "seq <= T.int64(4)", "seq <= T.int64(8)"]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=as_target(SPEC))
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    wp, bt = tvm.runtime.tensor(packed_matmul.pack_weight(w, lanes)), tvm.runtime.tensor(b)
    for rows in ROWS:
        x = rng.standard_normal((1, rows, k)).astype(np.float32)
        want = x.astype(np.float64) @ w + b
        if epilogue == "relu":
            want = np.maximum(want, 0)
        out = tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32))
        lib["main"](tvm.runtime.tensor(x), wp, bt, out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4, err_msg=f"rows={rows}")


def test_functions_without_symbolic_rows_are_left_alone():
    lanes = packed_matmul.panel_lanes(200, FEATS.lanes(32))
    x = te.placeholder((1, 1, 64), "float32", "x")
    wp = te.placeholder((-(-200 // lanes), 64, lanes), "float32", "wp")
    static = te.create_prim_func([x, wp, packed_matmul.packed_matmul_te(x, wp, 200)])
    assert gemv.row_count(static) is None  # one static row: the static rules' one-row tile serves it
    a = te.placeholder((tirx.Var("seq", "int64"), 16), "float32", "a")
    plain = te.create_prim_func([a, te.compute(a.shape, lambda i, j: a[i, j] * 2, name="double")])
    assert gemv.row_count(plain) is None
    scheduled, _ = schedule_function(plain, FEATS, {"seq": 64})
    assert not _conditions(scheduled.body.block.body)


def _decoder_layer(k: int, n: int, rng) -> onnx.ModelProto:
    """x [1, seq, k]: MatMul + bias, tanh-GELU as GPT-2 writes it, MatMul back + residual (epilogues
    that fold into the write-back), weights as initializers."""
    w1 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((n, k)) / np.sqrt(n)).astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in (
        (w1, "w1"), (rng.standard_normal(n).astype(np.float32) * 0.1, "b1"), (w2, "w2"),
        (np.array(0.044715, np.float32), "c"), (np.array(np.sqrt(2 / np.pi), np.float32), "s"),
        (np.array(0.5, np.float32), "half"), (np.array(1.0, np.float32), "one"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["h2"]), helper.make_node("Mul", ["h2", "h"], ["h3"]),
        helper.make_node("Mul", ["h3", "c"], ["ch3"]), helper.make_node("Add", ["h", "ch3"], ["u"]),
        helper.make_node("Mul", ["u", "s"], ["su"]), helper.make_node("Tanh", ["su"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["h", "t1"], ["ht"]),
        helper.make_node("Mul", ["ht", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["m2"]), helper.make_node("Add", ["m2", "x"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", k])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_symbolic_bundle_matches_ort_at_one_row_and_more(tmp_path, monkeypatch):
    """Through compile (packed weights, fusion, the symbolic schedules): seq 1, 3, 6 and 16 take the
    1-row, 4-row, two-4-row-tile and tiled nests; each gives ORT's output."""
    rng = np.random.default_rng(3)
    model = _decoder_layer(144, 400, rng)  # K 3 x 48; N 400: a partial last 48-column panel
    path = tmp_path / "ffn.onnx"
    onnx.save(model, path)
    versioned, original = [], gemv.with_few_row_paths

    def spy(func, scheduled, *args):
        out = original(func, scheduled, *args)
        versioned.append(out is not scheduled)
        return out

    monkeypatch.setattr(gemv, "with_few_row_paths", spy)
    compiled = api.compile(str(path), dim_bounds={"seq": 16})
    assert sum(versioned) == 4, versioned  # both matmuls, with their epilogues, in the parallel and serial versions
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 3, 6, 16):
        x = rng.standard_normal((1, rows, 144)).astype(np.float32)
        np.testing.assert_allclose(compiled(x=x)["y"], sess.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4,
                                   err_msg=f"seq={rows}")


@pytest.mark.parametrize("rows", [2, 4])
def test_static_few_rows_take_the_prefetched_panel_tiles(rows):
    """A packed matmul over 2 to 4 static rows (a decoder's first step over its prompt) takes the 4-row
    nest, several panels a tile, with the weight prefetched ``PREFETCH_ROWS`` k steps ahead (one
    ``llvm.prefetch`` per vector of each panel), and matches ONNX Runtime."""
    k, n = 416, 1248
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnx_ir as ir

    from graphopt.backends.compile import fused_module
    from graphopt.backends.stages import apply_schedules

    mod = apply_schedules(fused_module(ir.serde.deserialize_model(model), SPEC), SPEC, True)
    text = mod["packed_matmul"].script()
    nvec = packed_matmul.panel_lanes(n, FEATS.lanes(32)) // FEATS.lanes(32)
    assert text.count("llvm.prefetch") >= 2 * nvec, text  # at least 2 panels x their vectors
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    got = api.compile(ir.serde.deserialize_model(model), target="x86").runner()(x=x)["y"]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

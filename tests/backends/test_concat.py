"""Two-input Concat over a symbolic axis (a KV cache) as contiguous row copies
(backends/schedules/concat.py), against numpy and ONNX Runtime: serial and parallel, whole vectors
or not; static concats keep TVM's fusable op."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.backends.schedules.concat import concat_func
from graphopt.front import api

F = TensorProto.FLOAT


def _concat_model(a_shape, b_shape, axis: int, out_shape):
    node = helper.make_node("Concat", ["a", "b"], ["y"], axis=axis)
    graph = helper.make_graph([node], "concat", [helper.make_tensor_value_info("a", F, a_shape),
                                                  helper.make_tensor_value_info("b", F, b_shape)],
                              [helper.make_tensor_value_info("y", F, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = [  # (a, b, axis, bound): a cache and one new row; NCHW channels (inner 7x7, not whole vectors);
    # the last axis (inner 1); a large copy over one outer index (parallel rows) and over many (parallel outer)
    ((1, 12, "n", 64), (1, 12, 1, 64), 2, 16),
    ((1, "n", 7, 7), (1, 40, 7, 7), 1, 64),
    ((3, "n"), (3, 11), 1, 8),
    ((1, "n", 32, 32), (1, 100, 32, 32), 1, 512),
    ((64, "n", 80), (64, 30, 80), 1, 64),
]


@pytest.mark.parametrize("a,b,axis,bound", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_symbolic_concat_matches_ort(a, b, axis, bound, tmp_path):
    out = list(a)
    out[axis] = "total"
    path = tmp_path / "concat.onnx"
    path.write_bytes(_concat_model(list(a), list(b), axis, out).SerializeToString())
    shape = ",".join(str(d) for d in a)
    compiled = api.compile(str(path), input_shapes=[f"a:{shape}", "b:" + ",".join(map(str, b))], dim_bounds={"n": bound})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, bound - 1):
        feeds = {"a": rng.standard_normal([n if d == "n" else d for d in a]).astype(np.float32),
                 "b": rng.standard_normal(b).astype(np.float32)}
        np.testing.assert_array_equal(compiled(**feeds)["y"], sess.run(None, feeds)[0], err_msg=f"n={n}")


def test_cache_concat_serves_every_length(tmp_path):
    path = tmp_path / "cache.onnx"
    path.write_bytes(_concat_model([1, 4, "past", 64], [1, 4, 1, 64], 2, [1, 4, "total", 64]).SerializeToString())
    compiled = api.compile(str(path), input_shapes=["a:1,4,past,64", "b:1,4,1,64"], dim_bounds={"past": 2048})
    rng = np.random.default_rng(1)
    for n in (1, 5, 2047):  # the last one is over the serial limit (4 x 2048 x 64 elements): parallel
        feeds = {"a": rng.standard_normal((1, 4, n, 64)).astype(np.float32),
                 "b": rng.standard_normal((1, 4, 1, 64)).astype(np.float32)}
        np.testing.assert_array_equal(compiled(**feeds)["y"], np.concatenate([feeds["a"], feeds["b"]], axis=2))


def test_legalized_only_over_a_symbolic_axis():
    import tvm
    from tvm import relax

    from graphopt.backends.schedules.concat import legalize_concat

    fallback = tvm.ir.Op.get("relax.concat").get_attr("FLegalize")
    legalize = {"relax.concat": legalize_concat(16, fallback)}
    n = tvm.tirx.Var("n", "int64")
    names = {}
    for key, a_rows in (("symbolic", n), ("static", 9)):
        bb = relax.BlockBuilder()
        a = relax.Var("a", relax.TensorType([1, 12, a_rows, 64], "float32"))
        b = relax.Var("b", relax.TensorType([1, 12, 1, 64], "float32"))
        with bb.function("main", [a, b]):
            bb.emit_func_output(bb.emit(relax.op.concat([a, b], axis=2)))
        mod = relax.transform.LegalizeOps(customize_legalize_map=legalize)(bb.get())
        names[key] = sorted(gv.name_hint for gv in mod.functions if gv.name_hint != "main")
    assert names == {"symbolic": ["concat_rows"], "static": ["concatenate"]}


def test_kernel_copies_rows_without_a_branch_per_element():
    script = concat_func((1, 12, None, 64), (1, 12, 1, 64), 2, "float32", 16).script()
    assert "if_then_else" not in script and "T.vectorized(16)" in script
    assert "T.parallel" in script  # the large case; small ones stay serial (decided at run time)

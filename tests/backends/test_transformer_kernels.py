"""Kernels the transformer profiles pointed at: a packed-weight matmul over a row count with no whole
register tile (ViT's 197 tokens), compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _linear(m: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", F, [1, m, k])], [helper.make_tensor_value_info("y", F, [1, m, n])],
        initializer=[numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "w"),
                     numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _block_rows(mod, name: str) -> int:
    """The row extent of the buffer that block ``name`` writes, in the first function holding it."""
    import tvm
    from tvm import s_tir

    from graphopt.backends.schedules.analysis import get_block

    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = s_tir.Schedule(func)
            block = get_block(sch, name)
            if block is not None:
                return int(sch.get(block).writes[0].source.shape[-3])
    raise AssertionError(f"no block {name}")


@pytest.mark.parametrize("m, padded", [(197, 200), (64, 64), (5, 5)])
def test_packed_matmul_rows_padded_to_a_tile(m, padded):
    """197 rows (a prime) are computed as 200, in 8-row register tiles; the output keeps 197 rows and
    matches ORT. Row counts with whole tiles, or under one tile, are left as they are."""
    import graphopt
    from graphopt.backends.compile import fused_module

    model = _linear(m, 96, 80)
    assert _block_rows(fused_module(ir.serde.deserialize_model(model), "x86"), "packed_matmul") == padded
    x = np.random.default_rng(1).standard_normal((1, m, 96)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = np.asarray(graphopt.compile(ir.serde.deserialize_model(model), target="x86")(x=x)["y"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

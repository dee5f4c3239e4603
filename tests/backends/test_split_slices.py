"""A split whose pieces feed layout ops is written as strided slices that fuse into those ops
(backends/split_slices.py): no separate split kernel, same results as ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from graphopt.backends.compile import fused_module
from graphopt.backends.schedules.testing import ort_run
from graphopt.backends.split_slices import count_splits, split_to_slices
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import api

F = TensorProto.FLOAT
S, C, H = 37, 96, 4  # rows, width of one piece, heads


def _qkv_model(consumer: str) -> onnx.ModelProto:
    """x [1, S, C] · W [C, 3C] split in three; each piece either head-split ([1, H, S, C/H], a reshape
    and a transpose) or multiplied by a weight (a matmul)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 3 * C)).astype(np.float32) / 10, "w"),
             numpy_helper.from_array(np.array([1, S, H, C // H], np.int64), "heads"),
             numpy_helper.from_array(np.array([C] * 3, np.int64), "sizes"),
             numpy_helper.from_array(rng.standard_normal((C, C)).astype(np.float32) / 10, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Split", ["qkv", "sizes"], ["p0", "p1", "p2"], axis=2)]
    outs = []
    for i in range(3):
        if consumer == "heads":
            nodes += [helper.make_node("Reshape", [f"p{i}", "heads"], [f"r{i}"]),
                      helper.make_node("Transpose", [f"r{i}"], [f"y{i}"], perm=[0, 2, 1, 3])]
            outs.append(helper.make_tensor_value_info(f"y{i}", F, [1, H, S, C // H]))
        else:
            nodes.append(helper.make_node("MatMul", [f"p{i}", "w2"], [f"y{i}"]))
            outs.append(helper.make_tensor_value_info(f"y{i}", F, [1, S, C]))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", F, [1, S, C])], outs,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _names(model) -> list[str]:
    mod = fused_module(ir.serde.deserialize_model(model), "x86")
    return [gv.name_hint for gv, _ in mod.functions_items()]


def test_head_split_pieces_fuse_into_their_transposes_and_match_ort():
    model = _qkv_model("heads")
    names = _names(model)
    assert not any(n.startswith("split") for n in names), names
    assert sum("strided_slice" in n and "transpose" in n for n in names) == 3, names  # one copy a piece
    x = np.random.default_rng(1).standard_normal((1, S, C)).astype(np.float32)
    got = api.compile(ir.serde.deserialize_model(model), target="x86").runner()(x=x)
    for want, name in zip(ort_run(model, {"x": x}), ("y0", "y1", "y2")):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)


def test_pieces_feeding_matmuls_keep_the_split():
    model = _qkv_model("matmul")
    from graphopt.backends.compile import _front_end, _Stages

    lowered, _ = _front_end(ir.serde.deserialize_model(model), _Stages(), 2)
    before = count_splits(lowered.mod)
    assert before == 1
    assert count_splits(split_to_slices(lowered.mod)) == before

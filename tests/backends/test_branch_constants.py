"""Weights read inside an If's branches are bound into the branch functions, so work on them folds at
compile time (a merged decoder transposed its 32768x416 embedding on every call before)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
N, K = 600, 512  # W is 1.2 MB: over the ONNX constant folding's 1 MiB, so Wᵀ reaches the lowering


def _branch(name: str, op: str, nested: onnx.GraphProto | None = None, w: str = "W") -> onnx.GraphProto:
    """x · wᵀ then ``op`` with a second weight; the else branch nests another If."""
    nodes = [helper.make_node("Transpose", [w], [f"{name}_wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", f"{name}_wt"], [f"{name}_m"])]
    if nested is None:
        nodes.append(helper.make_node(op, [f"{name}_m", "b"], [f"{name}_y"]))
    else:
        nodes += [helper.make_node("If", ["c2"], [f"{name}_n"], then_branch=nested,
                                   else_branch=_branch(f"{name}_ie", "Sub", w="W2")),
                  helper.make_node(op, [f"{name}_m", f"{name}_n"], [f"{name}_y"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", F, [2, N])])


def branch_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((N, K)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]
    # W2 is dequantized in the main graph (the ONNX constant folding keeps DequantizeLinear): a
    # constant only once the Relax constant folding ran
    dequant = helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W2"])
    inits += [numpy_helper.from_array(rng.integers(-127, 128, (N, K)).astype(np.int8), "Wq"),
              numpy_helper.from_array(np.array(0.02, np.float32), "scale")]
    if_node = helper.make_node("If", ["c"], ["y"], then_branch=_branch("t", "Add"),
                               else_branch=_branch("e", "Mul", nested=_branch("e_it", "Max", w="W2"), w="W2"))
    graph = helper.make_graph(
        [dequant, if_node], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("c2", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", F, [2, K])],
        [helper.make_tensor_value_info("y", F, [2, N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_weights_fold_inside_branches():
    """After binding, no function takes a weight parameter and no transpose kernel is left: W·ᵀ was
    folded in every branch, the nested If's included."""
    from tvm import relax, tirx

    from graphopt.backends.compile import fused_module

    mod = fused_module(ir.serde.deserialize_model(branch_model()), "x86")
    branch_fns = [(gv.name_hint, f) for gv, f in mod.functions_items()
                  if isinstance(f, relax.Function) and gv.name_hint != "main"]
    assert len(branch_fns) == 4  # then, else, and the nested If's two branches
    for name, f in branch_fns:
        shapes = [tuple(int(d) for d in p.ty.shape) for p in f.params
                  if isinstance(p.ty, relax.TensorType) and p.ty.shape is not None]
        assert (N, K) not in shapes and (K, N) not in shapes and (N,) not in shapes, f"{name} still takes a weight: {shapes}"
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert not any("transpose" in k for k in kernels), kernels


@pytest.mark.parametrize("c, c2", [(True, True), (False, True), (False, False)])
def test_branches_match_ort(c, c2):
    import graphopt

    model = branch_model()
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    feeds = {"c": np.array(c), "c2": np.array(c2), "x": x}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = graphopt.compile(ir.serde.deserialize_model(model), target="x86")(**feeds)["y"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_affine_dequantized_weight_is_packed_in_a_branch(tmp_path):
    """A weight dequantized as Cast(q) * scale + zero (over the ONNX folding's 1 MiB bound) and read
    inside an If branch is folded in numpy and bound into the branch before the packed-matmul rewrite:
    the branch's matmul reads a packed constant, and the output matches ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.backends import schedules
    from graphopt.backends.compile import compile_model
    from graphopt.backends.schedules.testing import ort_run
    from graphopt.front import api

    rng = np.random.default_rng(0)
    k, n = 256, 1280  # 1.3 MB of float32
    q = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0.003, np.float32), "z")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, 4, n])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]),
                               helper.make_node("Neg", ["m"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 4, n])])
    nodes = [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["qf", "s"], ["ws"]),
             helper.make_node("Add", ["ws", "z"], ["w"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, k]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, n])], [q, scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target="x86")
    assert sum("packed_matmul" in f for f in schedules.last_report()) >= 2, schedules.last_report()
    x = rng.standard_normal((1, 4, k)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_allclose(compiled(**feeds)["y"], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)

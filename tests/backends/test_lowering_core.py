"""The lowering core: lower(), parameters, symbolic dims, constant folding of shape arithmetic, errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conformance_util import check_against_ort, make_model
from onnx import TensorProto as T
from onnx import helper

from graphopt.backends.lowering import check_supported, coverage, lower
from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.context import ConstantInputRequired
from graphopt.backends.lowering.testing import compile_lowered, run_lowered
from graphopt.core.errors import GraphoptError, UnsupportedError

rng = np.random.default_rng(0)


def _mlp(batch="N"):
    w = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["y"]),
    ]
    return make_model(nodes, [("x", T.FLOAT, [batch, 8])], [("y", T.FLOAT, [batch, 16])], {"w": w, "b": b})


def test_lower_puts_data_inputs_first_then_large_weights_as_params():
    lowered = lower(ir.serde.deserialize_model(_mlp()))
    main = lowered.mod["main"]
    assert [str(p.name) for p in main.params] == ["x", "w"]  # b (16 elements) is inlined
    assert int(main.attrs["num_input"]) == 1 == lowered.num_input
    assert list(lowered.params) == ["w"] and lowered.params["w"].shape == (8, 16)
    assert lowered.inputs == [("x", ("N", 8), "float32")]  # a symbolic dim keeps its name
    assert lowered.outputs == [("y", ("N", 16), "float32")]


def test_symbolic_batch_runs_at_two_sizes_with_one_compile():
    model = _mlp()
    lowered = lower(ir.serde.deserialize_model(model))
    vm = compile_lowered(lowered)
    import onnxruntime as ort
    import tvm

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(lowered.params["w"])).numpy()
        np.testing.assert_allclose(out, sess.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_shape_arithmetic_is_folded_without_graph_passes():
    # Reshape target computed as Concat(Gather(Shape(x), 0), [-1]): constant once x's shape is static.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "zero1": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    model = make_model(nodes, [("x", T.FLOAT, [2, 3, 4])], [("y", T.FLOAT, None)], inits)
    got = check_against_ort(model, {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)})
    assert got["y"].shape == (2, 12)
    text = lower(ir.serde.deserialize_model(model)).mod.script()
    assert "shape_of" not in text and "R.take" not in text  # no run-time shape computation left


def test_check_supported_lists_every_unsupported_op_before_lowering():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("NoSuchOp", ["a"], ["b"]),
        helper.make_node("NoSuchOp", ["b"], ["c"]),
        helper.make_node("Bar", ["c"], ["y"], domain="com.example"),
    ]
    proto = make_model(nodes, [("x", T.FLOAT, [2])], [("y", T.FLOAT, [2])])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(UnsupportedError) as err:
        check_supported(model)
    msg = str(err.value)
    assert "NoSuchOp" in msg and "2 node(s)" in msg and "Bar" in msg and "com.example" in msg
    assert "\n" not in msg
    rows = {r["op"]: r for r in coverage(model)}
    assert rows["Relu"]["status"] == "supported" and rows["NoSuchOp"]["status"] == "unsupported"
    assert rows["NoSuchOp"]["count"] == 2 and rows["Bar"]["reason"]
    with pytest.raises(UnsupportedError):
        lower(model)


def test_runtime_shape_input_is_a_one_line_error_naming_node_and_input():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_it")]
    model = make_model(nodes, [("x", T.FLOAT, [2, 3]), ("shape", T.INT64, [2])], [("y", T.FLOAT, None)])
    with pytest.raises(ConstantInputRequired) as err:
        lower(ir.serde.deserialize_model(model))
    assert isinstance(err.value, GraphoptError)
    assert "reshape_it" in str(err.value) and "'shape'" in str(err.value) and err.value.value_name == "shape"


def test_bad_attribute_becomes_graphopt_error_not_a_tvm_traceback():
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 0], name="bad_perm")]
    model = make_model(nodes, [("x", T.FLOAT, [2, 3])], [("y", T.FLOAT, None)])
    with pytest.raises(UnsupportedError, match="bad_perm"):
        lower(ir.serde.deserialize_model(model))


def test_multiple_outputs_and_constant_outputs():
    nodes = [
        helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    model = make_model(nodes, [("x", T.FLOAT, [2, 4])],
                       [("a", T.FLOAT, None), ("b", T.FLOAT, None), ("s", T.INT64, None)])
    check_against_ort(model, {"x": rng.standard_normal((2, 4)).astype(np.float32)})


def test_broadcast_and_window_pad_helpers_agree_with_numpy_and_onnx_rules():
    for a, b in [((2, 1, 3), (4, 1)), ((), (5,)), ((1,), (3, 1))]:
        assert H.broadcast_shapes(a, b) == np.broadcast_shapes(a, b)
    with pytest.raises(ValueError):
        H.broadcast_shapes((2,), (3,))
    # SAME_UPPER keeps the output at ceil(in / stride), extra pad at the end; SAME_LOWER at the start.
    for size, k, s in [(7, 3, 2), (8, 4, 3), (5, 2, 1)]:
        up = H.window_pads("SAME_UPPER", [size], [k], [s])
        lo = H.window_pads("SAME_LOWER", [size], [k], [s])
        out = (size + up[0] + up[1] - k) // s + 1
        assert out == -(-size // s) and up[1] >= up[0] and lo[0] >= lo[1] and sum(up) == sum(lo)
    assert H.norm_axis(-1, 3) == 2
    with pytest.raises(ValueError):
        H.norm_axis(3, 3)


def test_run_lowered_accepts_ir_models_and_paths(tmp_path):
    model = _mlp(batch=3)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    a = run_lowered(model, {"x": x})["y"]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    b = run_lowered(str(path), {"x": x})["y"]
    np.testing.assert_array_equal(a, b)

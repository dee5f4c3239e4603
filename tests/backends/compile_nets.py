"""Small ONNX models for the compile / bundle tests (real weights from a seeded generator)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh


def conv_net(path, batch: int | str = 1, size: int = 16) -> str:
    """Conv(3x3, pad 1) + Relu + MaxPool + GlobalAveragePool + Flatten + Gemm: x [batch,3,size,size] -> y [batch,10]."""
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        nh.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        nh.from_array((rng.standard_normal((10, 8)) * 0.3).astype(np.float32), "w2"),
        nh.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("GlobalAveragePool", ["p"], ["g"]),
        h.make_node("Flatten", ["g"], ["f"]),
        h.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    graph = h.make_graph(
        nodes, "conv_net",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def two_input_net(path) -> str:
    """y = relu(a @ w + b), z = a * 2: two inputs, two outputs (names and order matter)."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.standard_normal((64, 40)).astype(np.float32), "w"),
             nh.from_array(np.array(2.0, np.float32), "two")]
    nodes = [
        h.make_node("MatMul", ["a", "w"], ["m"]),
        h.make_node("Add", ["m", "b"], ["s"]),
        h.make_node("Relu", ["s"], ["y"]),
        h.make_node("Mul", ["a", "two"], ["z"]),
    ]
    graph = h.make_graph(
        nodes, "two_input_net",
        [h.make_tensor_value_info("a", TensorProto.FLOAT, [2, 64]), h.make_tensor_value_info("b", TensorProto.FLOAT, [40])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [2, 40]), h.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def unsupported_net(path) -> str:
    """Relu followed by an op no lowering rule knows (custom domain)."""
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Frobnicate", ["r"], ["y"], domain="com.example")]
    graph = h.make_graph(nodes, "unsupported_net", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def ort_run(path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)

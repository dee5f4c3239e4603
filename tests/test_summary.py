"""graphopt.core.summary: statistics checked against independent counts (numpy, ONNX Runtime shapes)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort

from graphopt.front import cli

from graphopt.core import io

from graphopt import models
from graphopt.core.summary import summarize


def _model() -> ir.Model:
    """Grouped Conv + bias, MatMul, Gemm with C, Relu, ReduceMean, a custom-domain op and a Constant."""
    rng = np.random.default_rng(0)
    w = rng.random((8, 2, 3, 3), dtype=np.float32)  # 4 input channels, group 2
    b = rng.random(8, dtype=np.float32)
    m1 = rng.random((6, 5), dtype=np.float32)
    g_b = rng.random((7, 5), dtype=np.float32)
    g_c = rng.random(7, dtype=np.float32)
    model = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.acme" : 1]>
        g (float[N,4,8,8] x) => (float[N,7] y, float[N,8,6,5] mm) {
          c = Conv<group = 2>(x, w, b)
          r = Relu(c)
          mm = MatMul(r, m1)
          p = ReduceMean<axes = [2, 3], keepdims = 0>(r)
          q = Slice(p, s0, s1, s2)
          k = Constant<value = float[5] {1.0, 2.0, 3.0, 4.0, 5.0}>()
          qk = Add(q, k)
          y = Gemm<transB = 1>(qk, g_b, g_c)
          unused = com.acme.Thing(y)
        }
        """
    )
    for name, arr in {"w": w, "b": b, "m1": m1, "g_b": g_b, "g_c": g_c,
                      "s0": np.array([0]), "s1": np.array([5]), "s2": np.array([1])}.items():
        v = ir.Value(name=name, const_value=ir.tensor(arr))
        model.graph.register_initializer(v)
        for node in model.graph:
            for i, inp in enumerate(node.inputs):
                if inp is not None and inp.name == name and inp is not v:
                    node.replace_input_with(i, v)
    return model


def test_flops_follow_the_documented_convention():
    model = _model()
    dynamic = summarize(model)
    assert dynamic["flops"] is None and dynamic["flops_unknown_nodes"] > 0
    assert dynamic["inputs"][0]["shape"] == ["N", 4, 8, 8]

    from graphopt.core.shapes import specialize

    specialize(model, ["x:2,4,8,8"])
    thing = model.graph[-1].outputs[0]
    assert thing.shape is None  # nothing can infer a custom op ...
    assert summarize(model)["flops"] is None  # ... so the total is unknown
    thing.shape, thing.dtype = model.graph.outputs[0].shape, ir.DataType.FLOAT  # as if it were annotated
    s = summarize(model)
    proto = ir.to_proto(model)
    del proto.graph.node[-1]  # ORT cannot run com.acme.Thing; the shapes below come from ORT
    names = ["c", "mm", "p", "y"]
    del proto.graph.output[:]
    for n in names:
        proto.graph.output.add(name=n)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    c, mm, p, y = (a.shape for a in sess.run(None, {"x": np.zeros((2, 4, 8, 8), np.float32)}))

    conv = 2 * math.prod(c) * (4 // 2) * 3 * 3 + math.prod(c)  # 2*MACs + bias
    assert s["flops_by_op"]["Conv"] == conv
    assert s["flops_by_op"]["MatMul"] == 2 * math.prod(mm) * 6
    assert s["flops_by_op"]["Gemm"] == 2 * y[0] * y[1] * 5 + math.prod(y)
    assert s["flops_by_op"]["ReduceMean"] == math.prod(c)  # one per input element
    assert s["flops_by_op"]["Relu"] == math.prod(c)  # one per output element
    assert s["flops_by_op"]["com.acme::Thing"] == math.prod(y)
    assert "Slice" not in s["flops_by_op"] and "Constant" not in s["flops_by_op"]
    assert s["flops"] == sum(s["flops_by_op"].values())
    assert s["outputs"] == [
        {"name": "y", "dtype": "float32", "shape": list(y)},
        {"name": "mm", "dtype": "float32", "shape": list(mm)},
    ]


def test_counts_histogram_and_parameters():
    model = _model()
    s = summarize(model)
    proto = ir.to_proto(model)
    arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    arrays += [onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"]
    assert s["parameters"] == sum(a.size for a in arrays)
    assert s["parameter_bytes"] == sum(a.nbytes for a in arrays)
    assert s["nodes"] == len(proto.graph.node)
    assert s["op_histogram"]["com.acme::Thing"] == 1 and s["op_histogram"]["Conv"] == 1
    assert sum(s["op_histogram"].values()) == s["nodes"]
    assert s["opsets"] == {"": 17, "com.acme": 1}


def test_subgraph_nodes_are_counted():
    m = io.load(models.resolve("silero:16k_op15"))
    s = summarize(m)
    assert s["nodes"] == sum(1 for _ in ir.traversal.RecursiveGraphIterator(m.graph)) > len(m.graph)
    assert s["op_histogram"]["If"] >= 1


def test_summary_does_not_modify_the_model():
    model = io.load(onnx.__path__[0] + "/backend/test/data/light/light_squeezenet.onnx")
    before = ir.to_proto(model).SerializeToString()
    s = summarize(model)
    assert s["flops"] > 0
    assert ir.to_proto(model).SerializeToString() == before


def test_inspect_command_prints_the_summary(capsys):
    path = str(models.resolve("rapidocr:cls"))
    assert cli.main(["inspect", path, "--input-shape", "x:1,3,48,192"]) == 0
    out = capsys.readouterr().out
    assert "x: float32 [1,3,48,192]" in out
    assert "estimated FLOPs: " in out and "unknown" not in out
    top = [line.split() for line in out.splitlines() if line.endswith("%")]
    assert top and top[0][0] == "Conv"  # the op with the most FLOPs comes first, with its share
    assert sum(float(t[-1].rstrip("%")) for t in top) <= 100.05
    assert cli.main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"][0]["shape"] == [-1, 3, "?", "?"]  # as the exporter declared it
    assert info["flops"] is None
    assert info["op_histogram"]["Conv"] == sum(
        1 for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == "Conv"
    )

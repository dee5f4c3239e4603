"""--precision fp16: convs and matmuls in float16 with float32 accumulation (CUDA targets, tensor cores)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.lowering.convert import lower
from graphopt.backends.lowering.testing import as_ir, compile_lowered
from graphopt.backends.precision import to_fp16
from graphopt.backends.targets import cuda_check
from graphopt.front import api
from graphopt.front.cli import main

RNG = np.random.default_rng(2)


def _mlp(path=None):
    """x[128, 256] -> MatMul 256x256 -> Relu -> Conv-free MatMul 256x128 + bias -> y: extents over 64."""
    w1 = (RNG.standard_normal((256, 256)) * 0.06).astype(np.float32)
    w2 = (RNG.standard_normal((256, 128)) * 0.06).astype(np.float32)
    b2 = RNG.standard_normal(128).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [128, 128])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, str(path))
    return model


def test_fp16_cuda_build_uses_tensor_cores(tmp_path):
    _mlp(tmp_path / "m.onnx")
    compiled = api.compile(tmp_path / "m.onnx", target="cuda-sm80", precision="fp16", output=tmp_path / "b")
    (source,) = cuda_check.cuda_sources(compiled.executable)
    assert "wmma::mma_sync" in source  # tensor-core fragments: half inputs, float accumulators
    assert "wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>" in source
    assert compiled.inputs == [("x", (128, 256), "float32")] and compiled.outputs[0][2] == "float32"
    fp32 = api.compile(tmp_path / "m.onnx", target="cuda-sm80")
    (plain,) = cuda_check.cuda_sources(fp32.executable)
    assert "wmma" not in plain
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["precision"] == "fp16"


def test_fp16_numerics_on_the_cpu_match_ort_within_half_precision():
    model = _mlp()
    lowered = lower(as_ir(model))
    vm = compile_lowered(dataclasses.replace(lowered, mod=to_fp16(lowered.mod)))
    import tvm

    x = RNG.standard_normal((128, 256)).astype(np.float32)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(a) for a in lowered.params.values()]
    got = vm["main"](*args).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-6 < err < 5e-3  # float16 inputs, float32 accumulation: not exact, close


def test_fp16_on_a_cpu_target_exits_2(tmp_path, capsys):
    _mlp(tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "--precision", "fp16", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision fp16 needs a CUDA target" in err[0]
    assert not (tmp_path / "b").exists()

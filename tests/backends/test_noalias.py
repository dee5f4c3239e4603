"""Single-buffer PrimFuncs are marked noalias before codegen, so that the functions TVM's LLVM code
generator emits after them keep their alias information (backends/noalias.py): a matmul over a symbolic
row count keeps its accumulators in registers."""

from __future__ import annotations

import re

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import te

from graphopt.backends.compile import compile_model
from graphopt.backends.noalias import functions_without_noalias, mark_single_buffer_noalias
from graphopt.backends.schedules.testing import ort_run
from graphopt.backends.targets import get_target
from graphopt.front import api


def _func(nbuffers: int, noalias: bool):
    bufs = [te.placeholder((4,), name=f"a{i}") for i in range(nbuffers - 1)]
    out = te.compute((4,), lambda i: sum((b[i] for b in bufs), te.const(1.0)), name="out")
    f = te.create_prim_func([*bufs, out])
    return f if noalias else f.without_attr("tirx.noalias")


def test_marks_only_functions_of_one_buffer():
    mod = tvm.IRModule({"one": _func(1, False), "two": _func(2, False), "marked": _func(2, True)})
    assert sorted(functions_without_noalias(mod)) == ["one", "two"]
    out = mark_single_buffer_noalias(mod)
    assert functions_without_noalias(out) == ["two"]  # two buffers may alias: left as its producer said


def _symbolic_matmul(path, k=96, n=192):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return model


def _asm(compiled) -> str:
    mod = compiled.executable.mod
    for m in [mod, *mod.imports]:
        try:
            text = m.inspect_source("asm")
        except Exception:  # noqa: BLE001 - a module without assembly (the VM's)
            continue
        if text:
            return text
    raise AssertionError("no assembly in the built module")


def test_symbolic_matmul_keeps_accumulators_in_registers(tmp_path):
    """The FMA loop of the packed matmul keeps its accumulators in registers: with the alias information
    lost (a shape function emitted first) every FMA stored its accumulator and reloaded the broadcast
    operand. (The few-row nests prefetch the weight once per 8 k steps, and LLVM stores the
    accumulators before each group's prefetches: one store per accumulator per 8 steps is allowed.)"""
    model = _symbolic_matmul(tmp_path / "m.onnx")
    spec = get_target({"preset": "x86", "mcpu": "skylake-avx512"})  # assembly only: runs on any x86 host
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target=spec, dim_bounds={"seq": 64})
    blocks = re.split(r"\n\.?[\w$.]+:\s*(?:#[^\n]*)?\n", _asm(compiled))
    fma_loop = max(blocks, key=lambda blk: len(re.findall(r"vfmadd\w+\s.*%zmm", blk)))
    fma_loop = re.split(r"\n\s*j\w+\s", fma_loop)[0]  # up to the loop's branch back
    assert len(re.findall(r"vfmadd\w+\s.*%zmm", fma_loop)) >= 16
    stores = re.findall(r"vmov[au]ps\s+%zmm\d+, [^%\n]*\(", fma_loop)
    assert len(stores) * 4 <= len(re.findall(r"vfmadd\w+\s.*%zmm", fma_loop)), stores[:4]
    del model


def test_symbolic_matmul_matches_ort(tmp_path):
    model = _symbolic_matmul(tmp_path / "m.onnx")
    compiled = compile_model(api.load(tmp_path / "m.onnx"), target="x86", dim_bounds={"seq": 64})
    rng = np.random.default_rng(1)
    for seq in (1, 13, 64):
        x = rng.standard_normal((1, seq, 96)).astype(np.float32)
        np.testing.assert_allclose(compiled(x=x)["y"], ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)

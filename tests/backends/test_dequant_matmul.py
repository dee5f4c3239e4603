"""Weight-only int8/int4 matmuls compiled to one kernel that reads the quantized weight
(``backends/schedules/dequant_matmul.py``), compared with ONNX Runtime on the same ONNX file.

ONNX Runtime is run with ``session.qdq_matmulnbits_accuracy_level`` 0: by default it fuses
DequantizeLinear + MatMul into MatMulNBits and quantizes the activations to int8 (a different
computation); level 0 computes in float32, the math the kernel does. The weights are big enough
(over the lowering's constant-folding limit) that the DequantizeLinear reaches the compiler.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import dequant_matmul
from graphopt.passes.quantize_weights import quantize_weights

K, N = 256, 333  # N: 5 tiles of 64 columns and a partial one


def _model(rows, *, bits: int, symmetric: bool, gemm: bool = False, shared: bool = False) -> ir.Model:
    """x [1, rows, K] -> MatMul by a quantized [K, N] weight (or Gemm by an [N, K] one, transB; or two
    MatMuls sharing one weight) -> y."""
    rng = np.random.default_rng(bits + 2 * symmetric)
    inits, nodes = [], []
    if gemm:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, K])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, N])
        inits += [numpy_helper.from_array((0.05 * rng.standard_t(5, (N, K))).astype(np.float32), "w"),
                  numpy_helper.from_array(rng.normal(size=N).astype(np.float32), "b")]
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1))
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, K])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, N])
        inits.append(numpy_helper.from_array((0.05 * rng.standard_t(5, (K, N))).astype(np.float32), "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y0" if shared else "y"]))
        if shared:
            nodes += [helper.make_node("Relu", ["x"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["y1"]),
                      helper.make_node("Add", ["y0", "y1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return quantize_weights(model, bits=bits, symmetric=symmetric)


def _ort(model: ir.Model, path, feeds) -> np.ndarray:
    ir.save(model, str(path))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _kernels(compiled) -> int:
    return compiled.executable.as_text().count("call  dequant_matmul")


def _check(compiled, model, tmp_path, rows_list, gemm=False):
    for rows in rows_list:
        x = np.random.default_rng(rows).normal(size=(rows, K) if gemm else (1, rows, K)).astype(np.float32)
        want = _ort(model, tmp_path / "q.onnx", {"x": x})
        got = compiled(x)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (8, False), (4, True)])
@pytest.mark.parametrize("embed", [True, False], ids=["constant", "argument"])
def test_matches_ort_and_reads_the_quantized_weight(tmp_path, bits, symmetric, embed):
    model = _model(1, bits=bits, symmetric=symmetric)
    compiled = compile_model(model, target="x86", embed_params=embed)
    assert _kernels(compiled) == 1
    _check(compiled, model, tmp_path, [1])
    if not embed:  # stored quantized, packed into the kernel's column panels
        (q,) = [np.asarray(p) for name, p in compiled.params.items() if "__q" in name]
        tile = q.shape[-1]  # int4: eight codes a 32-bit word
        assert q.dtype == (np.int32 if bits == 4 else np.int8 if symmetric else np.uint8)
        assert q.shape == (-(-N // tile), K // 8 if bits == 4 else K, tile)


def test_several_rows_and_a_symbolic_row_count(tmp_path):
    model = _model(5, bits=8, symmetric=False)
    compiled = compile_model(model, target="x86", embed_params=False)
    assert _kernels(compiled) == 1
    _check(compiled, model, tmp_path, [5])
    sym = _model("seq", bits=4, symmetric=True)
    compiled = compile_model(sym, target="x86", embed_params=False, dim_bounds={"seq": 16})
    assert _kernels(compiled) == 1
    _check(compiled, sym, tmp_path, [1, 2, 7, 16])


def test_weight_read_as_stored(tmp_path, monkeypatch):
    """Arguments not packed (the kernel reads ``[K, N]`` in wide column runs, the last vector clamped)."""
    monkeypatch.setattr(dequant_matmul, "pack_dequant_params", lambda mod, params, lanes: (mod, params))
    for bits, symmetric, rows in ((8, True, 1), (4, False, 3)):
        model = _model(rows, bits=bits, symmetric=symmetric)
        compiled = compile_model(model, target="x86", embed_params=False)
        assert _kernels(compiled) == 1
        assert any(np.asarray(p).shape == (K, N) for p in compiled.params.values())
        _check(compiled, model, tmp_path, [rows])


def test_gemm_transposed_weight_and_a_shared_weight(tmp_path):
    for bits, symmetric in ((8, True), (4, False)):
        gemm = _model(2, bits=bits, symmetric=symmetric, gemm=True)
        for embed in (True, False):  # transposed at compile time; an [N, K] argument, packed transposed
            compiled = compile_model(gemm, target="x86", embed_params=embed)
            assert _kernels(compiled) == 1
            _check(compiled, gemm, tmp_path, [2], gemm=True)
    shared = _model(1, bits=4, symmetric=False, shared=True)
    compiled = compile_model(shared, target="x86", embed_params=False)
    assert _kernels(compiled) == 2  # both matmuls on the kernel, the weight packed once
    assert [np.asarray(p).dtype for p in compiled.params.values()] == [np.int32, np.float32, np.uint8]
    _check(compiled, shared, tmp_path, [1])


def test_turned_off_keeps_the_float_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DEQUANT_MATMUL", "0")
    model = _model(1, bits=8, symmetric=True)
    compiled = compile_model(model, target="x86", embed_params=False)
    assert _kernels(compiled) == 0
    _check(compiled, model, tmp_path, [1])


@pytest.mark.parametrize("bits,symmetric,block", [(8, True, 16), (4, True, 8), (4, False, 16), (4, True, 4), (8, True, 1)])
def test_one_row_blocks_of_other_sizes(tmp_path, bits, symmetric, block):
    """Blocks of one word of 4-bit codes (one accumulator stream), of two, and of 4 rows (not a whole
    word: codes kept a byte each); int8 blocks of 16 rows and of one (one accumulator stream)."""
    model = _requantized(bits, symmetric, block)
    compiled = compile_model(model, target="x86", embed_params=False)
    assert _kernels(compiled) == 1
    q = np.asarray(compiled.params["q"])
    assert q.dtype == (np.int32 if bits == 4 and block % 8 == 0 else np.int8 if symmetric else np.uint8)
    _check(compiled, model, tmp_path, [1])


def _requantized(bits, symmetric, block):
    """``_model``'s one-row MatMul with a DequantizeLinear of any block size (the quantize pass writes
    powers of two >= 16; other exporters write others), codes in the int4/uint4 range for 4 bits."""
    rng = np.random.default_rng(block)
    w = (0.05 * rng.standard_t(5, (K, N))).astype(np.float32)
    blocks = w.reshape(K // block, block, N)
    hi = 2 ** (bits - 1) - 1
    if symmetric:
        s = np.abs(blocks).max(1) / hi
        q, z = np.clip(np.round(blocks / s[:, None]), -hi - 1, hi).astype(np.int8), None
    else:
        lo_, hi_ = blocks.min(1), blocks.max(1)
        s = (hi_ - lo_) / (2 * hi + 1)
        z = np.clip(np.round(-lo_ / s), 0, 2 * hi + 1).astype(np.uint8)
        q = np.clip(np.round(blocks / s[:, None]) + z[:, None], 0, 2 * hi + 1).astype(np.uint8)
    inits = [numpy_helper.from_array(q.reshape(K, N), "q"), numpy_helper.from_array(s.astype(np.float32), "s")]
    inits += [] if z is None else [numpy_helper.from_array(z, "z")]
    nodes = [helper.make_node("DequantizeLinear", [i.name for i in inits], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _one_row_asm(bits: int) -> str:
    import tvm

    from graphopt.backends.schedules.dequant_kernel import dequant_matmul_func
    from graphopt.backends.schedules.features import as_target
    from graphopt.backends.targets import get_target

    func = dequant_matmul_func(K, N, 32, "int8", "float32", False, True, 64, 1, 8 if bits == 4 else None)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=as_target(get_target("x86")))
    return ex.mod.inspect_source("asm")


def test_one_row_kernel_code_on_avx512():
    """The decode step's GEMV (one row, AVX-512): the codes prefetched ahead of their loads, two sets of
    4 accumulators (8 FMA chains), and 4-bit codes looked up by a 16-entry permute, never converted."""
    ops = {}
    for bits in (8, 4):
        lines = [line.split()[0] for line in _one_row_asm(bits).splitlines() if line.startswith("\t")]
        ops[bits] = {op: lines.count(op) for op in set(lines)}
    assert ops[8].get("prefetcht0", 0) >= 1 and ops[4].get("prefetcht0", 0) >= 1
    assert ops[8].get("vpmovsxbd", 0) >= 8 and ops[8].get("vcvtdq2ps", 0) >= 8
    assert ops[4].get("vpermps", 0) + ops[4].get("vpermd", 0) >= 16
    assert ops[4].get("vcvtdq2ps", 0) == 0 and ops[4].get("vpandd", 0) == 0


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False)])
def test_one_row_kernel_of_narrower_vectors(tmp_path, bits, symmetric):
    """The one-row kernel for AVX2 (tiles of 32 columns) and 128-bit vectors (16): 4-bit codes shifted,
    masked and converted (no permute table), built for an AVX2 CPU and run here against ORT."""
    import tvm
    from graphopt.backends.schedules.dequant_kernel import dequant_matmul_func, nibble_offset, pack_columns, pack_nibbles

    model = _requantized(bits, symmetric, 32)
    inits = {i.name: i.const_value.numpy() for i in model.graph.initializers.values()}
    x = np.random.default_rng(1).normal(size=(1, 1, K)).astype(np.float32)
    want = _ort(model, tmp_path / "q.onnx", {"x": x})[0]
    q, s, z = inits["q"], inits["s"], inits.get("z")
    offset = nibble_offset(q, 32) if bits == 4 else None
    assert (offset is not None) == (bits == 4)
    for tile in (32, 16):
        func = dequant_matmul_func(K, N, 32, str(q.dtype), "float32", z is not None, True, tile, 1, offset)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
        packed = pack_columns(q, tile)
        args = [x[0], pack_nibbles(packed, offset) if offset is not None else packed, pack_columns(s, tile)]
        args += [] if z is None else [pack_columns(z, tile)]
        out = tvm.runtime.tensor(np.zeros((1, N), np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

"""Weight-only quantization of MatMul/Gemm weights to int4/int8, block-wise along the reduction axis.

Each constant float weight ``W`` of a MatMul (input B, ``[K, N]``) or Gemm (``[K, N]``, or ``[N, K]``
with ``transB``) is cut into blocks of ``block_size`` consecutive elements along K; each block gets a
scale (and, asymmetric, a zero point), stored in the weight's float dtype:

* symmetric: ``q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = max|w| / (2^(b-1) - 1)``,
  stored as INT4/INT8;
* asymmetric: ``q = clip(round(w / s) + z, 0, 2^b - 1)`` with ``s = (max - min) / (2^b - 1)`` over a
  range that includes 0 (so zero stays exact) and ``z = round(-min / s)``, stored as UINT4/UINT8.

Two forms, chosen by ``target_runtime``:

* ``"onnx"`` / ``"graphopt"``: the standard ``DequantizeLinear(q, s[, z], axis=K's axis,
  block_size=B)`` (opset 21; its output keeps the weight's name, so the MatMul/Gemm is unchanged).
  The model is upgraded to opset 21 when that is exact (``opset_upgrade.try_upgrade``), else refused
  with the reasons. Note that ONNX Runtime itself fuses DequantizeLinear(int4) + MatMul into
  MatMulNBits and, by default (session option ``session.qdq_matmulnbits_accuracy_level`` = 4),
  computes it with int8-quantized activations; level 0 computes in float32.
* ``"ort"``: ONNX Runtime's ``com.microsoft.MatMulNBits(A, B, scales[, zero_points])``: B is
  ``[N, ceil(K/B), B*bits/8]`` uint8 (per output column, blocks along K, two 4-bit values a byte, low
  nibble first, the last block zero-padded), scales ``[N * blocks]``, zero points ``[N * ceil(blocks
  * bits / 8)]`` uint8 packed the same way (absent: 2^(bits-1), which the symmetric form uses by
  storing ``q + 2^(bits-1)``). A Gemm becomes MatMulNBits (+ Add of C) when ``transA=0``,
  ``alpha=1`` and ``beta=1``; any other Gemm takes the DequantizeLinear form.

Only the main graph is rewritten. Weights with fewer than ``min_elements`` elements, not 2-D or not
float32/float16 are left alone.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.core.errors import UnsupportedError, UsageError
from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, new_const, replace_value

DQ_OPSET = 21
FORMS = {"onnx": "dq", "graphopt": "dq", "ort": "nbits"}
_TYPES = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
_FLOATS = (np.float32, np.float16)


def quantize_blocks(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Quantize ``[N, K]`` rows in blocks of ``block_size`` along K.

    Returns ``(q [N, K] int, scale [N, blocks], zero_point [N, blocks] or None)``, integers as int32.
    """
    n, k = w_nk.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float64)
    padded[:, :k] = w_nk
    view = padded.reshape(n, blocks, block_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.abs(view).max(axis=-1) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(w_nk.dtype)
        q = np.clip(np.round(view / scale[..., None]), -qmax - 1, qmax)
        zero_point = None
    else:
        qmax = 2**bits - 1
        lo, hi = np.minimum(view.min(axis=-1), 0), np.maximum(view.max(axis=-1), 0)
        scale = (hi - lo) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(w_nk.dtype)
        zero_point = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(view / scale[..., None]) + zero_point[..., None], 0, qmax)
        zero_point = zero_point.astype(np.int32)
    return q.reshape(n, -1)[:, :k].astype(np.int32), scale, zero_point


def pack_nibbles(rows: np.ndarray) -> np.ndarray:
    """uint8 ``[..., ceil(M/2)]`` from 4-bit values ``[..., M]``: element 2i in the low nibble of byte i."""
    if rows.shape[-1] % 2:
        rows = np.concatenate([rows, np.zeros((*rows.shape[:-1], 1), rows.dtype)], axis=-1)
    return (rows[..., 0::2] | (rows[..., 1::2] << 4)).astype(np.uint8)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Weight-only block-wise int4/int8 for MatMul/Gemm weights (DequantizeLinear, or MatMulNBits for ORT)."""

    def __init__(self, bits: int = 4, block_size: int = 32, target_runtime: str = "onnx",
                 symmetric: bool = True, min_elements: int = 1024) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise UsageError(f"weight-only quantization: bits must be 4 or 8, got {bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise UsageError(f"weight-only quantization: block_size must be a power of two >= 16, got {block_size}")
        if target_runtime not in FORMS:
            raise UsageError(f"target runtime {target_runtime!r}: expected one of {', '.join(FORMS)}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.form = FORMS[target_runtime]
        self.min_elements = min_elements
        self.quantized: list[str] = []  # names of the weights quantized by the last run
        self.float_bytes = 0  # their bytes before
        self.quantized_bytes = 0  # bytes of what replaced them (codes, scales, zero points)

    # -- which nodes ----------------------------------------------------------------------------

    def _weight(self, node: ir.Node) -> tuple[np.ndarray, int] | None:
        """(weight, K's axis in it) when ``node`` is a MatMul/Gemm with a quantizable constant weight."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype not in _FLOATS or w.size < self.min_elements:
            return None
        if const_array(node.inputs[0]) is not None:
            return None
        k_axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
        return w, k_axis

    def _nbits_fits(self, node: ir.Node) -> bool:
        if self.form != "nbits":
            return False
        if node.op_type == "MatMul":
            shape = node.inputs[0].shape
            return shape is None or len(shape) >= 2
        a = node.attributes
        return (a.get_int("transA", 0) == 0 and a.get_float("alpha", 1.0) == 1.0
                and (len(node.inputs) < 3 or node.inputs[2] is None or a.get_float("beta", 1.0) == 1.0))

    # -- the pass -------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized, self.float_bytes, self.quantized_bytes = [], 0, 0
        graph = model.graph
        plan = [(node, *found) for node in graph if (found := self._weight(node)) is not None]
        if any(not self._nbits_fits(node) for node, *_ in plan):
            self._ensure_opset(model)
        dq_done: dict[int, ir.Value] = {}
        nbits_done: dict[int, tuple[ir.Value, ...]] = {}
        originals = []
        for node, w, k_axis in plan:
            value = node.inputs[1]
            originals.append(value)
            if self._nbits_fits(node):
                if id(value) not in nbits_done:
                    nbits_done[id(value)] = self._nbits_constants(graph, node, w, k_axis)
                self._to_nbits(graph, node, w.shape[k_axis], w.shape[1 - k_axis], nbits_done[id(value)])
            else:
                if id(value) not in dq_done:
                    dq_done[id(value)] = self._dequantize(graph, node, w, k_axis)
                node.replace_input_with(1, dq_done[id(value)])
        drop_unused_constants(graph, originals)
        if nbits_done:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, bool(self.quantized))

    def _ensure_opset(self, model: ir.Model) -> None:
        from graphopt.passes.opset_upgrade import try_upgrade, upgrade_blockers

        if try_upgrade(model, DQ_OPSET):
            return
        why = "; ".join(upgrade_blockers(model, DQ_OPSET)[:3])
        raise UnsupportedError(
            f"block-wise DequantizeLinear needs opset {DQ_OPSET}; the model's opset "
            f"{model.opset_imports.get('')} cannot be upgraded exactly: {why}")

    def _record(self, name: str, w: np.ndarray, *arrays: np.ndarray | None) -> None:
        self.quantized.append(name)
        self.float_bytes += w.nbytes
        self.quantized_bytes += sum(_stored_bytes(a) for a in arrays if a is not None)

    def _dequantize(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, k_axis: int) -> ir.Value:
        name = node.inputs[1].name or "w"
        w_nk = w.T if k_axis == 0 else w
        q, scale, zp = quantize_blocks(w_nk, self.bits, self.block_size, self.symmetric)
        storage = _TYPES[(self.bits, self.symmetric)]
        if k_axis == 0:
            q, scale, zp = q.T, scale.T, None if zp is None else zp.T
        inputs = [new_const(graph, q.astype(storage), f"{name}__q{self.bits}", node),
                  new_const(graph, scale, f"{name}__scale", node)]
        if zp is not None:
            inputs.append(new_const(graph, zp.astype(storage), f"{name}__zero_point", node))
        dq = ir.node("DequantizeLinear", inputs, {"axis": k_axis, "block_size": self.block_size},
                     name=f"{name}__dequantize")
        graph.insert_before(node, dq)
        out = dq.outputs[0]
        out.type, out.shape = ir.TensorType(ir.DataType.from_numpy(w.dtype)), ir.Shape(w.shape)
        self._record(name, w, q.astype(storage), scale, None if zp is None else zp.astype(storage))
        return out

    def _nbits_constants(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, k_axis: int) -> tuple[ir.Value, ...]:
        name = node.inputs[1].name or "w"
        w_nk = w.T if k_axis == 0 else w
        n, k = w_nk.shape
        q, scale, zp = quantize_blocks(w_nk, self.bits, self.block_size, self.symmetric)
        if zp is None:
            q = q + 2 ** (self.bits - 1)
        blocks = scale.shape[1]
        padded = np.zeros((n, blocks * self.block_size), np.int32)
        padded[:, :k] = q
        padded = padded.reshape(n, blocks, self.block_size)
        packed = pack_nibbles(padded) if self.bits == 4 else padded.astype(np.uint8)
        arrays = [packed, scale.reshape(-1)]
        if zp is not None:
            arrays.append((pack_nibbles(zp) if self.bits == 4 else zp.astype(np.uint8)).reshape(-1))
        suffixes = (f"__q{self.bits}", "__scale", "__zero_point")
        self._record(name, w, *arrays)
        return tuple(new_const(graph, a, name + s, node) for a, s in zip(arrays, suffixes))

    def _to_nbits(self, graph: ir.Graph, node: ir.Node, k: int, n: int, constants: tuple[ir.Value, ...]) -> None:
        attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size}
        mm = ir.node("MatMulNBits", [node.inputs[0], *constants], attrs, domain="com.microsoft",
                     name=f"{node.name or 'matmul'}__nbits")
        graph.insert_before(node, mm)
        out = mm.outputs[0]
        out.type = node.outputs[0].type
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            add = ir.node("Add", [out, c], name=f"{node.name or 'gemm'}__bias")
            graph.insert_before(node, add)
            out = add.outputs[0]
            out.type = node.outputs[0].type
        replace_value(node.outputs[0], out)
        graph.remove(node, safe=True)


def _stored_bytes(a: np.ndarray) -> int:
    """Bytes ``a`` takes in an ONNX file (4-bit types two to a byte)."""
    if a.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        return (a.size + 1) // 2
    return a.nbytes


def quantize_weights(model: ir.Model, *, bits: int, block_size: int = 32, target_runtime: str = "onnx",
                     symmetric: bool = True) -> ir.Model:
    """Quantize the model's MatMul/Gemm weights in place to ``bits`` (4 or 8), block-wise; returns it.

    Raises ``UnsupportedError`` when the model has no MatMul/Gemm with a constant weight to quantize.
    """
    p = QuantizeWeightsPass(bits, block_size, target_runtime, symmetric)
    result = p(model)
    if not p.quantized:
        raise UnsupportedError(
            f"weight-only int{bits}: the model has no MatMul/Gemm with a constant 2-D float weight of at "
            f"least {p.min_elements} elements to quantize")
    return result.model

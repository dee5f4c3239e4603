"""Lowering rules: DFT and STFT as one matrix product with a compile-time constant matrix.

Both are linear in their signal, so graphopt evaluates ONNX's reference definition on the unit basis
of the transformed dims (lengths, windows and frame steps must be constants) and lowers the op to a
reshape, a matmul with that matrix, and a reshape back.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.rules import OpRule

R = relax.op


MAX_BASIS = 4096  # the matrix form is for short transforms (n x n_out constants)


def _basis_response(ctx, op: str, core_shape, inputs: list, attrs: dict) -> np.ndarray:
    """The op's output on each unit vector of ``core_shape`` (batched on axis 0): (n, outputs...)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    n = int(np.prod(core_shape))
    if n > MAX_BASIS:
        ctx.unsupported(f"a transform of {n} values is longer than the matrix form allows ({MAX_BASIS})")
    opset = ctx.opset
    basis = np.eye(n, dtype=np.float64).reshape((n, *core_shape))
    names = ["x"] + [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    node = onnx.helper.make_node(op, names, ["y"], **attrs)
    inits = [onnx.numpy_helper.from_array(np.asarray(v), f"i{k}") for k, v in enumerate(inputs) if v is not None]
    graph = onnx.helper.make_graph(
        [node], "basis", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, None)],
        [onnx.helper.make_empty_tensor_value_info("y")], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": basis})[0])


def _static(ctx, x):
    shape = H.static_shape(x)
    if shape is None:
        ctx.unsupported("needs static input shapes")
    return list(shape)


def lower_dft(ctx, ins):
    x = ins[0]
    shape = _static(ctx, x)
    rank = len(shape)
    if ctx.opset >= 20:
        axis = int(ctx.require_const(2, "axis").reshape(-1)[0]) if ctx.has_input(2) else -2
    else:
        axis = ctx.attr("axis", 1)
    axis = axis % rank
    if axis == rank - 1:
        ctx.unsupported("the axis cannot be the last (complex) dim")
    length = ctx.require_const(1, "dft_length").reshape(()) if ctx.has_input(1) else None
    attrs = {"inverse": ctx.attr("inverse", 0), "onesided": ctx.attr("onesided", 0)}
    extra = [length]
    if ctx.opset >= 20:
        extra.append(np.array(1, np.int64))
    else:
        attrs["axis"] = 1
    core = [shape[axis], shape[-1]]
    resp = _basis_response(ctx, "DFT", core, extra, attrs)  # (n, L_out, c_out)
    out_len, out_c = resp.shape[1], resp.shape[2]
    weight = H.const(resp.reshape(resp.shape[0], -1).astype(H.numpy_dtype(H.dtype_of(x))))
    others = [a for a in range(rank - 1) if a != axis]
    perm = others + [axis, rank - 1]
    xt = ctx.emit(R.permute_dims(x, perm)) if perm != list(range(rank)) else x
    batch = [shape[a] for a in others]
    flat = ctx.emit(R.reshape(xt, [int(np.prod(batch, dtype=np.int64)), int(np.prod(core))]))
    y = ctx.emit(R.reshape(ctx.emit(R.matmul(flat, weight)), batch + [out_len, out_c]))
    inverse_perm = [perm.index(a) for a in range(rank)]
    return R.permute_dims(y, inverse_perm) if perm != list(range(rank)) else y


def lower_stft(ctx, ins):
    x = ins[0]
    shape = _static(ctx, x)  # [batch, length, 1 or 2]
    step = ctx.require_const(1, "frame_step")
    window = ctx.require_const(2, "window") if ctx.has_input(2) else None
    frame_length = ctx.require_const(3, "frame_length") if ctx.has_input(3) else None
    attrs = {"onesided": ctx.attr("onesided", 1)}
    core = shape[1:]
    resp = _basis_response(ctx, "STFT", core, [step, window, frame_length], attrs)  # (n, frames, bins, 2)
    weight = H.const(resp.reshape(resp.shape[0], -1).astype(H.numpy_dtype(H.dtype_of(x))))
    flat = ctx.emit(R.reshape(x, [shape[0], int(np.prod(core))]))
    return R.reshape(ctx.emit(R.matmul(flat, weight)), [shape[0], *resp.shape[1:]])


RULES = (
    OpRule("DFT", lower_dft, since=17, kind="decomposed"),
    OpRule("STFT", lower_stft, since=17, kind="decomposed"),
)

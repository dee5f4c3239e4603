"""Run a model through graphopt's lowering and TVM on the CPU: the harness of the lowering tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import tvm
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering.convert import Lowered, lower


def as_ir(model) -> ir.Model:
    """An onnx_ir.Model from an onnx_ir.Model, a ModelProto or a path."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(str(Path(model)))


def _to_tensor(arr: np.ndarray, dtype: str):
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return tvm.runtime.tensor(helpers.as_held(arr, dtype))


def _to_numpy(value) -> list[np.ndarray]:
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("Array", "Tuple"):
        return [o for v in value for o in _to_numpy(v)]
    return [value.numpy()]


def compile_lowered(lowered: Lowered, target="llvm"):
    """The VirtualMachine of a lowered model (weights are passed as arguments, not bound)."""
    ex = tvm.compile(lowered.mod, target=target)
    return relax.VirtualMachine(ex, tvm.cpu())


def run_lowered(model, inputs: Mapping[str, np.ndarray], target="llvm") -> dict[str, np.ndarray]:
    """Lower ``model``, compile it for ``target`` and run it on ``inputs``: {output name: array}."""
    lowered = lower(as_ir(model))
    vm = compile_lowered(lowered, target)
    args = []
    for name, _shape, dtype in lowered.inputs:
        if name not in inputs:
            raise KeyError(f"no value given for input '{name}'")
        args.append(_to_tensor(np.asarray(inputs[name]), dtype))
    args += [_to_tensor(arr, arr.dtype.name) for arr in lowered.params.values()]
    result = _to_numpy(vm["main"](*args))
    return {name: arr for (name, _s, _d), arr in zip(lowered.outputs, result)}

"""Deduplicate bit-identical initializers and constants.

Two constants are the same parameter when they have the same dtype, shape and bytes, whatever their
name or storage: an initializer, a ``Constant`` node with a ``value`` tensor, or a ``Constant`` with
``value_float``/``value_int``/``value_floats``/``value_ints`` (``value_float=1.0`` equals a 0-d float
tensor holding 1.0). Within each graph (subgraphs and functions each on their own), every group of
identical constants is reduced to one:

* the kept value is the first initializer of the group (an initializer is defined everywhere in its
  graph), else the earliest Constant node, so every user still comes after its definition;
* every other member's users are pointed at it, and the member (initializer or Constant node) goes.

Never merged: initializers that are also graph inputs (the user may override them), values that are
graph outputs (their names are the interface), string tensors, and tensors whose data cannot be read.

With ``tolerance`` > 0 (off by default: it changes the model's numbers), float tensors of the same
dtype and shape are also the same parameter when ``max|a - b| <= tolerance * max|a|`` (``a`` the kept
one): the first such tensor of a group stays and the later ones use it. ``shared`` lists every merge
``(kept, removed, max|a - b|, bytes saved)`` so the report can say what it cost.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import graphs_of, tensor_digest

_CONSTANT_DOMAINS = ("", "ai.onnx")


def _constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in _CONSTANT_DOMAINS:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except Exception:  # sparse_value, attribute references, ...
        return None


def _candidates(graph: ir.Graph | ir.Function) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Mergeable constants of ``graph``: initializers first, then Constant outputs in graph order."""
    values: list[ir.Value] = []
    if isinstance(graph, ir.Graph):
        values.extend(graph.initializers.values())
    values.extend(
        n.outputs[0] for n in graph if n.op_type == "Constant" and n.domain in _CONSTANT_DOMAINS
    )
    out = []
    for v in values:
        if v.is_graph_input() or v.is_graph_output():
            continue
        tensor = _constant_tensor(v)
        if tensor is None or tensor.dtype == ir.DataType.STRING:
            continue
        out.append((v, tensor))
    return out


def _key(tensor: ir.TensorProtocol) -> tuple | None:
    try:
        return (tensor.dtype, tuple(tensor.shape.numpy()), tensor.nbytes, tensor_digest(tensor))
    except Exception:  # external data that cannot be read
        return None


def _remove(graph: ir.Graph | ir.Function, value: ir.Value) -> None:
    if value.is_initializer() and isinstance(graph, ir.Graph):
        graph.initializers.pop(value.name)
    else:
        graph.remove(value.producer(), safe=True)


_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class _Near:
    """Float tensors kept so far, by (dtype, shape): finds one within the tolerance of a new tensor."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.kept: dict[tuple, list[tuple[ir.Value, np.ndarray, float]]] = {}

    def match(self, value: ir.Value, tensor: ir.TensorProtocol) -> tuple[ir.Value, float] | None:
        if self.tolerance <= 0 or tensor.dtype not in _FLOATS or tensor.size < 2:
            return None
        try:
            arr = np.asarray(tensor.numpy(), np.float64)
        except Exception:  # noqa: BLE001 - unreadable external data stays as it is
            return None
        group = self.kept.setdefault((tensor.dtype, arr.shape), [])
        for canonical, ref, bound in group:
            diff = float(np.max(np.abs(arr - ref)))
            if diff <= bound:
                return canonical, diff
        group.append((value, arr, self.tolerance * float(np.max(np.abs(arr)))))
        return None


class ParameterSharingPass(ir.passes.InPlacePass):
    """Deduplicate bit-identical initializers and constants (and, with ``tolerance``, near-identical ones)."""

    def __init__(self, tolerance: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.tolerance = tolerance
        self.merged = 0  # constants removed by the last run
        self.shared: list[tuple[str, str, float, int]] = []  # merges within the tolerance

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.merged, self.shared = 0, []
        for graph in list(graphs_of(model)):
            kept: dict[tuple, tuple[ir.Value, ir.TensorProtocol]] = {}
            near = _Near(self.tolerance)
            for value, tensor in _candidates(graph):
                key = _key(tensor)
                if key is None:
                    continue
                if key not in kept:
                    found = near.match(value, tensor)
                    if found is None:
                        kept[key] = (value, tensor)
                        continue
                    canonical, diff = found
                    self.shared.append((canonical.name, value.name, diff, tensor.nbytes))
                else:
                    canonical, canonical_tensor = kept[key]
                    if tensor.tobytes() != canonical_tensor.tobytes():  # a hash collision: keep both
                        continue
                value.replace_all_uses_with(canonical)
                _remove(graph, value)
                self.merged += 1
        return ir.passes.PassResult(model, self.merged > 0)

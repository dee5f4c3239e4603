"""Store weights in the dtype the graph computes in, where that is exact.

A constant (initializer or Constant node) whose every use is a ``Cast`` to one dtype is only ever
seen by the model in that dtype. Storing it already cast and dropping the Casts computes the same
numbers, because the stored tensor is exactly what Cast would produce:

* ``float64 -> float32``: fp64 weights in a model that computes in fp32 (both numpy and ONNX
  Runtime round to nearest);
* ``float16 -> float32`` and ``bfloat16 -> float32``: every fp16/bf16 value is exact in fp32.

Conversions are listed in ``CONVERSIONS``; no other pair is made (float64 -> float16 could round
twice in a runtime, narrowing fp32 storage is the quantizer's business). A model that truly computes
in fp64 or fp16 (the constant is used by something other than a Cast, or the Casts disagree) is left
untouched, as are initializers that are graph inputs (overridable) or graph outputs, and Casts whose
output is a graph output.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.rewrite_utils import graphs_of, replace_value

D = ir.DataType
CONVERSIONS: frozenset[tuple[ir.DataType, ir.DataType]] = frozenset(
    {(D.DOUBLE, D.FLOAT), (D.FLOAT16, D.FLOAT), (D.BFLOAT16, D.FLOAT)}
)


def _constants(graph: ir.Graph | ir.Function):
    """(value, tensor, Constant node or None) for the initializers and Constant nodes of ``graph``."""
    if isinstance(graph, ir.Graph):
        for v in graph.initializers.values():
            if v.const_value is not None:
                yield v, v.const_value, None
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            yield node.outputs[0], node.attributes["value"].as_tensor(), node


def _cast_target(value: ir.Value) -> ir.DataType | None:
    """The one dtype all users cast ``value`` to, or None if some user is not such a Cast."""
    targets = set()
    for user, _ in value.uses():
        if user.op_type != "Cast" or user.domain not in ("", "ai.onnx") or user.outputs[0].is_graph_output():
            return None
        targets.add(user.attributes.get_int("to", 0))
    return D(targets.pop()) if len(targets) == 1 else None


class CanonicalDtypesPass(ir.passes.InPlacePass):
    """Store fp64/fp16 weights in the compute dtype where exact."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[str] = []  # names of the constants converted by the last run

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.converted = []
        for graph in list(graphs_of(model)):
            for value, tensor, constant_node in list(_constants(graph)):
                if value.is_graph_input() or value.is_graph_output() or not value.uses():
                    continue
                target = _cast_target(value)
                if target is None or (tensor.dtype, target) not in CONVERSIONS:
                    continue
                try:
                    array = tensor.numpy().astype(target.numpy())
                except Exception:  # data that cannot be read (missing external file)
                    continue
                new = ir.tensor(array, name=value.name)
                if constant_node is None:
                    value.const_value = new
                else:
                    constant_node.attributes.clear()
                    constant_node.attributes["value"] = ir.AttrTensor("value", new)
                    value.const_value = new
                value.type = ir.TensorType(target)
                for cast in {user for user, _ in value.uses()}:
                    replace_value(cast.outputs[0], value)
                    cast.graph.remove(cast, safe=True)
                self.converted.append(value.name or "")
        return ir.passes.PassResult(model, bool(self.converted))

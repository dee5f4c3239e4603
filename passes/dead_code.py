"""Dead code elimination: nodes, initializers, functions and opset imports nothing depends on.

Built on onnx_ir's passes (unused nodes with main-graph initializers, unused functions, unused opset
imports), plus the initializers of subgraphs, which those leave behind. What counts as used: graph
outputs (of the main graph and of every subgraph), values a subgraph captures from an outer scope
(they are uses in onnx_ir), calls to model functions. Graph inputs are never removed, even unused.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass


def _remove_subgraph_initializers(model: ir.Model) -> int:
    removed = 0
    for graph in model.graph.subgraphs():
        keep = set(graph.outputs) | set(graph.inputs)
        for name, value in list(graph.initializers.items()):
            if not value.uses() and value not in keep:
                del graph.initializers[name]
                removed += 1
    return removed


def _output_count(model: ir.Model) -> int:
    return sum(len(n.outputs) for n in ir.traversal.RecursiveGraphIterator(model.graph))


class DeadCodeEliminationPass(ir.passes.InPlacePass):
    """Remove nodes, initializers, functions and opset imports that no graph output depends on."""

    def __init__(self, *, opsets: bool = True):
        super().__init__()
        self.opsets = opsets

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = _output_count(model)  # unused optional outputs are trimmed too
        modified = RemoveUnusedNodesPass()(model).modified or _output_count(model) != outputs
        modified |= _remove_subgraph_initializers(model) > 0
        modified |= RemoveUnusedFunctionsPass()(model).modified
        if self.opsets:
            modified |= RemoveUnusedOpsetsPass()(model).modified
        return ir.passes.PassResult(model, modified=modified)

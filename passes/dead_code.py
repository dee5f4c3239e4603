"""Dead code elimination: nodes, initializers, functions and opset imports nothing depends on.

Built on onnx_ir's passes (unused nodes with main-graph initializers, unused functions, unused opset
imports), plus the initializers of subgraphs, which those leave behind. What counts as used: graph
outputs (of the main graph and of every subgraph), values a subgraph captures from an outer scope
(they are uses in onnx_ir), calls to model functions. Graph inputs are never removed, even unused.
Uses by the nodes of a subgraph no longer in the model (the branches of an inlined or removed If)
do not count.
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


def _detach_orphan_uses(model: ir.Model) -> int:
    """Drop uses by nodes of subgraphs that are no longer part of the model.

    When a pass removes or inlines an If, the branch it dropped still holds its nodes, and those
    still count as users of the outer values they captured; such a value would never look dead.
    """
    live = {model.graph, *model.graph.subgraphs()}
    detached = 0
    for graph in live:
        values = [*graph.inputs, *graph.initializers.values(), *(v for n in graph for v in n.outputs)]
        for value in values:
            for user, index in list(value.uses()):
                if user.graph is not None and user.graph not in live:
                    user.replace_input_with(index, None)
                    detached += 1
    return detached


def _output_count(model: ir.Model) -> int:
    return sum(len(n.outputs) for n in ir.traversal.RecursiveGraphIterator(model.graph))


class DeadCodeEliminationPass(ir.passes.InPlacePass):
    """Remove nodes, initializers, functions and opset imports that no graph output depends on."""

    def __init__(self, *, opsets: bool = True):
        super().__init__()
        self.opsets = opsets

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = _output_count(model)  # unused optional outputs are trimmed too
        _detach_orphan_uses(model)  # not a change to the model: those users are not in it
        modified = RemoveUnusedNodesPass()(model).modified or _output_count(model) != outputs
        modified |= _remove_subgraph_initializers(model) > 0
        modified |= RemoveUnusedFunctionsPass()(model).modified
        if self.opsets:
            modified |= RemoveUnusedOpsetsPass()(model).modified
        return ir.passes.PassResult(model, modified=modified)

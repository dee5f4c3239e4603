"""An example graphopt plugin: one pass, registered through the ``graphopt.passes`` entry point.

Install it (``pip install .``) and ``graphopt passes`` lists ``example_rename``;
``graphopt optimize model.onnx --passes example_rename -o out.onnx`` runs it.
"""

from __future__ import annotations

import onnx_ir as ir


class RenamePass(ir.passes.InPlacePass):
    """Name every node ``<prefix><op_type>_<index>`` in graph order (subgraphs included)."""

    def __init__(self, prefix: str = "n_") -> None:
        super().__init__()
        self.prefix = prefix

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
            name = f"{self.prefix}{node.op_type}_{i}"
            if node.name != name:
                node.name = name
                modified = True
        return ir.passes.PassResult(model, modified=modified)

"""Freeze weights: initializers that are also graph inputs become plain constants.

Models exported with IR version < 4 (the onnx "light" models, many opset-9 exports) list every
initializer as a graph input too, which means "a default the caller may override". Every pass must
then treat those weights as unknown, so nothing folds, fuses or shares. At -O2 graphopt compiles a
model for deployment, where weights are fixed: this pass removes them from the inputs (and raises
the IR version to 4, the first that allows initializers that are not inputs).

Does not fire when no initializer is a graph input.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

_MIN_IR_VERSION = 4


class FreezeInitializersPass(ir.passes.InPlacePass):
    """Turn initializers that are also graph inputs into constants (fixed weights)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = RemoveInitializersFromInputsPass()(model)
        if result.modified and model.ir_version < _MIN_IR_VERSION:
            model.ir_version = _MIN_IR_VERSION
        return ir.passes.PassResult(model, modified=result.modified)

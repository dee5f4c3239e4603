"""Lowering: ONNX graphs (onnx_ir) to Relax IRModules through the (op, opset) table."""

from graphopt.backends.lowering.context import LowerContext
from graphopt.backends.lowering.convert import Lowered, check_supported, coverage, lower

__all__ = ["LowerContext", "Lowered", "check_supported", "coverage", "lower"]

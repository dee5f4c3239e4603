"""LowerContext: what one lowering function sees of the node it lowers.

The context is built by :mod:`graphopt.backends.lowering.convert` for each node. It reads attributes
with Python types, constant inputs as numpy arrays, static shapes and dtypes, and emits Relax bindings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import onnx_ir as ir
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.core.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from graphopt.backends.lowering.convert import _Lowerer


def attr_value(attr: ir.Attr) -> Any:
    """An ONNX attribute as a Python value (int, float, str, list, np.ndarray, onnx_ir.Graph)."""
    t = attr.type
    v = attr.value
    if t == ir.AttributeType.TENSOR:
        return v.numpy()
    if t == ir.AttributeType.TENSORS:
        return [x.numpy() for x in v]
    if t in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(v)
    if t == ir.AttributeType.GRAPHS:
        return list(v)
    if t == ir.AttributeType.STRING and isinstance(v, bytes):
        return v.decode()
    return v


class ConstantInputRequired(UnsupportedError):
    """An input that sets a shape/axis/count (Reshape's shape, Slice's starts...) is computed at run time."""

    def __init__(self, message: str, value_name: str):
        super().__init__(message)
        self.value_name = value_name


class LowerContext:
    """The node being lowered, its attributes, constant inputs, shapes, and the BlockBuilder."""

    def __init__(self, lowerer: _Lowerer, node: ir.Node, opset: int, inputs: Sequence[relax.Expr | None]):
        self._lowerer = lowerer
        self.bb: relax.BlockBuilder = lowerer.bb
        self.node = node
        self.opset = opset
        self.name = node.name or f"{node.op_type}_{lowerer.next_id()}"
        self._inputs = list(inputs)

    # ------------------------------------------------------------ attributes and inputs
    @property
    def op(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default: Any = None) -> Any:
        a = self.node.attributes.get(name)
        if a is None or a.is_ref():
            return default
        return attr_value(a)

    def has_input(self, i: int) -> bool:
        ins = self.node.inputs
        return i < len(ins) and ins[i] is not None

    @property
    def num_inputs(self) -> int:
        return len(self.node.inputs)

    def const(self, i: int) -> np.ndarray | None:
        """Input i's value when it is constant (initializer, Constant node, or folded upstream)."""
        if not self.has_input(i):
            return None
        return self._lowerer.const_of(self.node.inputs[i])

    def const_ints(self, i: int) -> list[int] | None:
        """A constant integer input as a list of ints (shapes, axes, pads...), or None."""
        v = self.const(i)
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]

    def require_const(self, i: int, what: str) -> np.ndarray:
        """Input i's constant value, or UnsupportedError naming ``what`` when it is computed at run time."""
        v = self.const(i)
        if v is None:
            name = self.node.inputs[i].name if self.has_input(i) else f"#{i}"
            raise ConstantInputRequired(
                f"node '{self.name}' ({self.op}): input '{name}' ({what}) must be a constant "
                "(it is computed at run time)", name)
        return v

    # ------------------------------------------------------------ shapes and dtypes
    def shape(self, i: int) -> tuple[int | None, ...] | None:
        """Input i's shape (None per symbolic dim), from the Relax expression, else the IR."""
        if i < len(self._inputs) and self._inputs[i] is not None:
            return helpers.shape_of(self._inputs[i])
        if not self.has_input(i):
            return None
        return _ir_shape(self.node.inputs[i])

    def dtype(self, i: int) -> str | None:
        if i < len(self._inputs) and self._inputs[i] is not None:
            return helpers.dtype_of(self._inputs[i])
        if not self.has_input(i):
            return None
        return helpers.relax_dtype(self.node.inputs[i].dtype)

    def rank(self, i: int) -> int | None:
        s = self.shape(i)
        return None if s is None else len(s)

    def out_shape(self, j: int = 0) -> tuple[int | None, ...] | None:
        return _ir_shape(self.node.outputs[j])

    def out_dtype(self, j: int = 0) -> str | None:
        return helpers.relax_dtype(self.node.outputs[j].dtype)

    @property
    def num_outputs(self) -> int:
        return len(self.node.outputs)

    def output_used(self, j: int) -> bool:
        outs = self.node.outputs
        return j < len(outs) and bool(outs[j].name)

    # ------------------------------------------------------------ emitting
    def emit(self, expr: relax.Expr, hint: str | None = None) -> relax.Var:
        """``bb.emit`` with a readable name derived from the node."""
        return self.bb.emit(expr, name_hint=helpers.safe_name(hint or self.name, self.op.lower()))

    def lower_graph(self, graph: ir.Graph, inputs: Sequence[relax.Expr]) -> list[relax.Expr]:
        """Lower a subgraph (If/Loop/Scan body) into the current block, outer scope visible."""
        return self._lowerer.lower_subgraph(graph, list(inputs))

    def lower_branch(self, graph: ir.Graph, inputs: Sequence[relax.Expr] = ()) -> relax.SeqExpr:
        """A subgraph as a Relax SeqExpr of its own (for relax.If branches); one output or a tuple."""
        self.bb._begin_binding_block()
        outs = self.lower_graph(graph, inputs)
        result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
        result = self.bb.emit(result) if not isinstance(result, relax.Var) else result
        block = self.bb._end_block()
        return relax.SeqExpr([block], result)

    def unsupported(self, reason: str) -> NoReturn:
        raise UnsupportedError(f"node '{self.name}' ({self.op}): {reason}")

    def check(self, cond: bool, reason: str | Callable[[], str]) -> None:
        """``unsupported(reason)`` unless cond holds."""
        if not cond:
            self.unsupported(reason() if callable(reason) else reason)


def _ir_shape(value: ir.Value) -> tuple[int | None, ...] | None:
    shape = value.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)

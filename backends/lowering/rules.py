"""The shape of the op table: one OpRule per (domain, op, opset range).

A lowering function takes a :class:`~graphopt.backends.lowering.context.LowerContext` (the node,
its attributes with ONNX defaults, constant inputs, the BlockBuilder) and the Relax expressions of
the node's inputs (``None`` for an omitted optional input), and returns one Relax expression per
node output (a single expression for single-output ops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

LowerFn = Callable[[Any, Sequence[Any]], Any]


@dataclasses.dataclass(frozen=True)
class OpRule:
    op: str
    fn: LowerFn
    since: int = 1  # first opset version of the op this rule implements
    until: int | None = None  # last one (inclusive); None: up to the newest
    domain: str = ""
    kind: str = "native"  # "native": one Relax op; "decomposed": several ops or a TE/TIR function

    def covers(self, domain: str, op: str, opset: int) -> bool:
        return (
            self.op == op
            and self.domain == domain
            and self.since <= opset
            and (self.until is None or opset <= self.until)
        )

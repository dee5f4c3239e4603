"""Instruments: hooks that run before and after every pass (timing, verifying, dumping, stats).

An instrument is any object with ``before_pass(name, model)`` and ``after_pass(name, model, modified)``.
They observe; only :class:`VerifyInstrument` (and a differential check) may stop the pipeline, by raising
a :class:`~graphopt.core.errors.PassError` that names the pass.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Protocol

import onnx_ir as ir

from graphopt.core.errors import PassError, VerificationError


class Instrument(Protocol):
    def before_pass(self, name: str, model: ir.Model) -> None: ...

    def after_pass(self, name: str, model: ir.Model, modified: bool) -> None: ...


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph and every subgraph."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def parameter_stats(model: ir.Model) -> tuple[int, int]:
    """(number of parameters, bytes) over initializers and Constant nodes, subgraphs included."""
    count = nbytes = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for v in graph.initializers.values():
            t = v.const_value
            if t is None:
                continue
            count += t.size
            nbytes += t.nbytes
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                count += attr.value.size
                nbytes += attr.value.nbytes
    return count, nbytes


@dataclasses.dataclass
class PassRecord:
    """One row of the pass report."""

    name: str
    seconds: float
    modified: bool
    nodes: int
    parameter_bytes: int


class StatsInstrument:
    """Times each pass and records node count and parameter bytes after it (the report's rows)."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self._start = 0.0
        count, nbytes = 0, 0
        self.initial: tuple[int, int] | None = None

    def before_pass(self, name: str, model: ir.Model) -> None:
        if self.initial is None:
            self.initial = (count_nodes(model), parameter_stats(model)[1])
        self._start = time.perf_counter()

    def after_pass(self, name: str, model: ir.Model, modified: bool) -> None:
        elapsed = time.perf_counter() - self._start
        self.records.append(
            PassRecord(name, elapsed, modified, count_nodes(model), parameter_stats(model)[1])
        )


class VerifyInstrument:
    """Runs graphopt's verifier after every pass; a failure names the pass and the broken node."""

    def __init__(self, check_types: bool = True) -> None:
        self.check_types = check_types

    def before_pass(self, name: str, model: ir.Model) -> None:
        pass

    def after_pass(self, name: str, model: ir.Model, modified: bool) -> None:
        from graphopt.core.verify import verify

        try:
            verify(model, check_types=self.check_types)
        except VerificationError as e:
            raise PassError(f"pass '{name}' left an invalid graph: {e}", pass_name=name) from None


class DumpInstrument:
    """Writes the model as ONNX text after every pass that modified it: ``NN_<pass>.txt``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._step = 0

    def before_pass(self, name: str, model: ir.Model) -> None:
        pass

    def after_pass(self, name: str, model: ir.Model, modified: bool) -> None:
        self._step += 1
        if modified:
            text = ir.to_onnx_text(model)  # weights are elided for large tensors
            (self.directory / f"{self._step:02d}_{name}.txt").write_text(text)

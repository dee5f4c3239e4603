"""PassRegistry: an explicit table of passes by name.

Three sources, never import side effects:
* graphopt's built-in passes, listed once in ``graphopt.passes.BUILTIN_PASSES`` (imported lazily);
* passes from other installed packages, through the ``graphopt.passes`` entry-point group
  (the entry point loads a ``PassBase`` subclass or a factory taking the pass options as keywords);
* passes a user registers from Python with :meth:`PassRegistry.register`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator

import onnx_ir as ir

from graphopt.core.errors import PassError, UsageError

ENTRY_POINT_GROUP = "graphopt.passes"

PassFactory = Callable[..., ir.passes.PassBase]


@dataclasses.dataclass
class PassInfo:
    name: str
    description: str
    source: str  # "builtin", "plugin:<distribution>", "user"
    _loader: Callable[[], PassFactory]

    def factory(self) -> PassFactory:
        return self._loader()


def _doc_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


class PassRegistry:
    """Name → pass. ``graphopt.passes.default_registry()`` holds the built-ins and installed plugins.

    The pass manager is part of the floor and knows no pass: the built-in table is handed to
    :meth:`add_builtins` by the passes package, so imports run one way (passes -> pipeline)."""

    def __init__(self) -> None:
        self._passes: dict[str, PassInfo] = {}

    def add_builtins(self, table: dict[str, tuple[str, str, str]]) -> None:
        """Add passes from a table name -> (module, class, description); modules load on first use."""
        for name, (module, attr, description) in table.items():

            def loader(module=module, attr=attr):
                return getattr(importlib.import_module(module), attr)

            self._passes[name] = PassInfo(name, description, "builtin", loader)

    def add_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            self._passes[ep.name] = PassInfo(
                ep.name, f"(from {dist}) {ep.value}", f"plugin:{dist}", ep.load
            )

    def register(
        self,
        name: str,
        factory: PassFactory,
        *,
        description: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register a pass class (or a factory returning a ``PassBase``) under ``name``."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"pass name {name!r}: use letters, digits, '_' or '-'")
        if name in self._passes and not replace:
            raise UsageError(f"pass '{name}' is already registered (pass replace=True to override)")
        if not callable(factory):
            raise UsageError(f"pass '{name}': factory must be a PassBase subclass or a callable")
        self._passes[name] = PassInfo(
            name, description or _doc_line(factory), "user", lambda: factory
        )

    def __contains__(self, name: str) -> bool:
        return name in self._passes

    def __iter__(self) -> Iterator[PassInfo]:
        return iter(sorted(self._passes.values(), key=lambda p: p.name))

    def names(self) -> list[str]:
        return sorted(self._passes)

    def info(self, name: str) -> PassInfo:
        try:
            return self._passes[name]
        except KeyError:
            raise UsageError(
                f"unknown pass '{name}' (known: {', '.join(self.names())})"
            ) from None

    def create(self, name: str, options: dict | None = None) -> ir.passes.PassBase:
        info = self.info(name)
        try:
            factory = info.factory()
            instance = factory(**(options or {}))
        except TypeError as e:
            raise UsageError(f"pass '{name}': bad options {options}: {e}") from None
        except Exception as e:
            raise PassError(f"pass '{name}' could not be created: {e}", pass_name=name) from e
        if not isinstance(instance, ir.passes.PassBase):
            raise PassError(
                f"pass '{name}' ({info.source}) is not an onnx_ir.passes.PassBase", pass_name=name
            )
        return instance

"""PassContext: the settings one pipeline run is made under (after TVM's PassContext)."""

from __future__ import annotations

import dataclasses
import os

from graphopt.core.errors import UsageError

MAX_OPT_LEVEL = 3


def _verify_default() -> bool:
    # The test suite sets this (tests/conftest.py) so the verifier runs after every pass.
    return os.environ.get("GRAPHOPT_VERIFY_EACH_PASS", "") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Which passes run, and what watches them.

    * ``opt_level``: 0 (lossless round trip) .. 3 (aggressive fusion). A pipeline step runs when its
      level is <= ``opt_level``, when it is ``forced``, and never when it is ``disabled``.
    * ``instruments``: objects with ``before_pass``/``after_pass``, called around every pass.
    * ``verify``: add the verifier after every pass (on by default in the test suite).
    * ``max_fixpoint_iterations``: bound on every fixpoint group.
    * ``options``: per-pass options, ``{"constant_folding": {"max_output_bytes": ...}}``.
    """

    opt_level: int = 2
    disabled: frozenset[str] = frozenset()
    forced: frozenset[str] = frozenset()
    instruments: tuple = ()
    verify: bool = dataclasses.field(default_factory=_verify_default)
    max_fixpoint_iterations: int = 8
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            raise UsageError(f"opt level must be 0..{MAX_OPT_LEVEL}, got {self.opt_level}")
        if self.max_fixpoint_iterations < 1:
            raise UsageError("max_fixpoint_iterations must be >= 1")
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        object.__setattr__(self, "forced", frozenset(self.forced))
        object.__setattr__(self, "instruments", tuple(self.instruments))

    def enabled(self, name: str, level: int) -> bool:
        if name in self.disabled:
            return False
        return level <= self.opt_level or name in self.forced

    def pass_options(self, name: str) -> dict:
        return dict(self.options.get(name, {}))

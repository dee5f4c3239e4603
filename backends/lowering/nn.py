"""Lowering rules: nn."""

from __future__ import annotations

RULES: tuple = ()

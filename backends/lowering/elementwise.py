"""Lowering rules: elementwise."""

from __future__ import annotations

RULES: tuple = ()

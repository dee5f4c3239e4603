"""Lowering rules: control."""

from __future__ import annotations

RULES: tuple = ()

"""Lowering rules: graphopt_ops."""

from __future__ import annotations

RULES: tuple = ()

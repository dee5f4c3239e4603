"""Lowering rules: tensor."""

from __future__ import annotations

RULES: tuple = ()

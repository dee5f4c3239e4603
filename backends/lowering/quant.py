"""Lowering rules: quant."""

from __future__ import annotations

RULES: tuple = ()

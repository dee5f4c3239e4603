"""Lowering rules: rnn."""

from __future__ import annotations

RULES: tuple = ()

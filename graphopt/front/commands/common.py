"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_opt_level(p: argparse.ArgumentParser, default: int = 2) -> None:
    g = p.add_mutually_exclusive_group()
    for lvl in range(4):
        g.add_argument(f"-O{lvl}", dest="opt_level", action="store_const", const=lvl,
                       help=f"optimization level {lvl}" + (" (default)" if lvl == default else ""))
    p.set_defaults(opt_level=default)


def add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="fix an input's shape (repeatable), e.g. x:1,3,224,224")


def split_names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

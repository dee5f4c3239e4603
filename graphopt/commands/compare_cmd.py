from __future__ import annotations

import argparse

from graphopt.errors import UnsupportedError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise UnsupportedError("'graphopt compare' is not implemented yet")

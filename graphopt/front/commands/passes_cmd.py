from __future__ import annotations

import argparse

from graphopt.front import api
from graphopt.front.commands.common import print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    rows = api.list_passes()
    if args.json:
        print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['source']:<8}  {r['description']}")
    return 0

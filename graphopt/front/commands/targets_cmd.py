"""``graphopt targets``: the target presets, what each assumes, and whether its code runs on this host."""

from __future__ import annotations

import argparse
import json

from graphopt.front.commands.common import print_json, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from graphopt.front import api

    rows = api.targets()
    if args.json:
        print_json(rows)
        return 0
    print(table([[r["name"], r["runs_here"], r["assumes"]] for r in rows], ["preset", "runs here", "assumes"]))
    print()
    for r in rows:
        print(f"{r['name']}: {json.dumps(r['target'])}")
    print("\nexperts: --target takes a TVM target as 'llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a55 "
          "-mattr=+neon,+dotprod' or as JSON, e.g. '{\"preset\": \"aarch64\", \"mcpu\": \"cortex-a53\"}'")
    return 0

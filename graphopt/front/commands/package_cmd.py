"""``graphopt package BUNDLE -o model.tar.gz``: one file to copy to a device (see docs/bundles.md)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory written by 'graphopt compile'")
    p.add_argument("-o", "--output", required=True, help="NAME.tar.gz to write (replaces only a graphopt package)")
    p.add_argument("--expect-digest", metavar="sha256:HEX", help="refuse the bundle unless its digest is this one")


def run(args: argparse.Namespace) -> int:
    from graphopt.front import api

    info = api.package(args.bundle, args.output, digest=args.expect_digest)
    print(f"{args.bundle} -> {info['path']} ({info['bytes'] / 1e6:.1f} MB, target {info['target']}): "
          f"{', '.join(info['files'])} under {info['top']}/")
    print(f"on the device: tar xzf {info['path']} && python3 {info['top']}/loader.py {info['top']} "
          f"--inputs in.npz -o out.npz --expect-digest {info['digest']}")
    return 0

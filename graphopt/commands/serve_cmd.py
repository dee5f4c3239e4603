from __future__ import annotations

import argparse
from pathlib import Path

from graphopt.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories (graphopt compile -o)")
    p.add_argument("--name", action="append", default=[],
                   help="model name for each bundle, in order (default: the directory name)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="sha256:HEX",
                   help="each bundle's digest (printed by compile), in order: refuse a bundle that differs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one); anything else is a usage error."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0..65535)")
    return port


def run(args: argparse.Namespace) -> int:
    from graphopt import api
    from graphopt.serve import ModelEndpoint, make_server

    if args.name and len(args.name) != len(args.bundles):
        raise UsageError(f"--name given {len(args.name)} times for {len(args.bundles)} bundles")
    names = args.name or [Path(b).resolve().name for b in args.bundles]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must be unique, got {names} (use --name)")
    if args.expect_digest and len(args.expect_digest) != len(args.bundles):
        raise UsageError(f"--expect-digest given {len(args.expect_digest)} times for {len(args.bundles)} bundles")
    digests = args.expect_digest or [None] * len(args.bundles)
    models = {n: ModelEndpoint(n, api.load_bundle(b, digest=d)) for n, b, d in zip(names, args.bundles, digests)}
    try:
        server = make_server(models, args.host, args.port)
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen: {e.strerror}") from None
    host, port = server.server_address[:2]
    print(f"serving {', '.join(models)} on http://{host}:{port}/v2 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

"""``graphopt serve BUNDLE_OR_MODEL...``: the Open Inference Protocol over HTTP (and gRPC) on loopback.

Bundles are served as they are; ONNX models (files or bundled names such as ``light:squeezenet``)
are compiled at start-up into the compile cache (the second start loads it). See docs/serving.md."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from graphopt.front.commands.common import add_input_shape, add_opt_level
from graphopt.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", nargs="+", metavar="BUNDLE_OR_MODEL",
                   help="bundle directories (graphopt compile -o), .onnx files or bundled model names")
    p.add_argument("--name", action="append", default=[],
                   help="model name for each one, in order (default: the directory or file name)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="sha256:HEX",
                   help="each bundle's digest (printed by compile), in order: refuse a bundle that differs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=port_number, default=None, help="also serve gRPC on this port (0: a free one)")
    p.add_argument("--max-batch", type=positive("--max-batch"), default=0, metavar="B",
                   help="dynamic batching: stack requests up to B rows on axis 0 (ONNX models are compiled for "
                        "B and the powers of two below it)")
    p.add_argument("--batch-timeout-ms", type=nonnegative("--batch-timeout-ms"), default=2.0, metavar="T",
                   help="with --max-batch: wait at most T ms for more requests after the first (default 2)")
    p.add_argument("--max-body-mb", type=positive("--max-body-mb", float), default=64.0, metavar="N",
                   help="largest request body accepted, in MB (default 64); larger ones get 413")
    p.add_argument("--api-key", default=os.environ.get("GRAPHOPT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' except on /v2/health (default: $GRAPHOPT_API_KEY)")
    p.add_argument("--request-timeout-s", type=positive("--request-timeout-s", float), default=60.0,
                   help="longest wait for a model's answer, queue included (default 60; then 503)")
    p.add_argument("--threads", type=positive("--threads"), default=None, metavar="N",
                   help="threads each model call uses (default: $TVM_NUM_THREADS, else every physical core); "
                        "fewer than the cores leaves room for the server on a busy host")
    p.add_argument("--target", default="x86", help="compile target for ONNX models (default x86)")
    add_opt_level(p)
    add_input_shape(p)
    p.add_argument("--cache-dir", help="compile cache for ONNX models (default $GRAPHOPT_CACHE_DIR or ~/.cache/graphopt/front/serve)")


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one); anything else is a usage error."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0..65535)")
    return port


def positive(option: str, kind=int, allow_zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} {text!r} is not a number") from None
        if value < 0 or (value == 0 and not allow_zero) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{option} must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value

    return parse


def nonnegative(option: str):
    return positive(option, float, allow_zero=True)


def _names(args) -> list[str]:
    if args.name and len(args.name) != len(args.bundles):
        raise UsageError(f"--name given {len(args.name)} times for {len(args.bundles)} bundles")
    names = args.name or [Path(b).resolve().name if Path(b).is_dir() else Path(b.split(":")[-1]).stem
                          for b in args.bundles]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must be unique, got {names} (use --name)")
    if args.expect_digest and len(args.expect_digest) != len(args.bundles):
        raise UsageError(f"--expect-digest given {len(args.expect_digest)} times for {len(args.bundles)} bundles")
    return names


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    from graphopt.front import api
    from graphopt.front.serve import require_extra

    names = _names(args)
    digests = args.expect_digest or [None] * len(args.bundles)
    require_extra()
    if args.threads:  # read by TVM when its thread pool starts, at the first model call
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from graphopt.front.serve.cache import compiled_buckets, compiled_bundle
    from graphopt.front.serve.metrics import Metrics
    from graphopt.front.serve.model import ServedModel
    from graphopt.front.serve.repository import Repository
    from graphopt.front.serve.server import Server

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    metrics, models = Metrics(), []
    for name, source, digest in zip(names, args.bundles, digests):
        buckets = None
        if Path(source).is_dir():
            module = api.load_bundle(source, digest=digest)
        elif digest is not None:
            raise UsageError(f"--expect-digest pins bundles; {source} is not a bundle directory")
        else:
            kw = {"target": args.target, "opt_level": args.opt_level, "input_shapes": args.input_shape,
                  "cache_dir": args.cache_dir, "log": log}
            if args.max_batch:
                buckets = compiled_buckets(source, max_batch=args.max_batch, **kw)
                module = buckets[args.max_batch]
            else:
                module = compiled_bundle(source, **kw)
        models.append(ServedModel(name, module, max_batch=args.max_batch, buckets=buckets,
                                  batch_timeout_s=args.batch_timeout_ms / 1000, metrics=metrics))
    repo = Repository(models, metrics=metrics, api_key=args.api_key, request_timeout_s=args.request_timeout_s)
    try:
        server = Server(repo, host=args.host, port=args.port, grpc_port=args.grpc_port,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)))
    except BaseException:
        repo.close()
        raise
    if not _is_loopback(args.host) and not args.api_key:
        log(f"graphopt serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it")
    grpc = f" and grpc {args.host}:{server.grpc_port}" if server.grpc_port is not None else ""
    print(f"serving {', '.join(repo.models)} on {server.url}/v2{grpc} (Ctrl-C or SIGTERM stops)", flush=True)
    server.run()
    return 0

"""``graphopt loadtest URL --model NAME``: throughput and latency percentiles of a running server
(loopback only; bounded in clients, time and requests)."""

from __future__ import annotations

import argparse
import os

from graphopt.front.commands.common import print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (loopback addresses only)")
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--concurrency", type=int, default=1, help="clients sending back to back (1..256, default 1)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (at most 600, default 10)")
    p.add_argument("--requests", type=int, default=1_000_000, help="stop after this many requests (default 1e6)")
    p.add_argument("--batch", type=int, default=1, help="rows per request for a model with a -1 batch dim (default 1)")
    p.add_argument("--api-key", default=os.environ.get("GRAPHOPT_API_KEY"), help="bearer token (default $GRAPHOPT_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from graphopt.front.serve.loadtest import run_load

    r = run_load(args.url, args.model, concurrency=args.concurrency, duration_s=args.duration,
                 max_requests=args.requests, batch=args.batch, api_key=args.api_key)
    if args.json:
        print_json({"model": args.model, "concurrency": args.concurrency, "batch": args.batch, **r.report()})
        return 0
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "none"
    print(f"{args.model}: {args.concurrency} clients, {r.seconds:.1f} s, {r.requests} requests, {r.ok} ok, "
          f"errors {errors}")
    print(f"throughput {r.throughput:.1f} req/s  latency p50 {r.percentile_ms(50):.2f} ms  "
          f"p90 {r.percentile_ms(90):.2f} ms  p99 {r.percentile_ms(99):.2f} ms")
    return 0

from __future__ import annotations

import argparse

from graphopt.front import api
from graphopt.front.commands.common import add_input_shape, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".onnx file")
    add_input_shape(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--coverage", action="store_true",
                   help="list every op as supported / decomposed / unsupported for --target")
    p.add_argument("--target", default="x86", help="target for --coverage (x86, aarch64, cuda)")


def _fmt_shape(shape) -> str:
    return "?" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def run(args: argparse.Namespace) -> int:
    if args.coverage:  # an unknown --target is the user's to fix, before the model is read
        api.check_target(args.target)
    info = api.inspect(args.model, input_shapes=args.input_shape)
    if args.coverage:
        info["coverage"] = api.coverage(args.model, target=args.target, input_shapes=args.input_shape)
    if args.json:
        print_json(info)
        return 0
    print(f"model: {args.model}")
    print("opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for v in info[kind]:
            print(f"  {v['name']}: {v['dtype']} {_fmt_shape(v['shape'])}")
    print(f"nodes: {info['nodes']}")
    print(f"parameters: {info['parameters']:,} ({info['parameter_bytes']:,} bytes)")
    flops = info.get("flops")
    print(f"estimated FLOPs: {flops:,}" if flops is not None else "estimated FLOPs: unknown (dynamic shapes; use --input-shape)")
    if flops:
        for op, f in list(info["flops_by_op"].items())[:5]:
            print(f"  {op:<28} {f:>16,}  {100 * f / flops:5.1f}%")
    print("ops:")
    for op, n in sorted(info["op_histogram"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {op:<28} {n}")
    if args.coverage:
        print(f"coverage for {args.target}:")
        for row in info["coverage"]:
            print(f"  {row['op']:<28} {row['status']}" + (f"  ({row['reason']})" if row.get("reason") else ""))
    return 0

"""``graphopt generate BUNDLE_OR_MODEL --prompt-ids 1,2,3 --max-new-tokens N``: greedy decoding with a
KV-cache decoder; prints the tokens, time to first token and per-token latency (``--against ort``: the
same loop in ONNX Runtime, whether the tokens match and the latency ratio)."""

from __future__ import annotations

import argparse
import json
import os

from graphopt.core import io, outputs
from graphopt.core.errors import UsageError
from graphopt.front.commands.common import table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="BUNDLE_OR_MODEL",
                   help="bundle compiled with symbolic seq/past dims, or an ONNX decoder (file, or gen:gpt2)")
    p.add_argument("--prompt-ids", required=True, metavar="IDS", help="comma-separated prompt token ids, e.g. 464,3290")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--against", choices=["ort", "none"], default="none",
                   help="also run the same loop on the ONNX in ONNX Runtime (default none)")
    p.add_argument("--max", dest="max_dims", action="append", default=[], metavar="NAME=N",
                   help="bound of a symbolic dim when compiling a model here (default: a decode bundle, input_ids "
                        "fixed at one token, past bounded by the request; --max seq=N too: the prompt in one call)")
    p.add_argument("--target", default="x86", help="target preset when compiling a model here (default x86)")
    p.add_argument("--threads", type=int, default=None, help="threads for graphopt and ORT (default: TVM's default)")
    p.add_argument("--json", metavar="FILE", help="write the tokens and timings as JSON")


def run(args: argparse.Namespace) -> int:
    from graphopt.front import api
    from graphopt.front.commands.compile_cmd import parse_dim_bounds
    from graphopt.front.generate import parse_ids

    outputs.check_output_files({"--json": args.json}, protected=outputs.files_read_by([args.model]))
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    result = api.generate(args.model, parse_ids(args.prompt_ids), args.max_new_tokens,
                          against=None if args.against == "none" else args.against,
                          dim_bounds=parse_dim_bounds(args.max_dims) or None, target=args.target,
                          threads=args.threads)
    go, ort = result["graphopt"].summary(), result["ort"] and result["ort"].summary()
    if result["compile_s"] is not None:
        print(f"compiled {args.model} in {result['compile_s']:.1f} s")
    print("tokens: " + ",".join(map(str, go["tokens"])))
    rows = [["graphopt", *_times(go)]] + ([["onnxruntime", *_times(ort)]] if ort else [])
    print(table(rows, ["runtime", "TTFT ms", "token ms min", "token ms median", "tokens/s"]))
    out = {"model": args.model, "prompt_ids": parse_ids(args.prompt_ids), "graphopt": go, "ort": ort}
    if ort:
        same = go["tokens"] == ort["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(go["tokens"], ort["tokens"])) if a != b), None)
        ratio = (go["token_ms_median"] / ort["token_ms_median"]) if go["token_ms_median"] and ort["token_ms_median"] else None
        out.update(tokens_match=same, first_mismatch=first, ratio_token_median=ratio,
                   ratio_ttft=go["ttft_ms"] / ort["ttft_ms"])
        print(f"tokens match ONNX Runtime: {'yes' if same else f'no (first difference at new token {first})'}; "
              f"per-token latency ratio (median) {ratio:.2f}x, TTFT ratio {out['ratio_ttft']:.2f}x"
              if ratio is not None else f"tokens match ONNX Runtime: {'yes' if same else 'no'}")
    if args.json:
        io.atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


def _times(s: dict) -> list[str]:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return [f(s["ttft_ms"]), f(s["token_ms_min"]), f(s["token_ms_median"]), f(s["tokens_per_s"])]

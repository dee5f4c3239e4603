"""``graphopt evaluate MODEL --metric NAME``: score a model with real labels (rendered OCR text), a cosine
against a reference model, or a user's ``module:function``; ``--write-calibration FILE.npz --count N``
writes rendered calibration samples instead."""

from __future__ import annotations

import argparse

from graphopt.core import outputs
from graphopt.front.commands.common import add_input_shape, print_json
from graphopt.core.errors import UsageError

SHOWN_MISSES = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    from graphopt.compression.evaluate import METRICS

    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="an .onnx file or a model name such as rapidocr:rec (optional with --write-calibration)")
    p.add_argument("--metric", metavar="NAME",
                   help="; ".join(f"{k}: {v[2]}" for k, v in METRICS.items())
                   + "; MODULE:FUNCTION or FILE.py:FUNCTION: your function(run) -> score in [0, 1]")
    p.add_argument("--reference", metavar="ORIG.onnx",
                   help="the original model: cosine's reference; ocr-det scores against its boxes; "
                        "ocr-rec shows its score beside")
    p.add_argument("--samples", type=int, metavar="N", help="text lines, pages or inputs to evaluate on")
    add_input_shape(p)
    p.add_argument("--data", metavar="FILE.npz", help="cosine only: real inputs (one array per input, samples first)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rendered set (default 0)")
    p.add_argument("--json", action="store_true", help="print the score and every detail as JSON")
    p.add_argument("--write-calibration", metavar="FILE.npz",
                   help="write --count rendered samples of --metric's kind (ocr-rec lines, ocr-det pages), drawn "
                        "apart from the evaluation set, as calibration data")
    p.add_argument("--count", type=int, default=32, help="samples to write with --write-calibration (default 32)")


def run(args: argparse.Namespace) -> int:
    from graphopt.compression import evaluate

    if not args.metric:
        raise UsageError("--metric is required (ocr-rec, ocr-det, cosine or MODULE:FUNCTION)")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    protected = outputs.files_read_by([p for p in (args.model, args.reference, args.data) if p])
    if args.write_calibration:
        outputs.check_output_file(args.write_calibration, "--write-calibration", protected=protected)
        shape = args.input_shape[0] if args.input_shape else None
        if len(args.input_shape) > 1:
            raise UsageError("--write-calibration takes one --input-shape (the model's image input)")
        info = evaluate.write_calibration(args.metric, args.write_calibration, args.count, seed=args.seed,
                                          input_shape=shape, model=args.model)
        print_json(info) if args.json else print(
            f"wrote {info['path']}: {args.count} {args.metric} samples, {info['input']} {info['shape']}")
        return 0
    if not args.model:
        raise UsageError("MODEL is required (an .onnx file or a name such as rapidocr:rec)")
    result = evaluate.evaluate(args.model, args.metric, reference_path=args.reference, samples=args.samples,
                               input_shapes=args.input_shape or None, data=args.data, seed=args.seed,
                               progress=True)
    if args.json:
        print_json(result)
    else:
        print(summary(result))
    return 0


def summary(result: dict) -> str:
    """A few lines: the score and what it is made of."""
    name, score = result["metric"], result["score"]
    lines = [f"{result['model']}: {name} {score:.4f}"]
    if name == "ocr-rec":
        lines[0] += (f" character accuracy (summed over {result['samples']} lines), "
                     f"{result['exact']}/{result['samples']} lines exact")
        if "reference" in result:
            ref = result["reference"]
            lines.append(f"reference {ref['model']}: {ref['score']:.4f}, {ref['exact']} exact "
                         f"(drop {ref['score'] - score:+.4f})")
        misses = [s for s in result["per_sample"] if s["edit_distance"]]
        lines += [f"  {s['text']!r} -> {s['predicted']!r}" for s in misses[:SHOWN_MISSES]]
        if len(misses) > SHOWN_MISSES:
            lines.append(f"  ... {len(misses) - SHOWN_MISSES} more (--json lists all)")
    elif name == "ocr-det":
        lines[0] += f" box F1 against {result['against']} on {result['samples']} pages"
        for key in ("known_boxes", "reference_boxes"):
            if key in result:
                r = result[key]
                lines.append(f"  {key.replace('_', ' ')}: F1 {r['f1']:.4f}, {r['matched']} matched, "
                             f"{r['predicted']} predicted, {r['expected']} expected")
    elif name == "cosine":
        lines[0] += f" mean output cosine on {result['samples']} inputs (min {result['min']:.4f})"
    return "\n".join(lines)

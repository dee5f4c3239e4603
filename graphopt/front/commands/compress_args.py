"""The compression options of ``graphopt optimize`` (pruning, quantization, weight conversion, accuracy budget)."""

from __future__ import annotations

import argparse

from graphopt.core.errors import UsageError
from graphopt.front.commands.common import split_names, table
from graphopt.compression.compress import QUANTIZE_MODES, WEIGHT_DTYPES, CompressOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    from graphopt.compression.calibration import DEFAULT_PERCENTILE, METHODS

    g = p.add_argument_group("compression (after the -O pipeline)")
    g.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="int8: static QDQ from --calibration data; int8-dynamic: MatMul/Gemm with run-time "
                        "activation quantization (LSTM/GRU weights int8); int8-weights/int4-weights: weight-only, "
                        "block-wise, for MatMul/Gemm")
    g.add_argument("--weights", choices=WEIGHT_DTYPES, help="store weights in half precision")
    g.add_argument("--calibration", metavar="FILE.npz|DIR",
                   help="sample inputs for --quantize int8: one array per input with a leading sample axis, "
                        "or a folder of such .npz files")
    g.add_argument("--calibration-method", choices=METHODS, default="percentile",
                   help="how a tensor's range comes from its histogram (default: percentile)")
    g.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"kept share of values for --calibration-method percentile (default {DEFAULT_PERCENTILE})")
    g.add_argument("--calibration-samples", type=int, metavar="N", help="use at most N calibration samples")
    g.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                   help="uint8 asymmetric (default) or int8 symmetric activations")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    g.add_argument("--exclude", action="append", default=[], metavar="NAMES",
                   help="node names or op types that stay float (comma-separated, repeatable)")
    g.add_argument("--equalize", action="store_true", help="cross-layer equalization before quantizing")
    g.add_argument("--bias-correction", action="store_true",
                   help="shift each int8 layer's bias by its mean error on the calibration data")
    g.add_argument("--adaround", action="store_true",
                   help="learn each int8 weight's rounding (up or down) so that layer outputs on the calibration "
                        "data match the float model's (AdaRound)")
    g.add_argument("--share-tolerance", type=float, metavar="T",
                   help="also share float weights of the same shape equal within T times their largest magnitude "
                        "(off by default: it changes the model's numbers; the report lists every merge)")
    g.add_argument("--max-drop", type=float, metavar="X",
                   help="accuracy budget: keep the most sensitive layers float until --metric is within X "
                        "(0 < X < 1) of the float model's")
    g.add_argument("--prune", metavar="KIND:R",
                   help="channels:R removes R (0 <= R < 1) of the output channels of every prunable channel group "
                        "(FLOPs drop for real); magnitude:R zeroes the smallest R of each layer's weights (smaller "
                        "only after gzip). Options: :l1|:l2 importance norm, magnitude :global|:layer")
    g.add_argument("--prune-layer", action="append", default=[], metavar="NAME=R",
                   help="a layer's own pruning ratio (repeatable)")
    g.add_argument("--reconstruct", action="store_true",
                   help="after --prune channels, refit each pruned layer by least squares to the unpruned model's "
                        "outputs on --calibration data")
    g.add_argument("--metric", metavar="NAME",
                   help="score for --max-drop: ocr-rec, ocr-det, cosine, or MODULE:FUNCTION")


def options(args: argparse.Namespace) -> CompressOptions | None:
    """The compression the command line asks for (checked), or None when it asks for none."""
    wanted = (args.quantize, args.weights, args.calibration, args.max_drop, args.metric, args.prune,
              args.share_tolerance)
    if all(v is None for v in wanted) and not (args.equalize or args.bias_correction or args.reconstruct
                                               or args.prune_layer or args.adaround):
        return None
    opts = CompressOptions(
        quantize=args.quantize, weights=args.weights, calibration=args.calibration,
        method=args.calibration_method, percentile=args.percentile, samples=args.calibration_samples,
        activation_type=args.activation_type, per_channel=not args.per_tensor,
        exclude=tuple(n for e in args.exclude for n in split_names(e)), equalize=args.equalize,
        bias_correction=args.bias_correction, max_drop=args.max_drop, metric=args.metric,
        target_runtime=getattr(args, "target_runtime", "onnx"), progress=not getattr(args, "quiet", False),
        prune=args.prune, prune_layers=tuple(args.prune_layer), reconstruct=args.reconstruct,
        adaround=args.adaround, share_tolerance=args.share_tolerance,
    )
    opts.check()
    return opts


def _prune_summary(p: dict) -> list[str]:
    lines = []
    if p["kind"] == "channels":
        rows = [[r["group"], len(r["layers"]), f"{r['channels']} -> {r['kept']}", r["status"][:60],
                 f"{r['sensitivity']:.4f}" if "sensitivity" in r else ""] for r in p["layers"]]
        lines.append(table(rows, ["group (first layer)", "layers", "channels", "done", "drop alone"]))
    else:
        rows = [[r["layer"], r["op"], f"{r['share']:.1%}", r["status"],
                 f"{r['sensitivity']:.4f}" if "sensitivity" in r else ""] for r in p["layers"]]
        lines.append(table(rows, ["layer", "op", "zeroed", "done", "drop alone"]))
    f = p["flops"]
    if f.get("reduction") is not None:
        lines.append(f"FLOPs {f['before']:,} -> {f['after']:,} ({f['reduction']:.1%} fewer)")
    if "gzip_bytes" in p:
        g = p["gzip_bytes"]
        lines.append(f"sparsity {p['sparsity']:.1%}; gzip size {g['before']:,} -> {g['after']:,} B ({p['note']})")
    b = p.get("budget")
    if b:
        n = len(b["restored"])
        lines.append(_budget_line(b, "all pruned", b["all_pruned"],
                                  f"{n} group{'s' if n != 1 else ''}/layer{'s' if n != 1 else ''} left unpruned"))
    return lines


def _budget_line(b: dict, worst_label: str, worst: float, outcome: str) -> str:
    return (f"metric: float {b['float']:.4f}, {worst_label} {worst:.4f}, final {b['final']:.4f} "
            f"(max drop {b['max_drop']}: {'within' if b['within_budget'] else 'NOT within'} budget, {outcome})")


def summary(report: dict) -> str:
    """The per-layer table and the budget line for the terminal."""
    lines = _prune_summary(report["prune"]) if "prune" in report else []
    s = report.get("shared")
    if s:
        lines.append(f"shared within tolerance {s['tolerance']:g}: {s['merged']} weight(s) merged, "
                     f"{s['bytes_saved']:,} B saved, largest difference {s['max_abs_diff']:.3g}")
    a = report.get("adaround")
    if a:
        better = sum(1 for rtn, kept in a.values() if kept < rtn)
        lines.append(f"adaround: {better} of {len(a)} layers rounded better than nearest on the calibration data "
                     f"(mean relative error {sum(r for r, _ in a.values()) / len(a):.3g} -> "
                     f"{sum(k for _, k in a.values()) / len(a):.3g})")
    rows = [[r["layer"], r["op"], r["status"],
             f"{r['sensitivity']:.4f}" if "sensitivity" in r else "",
             r.get("float_weight_bytes", "")] for r in report.get("layers", [])]
    if rows:
        lines.append(table(rows, ["layer", "op", "done", "drop alone", "float weight bytes"]))
    b = report.get("budget")
    if b:
        kept = len(b["kept_float"])
        lines.append(_budget_line(b, "all int8", b["all_quantized"], f"{kept} layer{'s' if kept != 1 else ''} kept float"))
    return "\n".join(lines)


def apply(opts: CompressOptions | None, res, source, args: argparse.Namespace) -> dict | None:
    """Compress ``res.model`` (an OptimizeResult) in place of itself; the compression report, or None."""
    if opts is None:
        return None
    from graphopt.compression.compress import compress

    done = compress(res.model, opts, source=source, input_shapes=args.input_shape or None)
    res.model = done.model
    return done.report


# --config FILE.json: the command's options from a file; a flag given on the command line wins.

class Unset:
    """A default argparse filled in (the flag was not on the command line); ``apply_config`` replaces it.
    Copied (argparse's append actions copy the default before appending), it is the plain default."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __copy__(self):
        return list(self.value or [])

    def __repr__(self) -> str:  # --help shows the default
        return repr(self.value)

    __str__ = __repr__


NOT_IN_CONFIG = ("help", "config", "output", "model", "debug")


def add_config(p: argparse.ArgumentParser) -> None:
    """``--config FILE.json``; call after every other option is added (their defaults are marked)."""
    p.add_argument("--config", metavar="FILE.json",
                   help="options from a JSON object (keys: option names, e.g. {\"quantize\": \"int8\", "
                        "\"calibration\": \"c.npz\"}; written by graphopt search); flags given here override it")
    for action in p._actions:
        if action.option_strings and action.dest not in NOT_IN_CONFIG and action.default is not argparse.SUPPRESS:
            action.default = Unset(action.default)
    for dest, value in list(p._defaults.items()):
        p._defaults[dest] = Unset(value)
    p.set_defaults(_config_actions=[a for a in p._actions if a.option_strings and a.dest not in NOT_IN_CONFIG])


def apply_config(args: argparse.Namespace) -> None:
    """Fill every option not given on the command line from ``--config`` (else its default), checked
    as the flag would be; an unknown key or a bad value is a UsageError naming the file and key."""
    actions: dict[str, list] = {}
    for a in getattr(args, "_config_actions", ()):
        actions.setdefault(a.dest, []).append(a)
    given = _read_config(args.config) if getattr(args, "config", None) else {}
    values = {}
    for key, value in given.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise UsageError(f"--config {args.config}: unknown key {key!r} (known: {known})")
        values[dest] = _config_value(args.config, key, value, actions[dest])
    for dest, value in vars(args).items():
        if isinstance(value, Unset):
            setattr(args, dest, values.get(dest, value.value))


def _read_config(path: str) -> dict:
    from graphopt.core.io import read_json_object

    return read_json_object(path, "--config", "a JSON object of option names and values")


def _config_value(path, key, value, acts: list):
    """``value`` converted and checked as its flag's argument would be."""
    a = acts[0]
    bad = f"--config {path}: key {key!r}: "
    if a.nargs == 0:  # flags: store_true/false, or one of several store_const (-O0..-O3)
        for act in acts:
            if type(act.const) is type(value) and act.const == value:
                return value
        if isinstance(a.const, bool) and isinstance(value, bool):
            return value
        raise UsageError(bad + f"expected one of {', '.join(repr(x.const) for x in acts)}, got {value!r}")
    if isinstance(a, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert(bad, a, v) for v in items]
    if isinstance(value, (list, dict)):
        raise UsageError(bad + f"expected one value, got {value!r}")
    return _convert(bad, a, value)


def _convert(bad: str, a: argparse.Action, value):
    if isinstance(value, (list, dict)) or value is None:
        raise UsageError(bad + f"expected a value, got {value!r}")
    try:
        v = a.type(str(value)) if callable(a.type) else str(value)
    except (TypeError, ValueError):
        raise UsageError(bad + f"{value!r} is not a valid {getattr(a.type, '__name__', 'value')}") from None
    if a.choices is not None and v not in a.choices:
        raise UsageError(bad + f"{value!r}: expected one of {', '.join(map(str, a.choices))}")
    return v

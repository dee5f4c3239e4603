"""The ``graphopt`` command: argument parsing and exit codes; each command is one API call.

Exit codes: 0 success; 2 bad input or usage (one line naming the file, node, op or option);
1 an internal error (a bug; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback

from graphopt.core.errors import GraphoptError

# name -> module under graphopt.front.commands; each has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "inspect": ("inspect_cmd", "show opset, inputs/outputs, op histogram, parameters and FLOPs"),
    "optimize": ("optimize_cmd", "run the ordered pass pipeline and write ONNX"),
    "passes": ("passes_cmd", "list the registered passes"),
    "compile": ("compile_cmd", "compile a model through TVM into a bundle directory"),
    "run": ("run_cmd", "run a compiled bundle on inputs from an .npz file"),
    "generate": ("generate_cmd", "greedy decoding with a KV-cache decoder: tokens, time to first token, per-token latency"),
    "bench": ("bench_cmd", "benchmark models or bundles against ONNX Runtime"),
    "tune": ("tune_cmd", "tune a model's kernels with MetaSchedule"),
    "serve": ("serve_cmd", "serve bundles or ONNX models over the KServe v2 inference protocol (HTTP, gRPC)"),
    "loadtest": ("loadtest_cmd", "measure a running server's throughput and latency (loopback only)"),
    "compare": ("compare_cmd", "compare graphopt -O3 (standard ONNX and --target-runtime ort) with onnxslim: node counts and ONNX Runtime latency"),
    "conformance": ("conformance_cmd", "run the ONNX node conformance cases through the compiler"),
    "targets": ("targets_cmd", "list the target presets (x86, aarch64, aarch64-dotprod, cuda) and what each assumes"),
    "package": ("package_cmd", "pack a bundle into one .tar.gz for a device (library, params, manifest, loader)"),
    "evaluate": ("evaluate_cmd", "score a model on rendered OCR text (ocr-rec, ocr-det), by cosine or your metric; write calibration data"),
    "search": ("search_cmd", "search compression configurations (quantization, pruning, fallback) for the fastest or smallest within an accuracy budget"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.exit(2, f"graphopt: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Ahead-of-time graph optimizer and compiler for ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"graphopt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"graphopt.front.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from graphopt import __version__

    return __version__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"graphopt: warning: {message}\n"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` (temp files, temp dirs) runs."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code. Ctrl-C (130) and SIGTERM (143) anywhere, start-up
    included, print one line and clean up after themselves."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # warnings for users, not source locations
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except GraphoptError as e:
        if args.debug:
            traceback.print_exc()
        msg = " ".join(str(e).split("\n")[0:1]) or type(e).__name__
        print(f"graphopt {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `graphopt ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"graphopt {args.command}: internal error: {type(e).__name__}: {' '.join(str(e).split())} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``graphopt run BUNDLE --inputs IN.npz -o OUT.npz``: run a compiled bundle."""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from graphopt.front import api

from graphopt.core import io, outputs
from graphopt.core.errors import UsageError

_NPY_MAGIC = b"\x93NUMPY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory written by 'graphopt compile'")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input, keyed by input name")
    p.add_argument("-o", "--output", required=True, help=".npz to write the outputs to (keyed by output name)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the bundle files' sha256")
    p.add_argument("--expect-digest", metavar="sha256:HEX",
                   help="refuse the bundle unless its digest (printed by compile) is this one")


def read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UsageError(f"--inputs {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        raise UsageError(f"--inputs {path}: not an .npz (it is a .npy array file); "
                         "save the inputs with numpy.savez(path, name=array, ...)")
    if not head.startswith(b"PK"):
        raise UsageError(f"--inputs {path}: not an .npz (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"--inputs {path}: not a readable .npz file ({msg})") from None
    except (AttributeError, TypeError):  # np.load returned a plain array, not an archive
        raise UsageError(f"--inputs {path}: not an .npz archive of named arrays") from None


def _bundle_files(bundle: str) -> list[Path]:
    """Every file inside the bundle directory (an output must not overwrite any of them)."""
    root = Path(bundle)
    return [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []


def write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` for any output names (savez's own keyword ``file`` cannot be an output name)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, value in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def run(args: argparse.Namespace) -> int:
    outputs.check_output_file(args.output, "-o", protected=[args.inputs, *_bundle_files(args.bundle)])
    inputs = read_npz(args.inputs)
    if api.is_emulated_bundle(args.bundle):  # an aarch64 bundle on x86: its loader under qemu
        results = api.run_emulated(args.bundle, inputs, verify=not args.no_verify, digest=args.expect_digest)
        print(f"note: the aarch64 bundle {args.bundle} ran under qemu", file=sys.stderr)
    else:
        module = api.load_bundle(args.bundle, verify=not args.no_verify, digest=args.expect_digest)
        results = module(**inputs)
    io.atomic_write(args.output, lambda f: write_npz(f, results))
    for name, value in results.items():
        print(f"{name}: {value.dtype} {list(value.shape)}")
    if not api.is_emulated_bundle(args.bundle):
        print(module.load_report())  # load time, weights memory-mapped or copied, peak RSS
    return 0

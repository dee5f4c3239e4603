"""``graphopt run BUNDLE --inputs IN.npz -o OUT.npz``: run a compiled bundle."""

from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np

from graphopt import api
from graphopt.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory written by 'graphopt compile'")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input, keyed by input name")
    p.add_argument("-o", "--output", required=True, help=".npz to write the outputs to (keyed by output name)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the bundle files' sha256")


def read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UsageError(f"--inputs {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"--inputs {path}: not a readable .npz file ({e})") from None


def run(args: argparse.Namespace) -> int:
    module = api.load_bundle(args.bundle, verify=not args.no_verify)
    outputs = module(**read_npz(args.inputs))
    tmp = args.output + ".tmp.npz"
    np.savez(tmp, **outputs)
    os.replace(tmp, args.output)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype} {list(value.shape)}")
    return 0

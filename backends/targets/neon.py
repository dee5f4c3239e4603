"""Which kernels of an aarch64 library use NEON: counted in its disassembly, per kernel.

Timings under qemu say nothing about a device, the instructions do. ``kernel_report(lib)`` runs
``aarch64-linux-gnu-objdump -d`` and, for each kernel (TVM's ``<name>_compute_`` functions, with
the parallel bodies the compiler placed after them), counts:

- ``instructions``: all instructions;
- ``neon``: instructions on vector registers (``v0.4s``, ``q1``...), loads and stores included;
- ``vector_fma``: vector multiply-accumulates (``fmla``/``fmls``/``mla``/``mls`` on vector registers);
- ``dot``: ``sdot``/``udot`` (int8 dot products, Armv8.2 dotprod);
- ``fp16``: floating-point arithmetic on half-precision vectors (``.8h``/``.4h``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from graphopt.core.errors import UnsupportedError

OBJDUMP = "aarch64-linux-gnu-objdump"
_SYMBOL = re.compile(r"^[0-9a-f]+ <(?P<name>[^>]+)>:$")
_INSN = re.compile(r"^\s+[0-9a-f]+:\s+(?P<op>[a-z][a-z0-9.]*)\s*(?P<args>.*)$")
_VECTOR = re.compile(r"\b(v\d+\.\d*[bhsd]|q\d+)\b")
_HALF = re.compile(r"\bv\d+\.[48]h\b")
_FMA = ("fmla", "fmls", "mla", "mls")
SUFFIX = "_compute_"


def _counts() -> dict[str, int]:
    return {"instructions": 0, "neon": 0, "vector_fma": 0, "dot": 0, "fp16": 0}


def count(disassembly: str) -> dict[str, dict[str, int]]:
    """Per function of an ``objdump -d`` listing, the instruction counts (see the module docstring)."""
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in disassembly.splitlines():
        symbol = _SYMBOL.match(line)
        if symbol:
            current = functions.setdefault(symbol.group("name"), _counts())
            continue
        insn = _INSN.match(line) if current is not None else None
        if insn is None:
            continue
        op, args = insn.group("op"), insn.group("args").split("//")[0]
        current["instructions"] += 1
        vector = bool(_VECTOR.search(args))
        current["neon"] += vector
        current["vector_fma"] += vector and op in _FMA
        current["dot"] += op in ("sdot", "udot")
        current["fp16"] += op.startswith("f") and bool(_HALF.search(args))
    return functions


def disassemble(library: str) -> str:
    if shutil.which(OBJDUMP) is None:
        raise UnsupportedError(f"counting NEON instructions needs '{OBJDUMP}' "
                               "(install it: apt-get install binutils-aarch64-linux-gnu)")
    proc = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", library], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UnsupportedError(f"{OBJDUMP} cannot read {library}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def kernel_report(library: str) -> list[dict]:
    """One row per kernel, largest first: name, the counts, and ``neon_share`` (neon / instructions)."""
    rows = []
    for name, c in count(disassemble(library)).items():
        if name.endswith(SUFFIX) and c["instructions"]:
            rows.append({"kernel": name[: -len(SUFFIX)], **c, "neon_share": round(c["neon"] / c["instructions"], 3)})
    return sorted(rows, key=lambda r: (-r["instructions"], r["kernel"]))


__all__ = ["count", "disassemble", "kernel_report"]

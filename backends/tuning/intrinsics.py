"""Register only the tensor intrinsics of the target being tuned.

MetaSchedule's ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, whose ``__init__`` registers
the intrinsics of every backend TVM has: 45 s on this project's 2-core machines, 30 of them for CUDA's.
A tuning run on x86 needs x86's (VNNI/AVX-512 dot products: 0.5 s). :func:`register_for` puts the
package in ``sys.modules`` without running its ``__init__`` and imports the one backend module the
target uses, so TVM's own import then finds the package already there. Another target's module is
imported when that target is tuned in the same process.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

PACKAGE = "tvm.s_tir.tensor_intrin"
_BY_KIND = {"cuda": "cuda", "rocm": "rocm", "metal": "metal", "hexagon": "hexagon"}


def module_for(target) -> str | None:
    """The ``tvm.s_tir.tensor_intrin`` submodule a tvm Target's schedule rules use, or None if unknown."""
    kind = target.kind.name
    if kind in _BY_KIND:
        return _BY_KIND[kind]
    if kind != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm")):
        return "arm_cpu"
    if triple.startswith("riscv"):
        return "riscv_cpu"
    return "x86"  # the host (graphopt's x86 preset) or an explicit x86 triple


def register_for(target) -> None:
    """Import the tensor intrinsics ``target`` can use, and no others (all of them for an unknown kind)."""
    sub = module_for(target)
    if sub is None:
        importlib.import_module(PACKAGE)
        return
    if PACKAGE not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(PACKAGE)
        package = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
        sys.modules[PACKAGE] = package
        tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{PACKAGE}.{sub}")

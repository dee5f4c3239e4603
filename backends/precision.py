"""Compute precision of a compiled model: ``fp32`` (the default) or ``fp16`` (CUDA targets).

``fp16`` runs Relax's ``ToMixedPrecision`` before legalization: convolutions and matmuls read
float16 inputs and accumulate in float32 (``out_dtype``), elementwise work between them follows
in float16, and the model's inputs and outputs keep their float32 types. On CUDA, dlight's Matmul
rule then lowers large float16 matmuls to tensor-core MMA (``mma.sync``); the preset table says
which archs have fp16 tensor cores (all of sm_75 to sm_90). CPU targets are refused: x86 has no
fp16 arithmetic to gain from it (``graphopt optimize --weights fp16`` halves a model's size instead).
"""

from __future__ import annotations

from graphopt.core.errors import UsageError

PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str, spec) -> None:
    """A UsageError naming ``--precision`` unless ``spec`` can compute in ``precision``."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and spec.kind != "cuda":
        raise UsageError(f"--precision fp16 needs a CUDA target (tensor cores); {spec.name} computes in fp32 "
                         "(to halve the weights, use graphopt optimize --weights fp16)")


def to_fp16(mod):
    """``mod`` with convs and matmuls in float16 (float32 accumulation), inputs and outputs unchanged."""
    from tvm import relax

    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)

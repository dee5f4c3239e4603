"""Output types of ONNX Runtime's ``com.microsoft`` ops that keep their input's shape.

ONNX's shape inference has no schema for that domain, so a model saved after ONNX Runtime's transformer
optimizer (``SkipLayerNormalization``, ``BiasGelu``, ...) lost every shape after its first such op:
graphopt's fusions that need ranks (attention) then fired in the first layer only (all-MiniLM-L6-v2:
1 of 6 attentions fused, 41 ms at 256 tokens against ONNX Runtime's 34). Ops listed here give output
0 (and the listed others) the type and shape of input 0; anything else stays unknown, as before.
"""

from __future__ import annotations

# op -> the outputs that have input 0's type and shape (ONNX Runtime's contrib op documentation)
SAME_AS_INPUT: dict[str, tuple[int, ...]] = {
    "SkipLayerNormalization": (0, 3),  # output 3: input + skip (+ bias), when asked for
    "SkipSimplifiedLayerNormalization": (0, 3),
    "SimplifiedLayerNormalization": (0,),
    "BiasGelu": (0,),
    "FastGelu": (0,),
    "Gelu": (0,),
    "QuickGelu": (0,),
    "BiasAdd": (0,),
}


def same_shape_outputs(domain: str, op_type: str) -> tuple[int, ...]:
    """Indices of the outputs of a ``com.microsoft`` op that have its input 0's type and shape."""
    return SAME_AS_INPUT.get(op_type, ()) if domain == "com.microsoft" else ()

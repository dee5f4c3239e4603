"""Lowering rules: ONNX Runtime's ``com.microsoft`` FusedConv and FusedGemm (version 1).

``graphopt optimize --target-runtime ort`` writes them, and so does ONNX Runtime when it saves the
model it optimized; graphopt compiles such models too. Contracts (ONNX Runtime's):

* ``FusedConv(X, W[, B][, Z])``: Conv's attributes, plus ``activation`` (Relu, LeakyRelu, Sigmoid,
  Tanh, Clip, HardSigmoid; none: identity) and ``activation_params`` (LeakyRelu: alpha; Clip: min,
  max; HardSigmoid: alpha, beta). Y = activation(Conv(X, W, B) + Z).
* ``FusedGemm(A, B[, C])``: Gemm's attributes, plus ``activation`` (Relu, LeakyRelu, Sigmoid, Tanh)
  and ``activation_alpha`` (LeakyRelu's alpha). Y = activation(Gemm(A, B, C)).
"""

from __future__ import annotations

from tvm import relax

from graphopt.backends.lowering import elementwise, nn, tensor
from graphopt.backends.lowering import nan_minmax as NM
from graphopt.backends.lowering.rules import OpRule

op = relax.op
DOMAIN = "com.microsoft"


# activation -> (x, params) -> expr; params as ONNX Runtime's attributes give them
ACTIVATIONS = {
    "Relu": lambda x, p: NM.relu(x),  # max(0, x): NaN kept, as ORT's FusedConv
    "LeakyRelu": lambda x, p: op.nn.leakyrelu(x, p[0] if p else 0.01),
    "Sigmoid": lambda x, p: op.sigmoid(x),
    "Tanh": lambda x, p: op.tanh(x),
    "Clip": lambda x, p: NM.clip(x, p[0], p[1]),
    "HardSigmoid": lambda x, p: elementwise.hard_sigmoid(x, *(p or (0.2, 0.5))),
}


def _activate(ctx, y, name: str | None, params: list[float]):
    if not name:
        return y
    ctx.check(name in ACTIVATIONS, lambda: f"activation '{name}' is not supported "
                                           f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    ctx.check(name != "Clip" or len(params) == 2, "Clip needs activation_params [min, max]")
    return ACTIVATIONS[name](ctx.emit(y), list(params))


def _fused_conv(ctx, inputs):
    y = nn.lower_conv(ctx, inputs[:3])
    if len(inputs) > 3 and inputs[3] is not None:
        y = op.add(ctx.emit(y), inputs[3])
    return _activate(ctx, y, ctx.attr("activation"), ctx.attr("activation_params") or [])


def _fused_gemm(ctx, inputs):
    name = ctx.attr("activation")
    alpha = ctx.attr("activation_alpha")
    return _activate(ctx, tensor.lower_gemm(ctx, inputs), name, [alpha] if alpha is not None else [])


RULES = (
    OpRule("FusedConv", _fused_conv, domain=DOMAIN, kind="decomposed"),
    OpRule("FusedGemm", _fused_gemm, domain=DOMAIN, kind="decomposed"),
)

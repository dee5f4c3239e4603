"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): exact in float, it evens
out the per-channel weight ranges of consecutive convolutions so that per-tensor int8 loses less.

For a pair ``Conv1 -> [positively homogeneous ops] -> Conv2`` where the values in between have a
single consumer (no residual branch sees them), output channel ``i`` of Conv1 is scaled by
``1/s_i`` (weights and bias) and input channel ``i`` of Conv2 by ``s_i``. Because ``f(x/s) = f(x)/s``
for every op in between (Relu, LeakyRelu, PRelu, MaxPool, a Clip with min 0 and no max), the model
computes the same function. With ``r1_i`` the range (max |w|) of Conv1's output channel i and
``r2_i`` that of Conv2's input channel i, ``s_i = sqrt(r1_i * r2_i) / r2_i`` gives both the range
``sqrt(r1_i * r2_i)``. Conv2 may be grouped or depthwise (input channel i lives in group
``i // (C/g)``, column ``i % (C/g)``). A Clip with a finite max (Relu6) is not homogeneous and
stops a pair; so do HardSwish and the like.

Pairs share convolutions (a chain Conv -> dw Conv -> Conv), so the pass sweeps all pairs until the
scales settle (``max_rounds``, or every ``|log s_i|`` under ``tolerance``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import const_array, only_consumer

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool"})
# A channel whose range is below DEAD times its tensor's largest keeps its scale (1): a nearly dead
# channel (weights ~1e-25 beside a normal bias) would otherwise take a scale of 1e-13, and its bias
# and activations a factor 1e13.
DEAD = 1e-5


def _is_homogeneous(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in HOMOGENEOUS:
        return node.op_type != "MaxPool" or len(node.outputs) == 1 or not node.outputs[1].uses()
    if node.op_type != "Clip":
        return False
    if "min" in node.attributes or "max" in node.attributes:  # before opset 11
        lo, hi = node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)
    else:
        lo_arr = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        has_hi = len(node.inputs) > 2 and node.inputs[2] is not None
        hi_arr = const_array(node.inputs[2]) if has_hi else None
        if (len(node.inputs) > 1 and node.inputs[1] is not None and lo_arr is None) or (has_hi and hi_arr is None):
            return False
        lo = float(lo_arr) if lo_arr is not None else -math.inf
        hi = float(hi_arr) if hi_arr is not None else math.inf
    return lo == 0 and hi == math.inf


def _own_weight(node: ir.Node, index: int) -> np.ndarray | None:
    """The float initializer at ``node.inputs[index]`` when ``node`` is its only user."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if not value.is_initializer() or value.is_graph_input() or value.is_graph_output() or len(value.uses()) != 1:
        return None
    w = const_array(value)
    return w if w is not None and w.dtype in (np.float32, np.float64, np.float16) else None


def _is_conv(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def _next_conv(conv: ir.Node) -> ir.Node | None:
    """The Conv that reads ``conv``'s output, through single-consumer homogeneous ops, else None."""
    value = conv.outputs[0]
    while True:
        user = only_consumer(value)
        if user is None:
            return None
        if _is_conv(user):
            return user if user.inputs[0] is value else None
        if not _is_homogeneous(user) or user.inputs[0] is not value:
            return None
        value = user.outputs[0]


def _input_view(w2: np.ndarray, group: int) -> np.ndarray:
    """``w2`` [O, C/g, k...] as [g, O/g, C/g, k...] (input channel i = (i // (C/g), i % (C/g)))."""
    return w2.reshape(group, w2.shape[0] // group, *w2.shape[1:])


class EqualizePass(ir.passes.InPlacePass):
    """Cross-layer equalization of Conv -> Relu -> Conv weight ranges (exact)."""

    def __init__(self, max_rounds: int = 20, tolerance: float = 1e-3) -> None:
        super().__init__()
        self.max_rounds, self.tolerance = max_rounds, tolerance
        self.pairs: list[tuple[str, str]] = []  # (Conv1, Conv2) names equalized by the last run
        self.rounds = 0

    def _pairs(self, graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
        pairs = []
        for conv in graph:
            if not _is_conv(conv) or _own_weight(conv, 1) is None:
                continue
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and _own_weight(conv, 2) is None:
                continue
            nxt = _next_conv(conv)
            if nxt is None or _own_weight(nxt, 1) is None:
                continue
            c, group = conv.inputs[1].const_value.shape[0], nxt.attributes.get_int("group", 1)
            w2_shape = nxt.inputs[1].const_value.shape
            if w2_shape[1] * group != c or w2_shape[0] % group:
                continue
            pairs.append((conv, nxt))
        return pairs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = self._pairs(model.graph)
        self.pairs = [(a.name or "", b.name or "") for a, b in pairs]
        self.rounds = 0
        # work in float64 across the rounds, store once
        arrays = {id(v): const_array(v).astype(np.float64) for a, b in pairs
                  for v in (a.inputs[1], b.inputs[1], a.inputs[2] if len(a.inputs) > 2 else None) if v is not None}
        for self.rounds in range(1, self.max_rounds + 1):
            largest = 0.0
            for a, b in pairs:
                largest = max(largest, self._equalize(arrays, a, b))
            if largest < self.tolerance:
                break
        changed = False
        for a, b in pairs:
            for v in (a.inputs[1], b.inputs[1], a.inputs[2] if len(a.inputs) > 2 else None):
                if v is None:
                    continue
                new = arrays[id(v)].astype(v.const_value.dtype.numpy())
                if not np.array_equal(new, v.const_value.numpy()):
                    v.const_value = ir.tensor(new, name=v.name)
                    changed = True
        return ir.passes.PassResult(model, changed)

    @staticmethod
    def _equalize(arrays: dict[int, np.ndarray], a: ir.Node, b: ir.Node) -> float:
        """Equalize one pair in ``arrays``; returns the largest |log s_i| applied."""
        w1, w2 = arrays[id(a.inputs[1])], arrays[id(b.inputs[1])]
        group = b.attributes.get_int("group", 1)
        view = _input_view(w2, group)
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
        axes = (1, *range(3, view.ndim))
        r2 = np.abs(view).max(axis=axes).reshape(-1)
        ok = (r1 > DEAD * r1.max(initial=0)) & (r2 > DEAD * r2.max(initial=0))
        s = np.where(ok, np.sqrt(r1 * r2) / np.where(ok, r2, 1), 1.0)
        w1 /= s.reshape(-1, *([1] * (w1.ndim - 1)))
        if len(a.inputs) > 2 and a.inputs[2] is not None:
            arrays[id(a.inputs[2])] /= s
        view *= s.reshape(group, 1, -1, *([1] * (view.ndim - 3)))
        return float(np.abs(np.log(s)).max()) if s.size else 0.0


def equalize(model: ir.Model) -> ir.Model:
    """Cross-layer equalize the model's Conv -> (Relu...) -> Conv pairs in place; returns the model."""
    return EqualizePass()(model).model

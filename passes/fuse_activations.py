"""Recognise Gelu, HardSwish and Mish written out as elementwise chains, and emit one node each.

Patterns (``c`` a constant of one element; Add/Mul operands in either order):

* Gelu, erf form: ``0.5·x·(1 + Erf(x/√2))`` with ``x/√2`` as ``Div(x, √2)`` or ``Mul(x, 1/√2)``,
  the product as ``(x·(1+erf))·0.5``, ``(x·0.5)·(1+erf)`` or ``x·((1+erf)·0.5)`` (``·0.5`` may be ``/2``).
* Gelu, tanh form: same product around ``1 + Tanh(√(2/π)·(x + 0.044715·x³))``, ``x³`` as
  ``Pow(x, 3)``, ``x·(x·x)`` or ``(x·x)·x``.
* HardSwish: ``x·HardSigmoid(x, alpha=1/6, beta=0.5)``; ``x·Clip(x+3, 0, 6)/6`` (also ``·(1/6)``,
  and ``x·(Clip(x+3, 0, 6)/6)``).
* Mish: ``x·Tanh(Softplus(x))``.

Node contracts (domain ``graphopt``, version 1; same as the standard ops, see
:mod:`graphopt.passes.graphopt_ops`): ``Gelu(X) -> Y`` with ``approximate`` ("none" | "tanh");
``HardSwish(X) -> Y`` = x·max(0, min(1, x/6 + 1/2)); ``Mish(X) -> Y`` = x·tanh(ln(1+eˣ)).

Emitted node: the standard op when the model's
opset has it (Gelu 20, HardSwish 14, Mish 18), after raising the opset when that is exact
(:mod:`graphopt.passes.opset_upgrade`); otherwise, with ``target_runtime="graphopt"``, the
graphopt-domain op (version 1, declared in the model's opset imports). With the default
``target_runtime="onnx"`` the chain stays when neither is possible, so the output always runs in
ONNX Runtime. Every intermediate value must feed only the next node of the chain.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from graphopt.passes.graphopt_ops import check_target_runtime, choose_domain, usable_in
from graphopt.passes.rewrite_utils import (
    binary_with_const,
    close_to,
    graphs_of,
    only_consumer,
    other_input,
    remove_dead,
    replace_value,
)

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _scaled(value: ir.Value, factor: float) -> tuple[ir.Value, ir.Node] | None:
    """``value`` is ``y·factor`` (or ``y/(1/factor)``): returns ``(y, node)``."""
    node = _producer(value)
    m = binary_with_const(node, ("Mul",))
    if m and close_to(m[1], factor):
        return m[0], node
    d = binary_with_const(node, ("Div",))
    if d and close_to(d[1], 1.0 / factor):
        return d[0], node
    return None


def _consumer_scaled(value: ir.Value, factor: float) -> ir.Node | None:
    """The single consumer of ``value`` when it computes ``value·factor``."""
    node = only_consumer(value)
    if node is None:
        return None
    hit = _scaled(node.outputs[0], factor)
    return node if hit and hit[0] is value else None


def _half_product(x: ir.Value, one_plus: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """Match ``0.5·x·one_plus`` around ``one_plus``; returns the output and the nodes used."""
    m1 = only_consumer(one_plus)
    if m1 is None or m1.op_type != "Mul":
        return None
    other = other_input(m1, one_plus)
    if other is x:  # (x·(1+t))·0.5
        m2 = _consumer_scaled(m1.outputs[0], 0.5)
        return (m2.outputs[0], [m1, m2]) if m2 else None
    half = _scaled(other, 0.5) if other is not None else None
    if half and half[0] is x and only_consumer(other) is m1:  # (x·0.5)·(1+t)
        return m1.outputs[0], [half[1], m1]
    if binary_with_const(m1, ("Mul",)) and close_to(binary_with_const(m1, ("Mul",))[1], 0.5):
        m2 = only_consumer(m1.outputs[0])  # x·((1+t)·0.5)
        if m2 is not None and m2.op_type == "Mul" and other_input(m2, m1.outputs[0]) is x:
            return m2.outputs[0], [m1, m2]
    return None


def _plus_one(value: ir.Value) -> ir.Node | None:
    add = only_consumer(value)
    hit = binary_with_const(add, ("Add",))
    return add if hit and hit[0] is value and close_to(hit[1], 1.0) else None


def _gelu_erf(erf: ir.Node):
    arg = _producer(erf.inputs[0])
    d = binary_with_const(arg, ("Div",))
    m = binary_with_const(arg, ("Mul",))
    if d and close_to(d[1], SQRT2):
        x = d[0]
    elif m and close_to(m[1], 1.0 / SQRT2):
        x = m[0]
    else:
        return None
    if only_consumer(erf.inputs[0]) is not erf:
        return None
    add = _plus_one(erf.outputs[0])
    tail = _half_product(x, add.outputs[0]) if add else None
    if tail is None:
        return None
    return "Gelu", x, tail[0], [arg, erf, add, *tail[1]], {"approximate": "none"}


def _cube_of(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    node = _producer(value)
    p = binary_with_const(node, ("Pow",))
    if p and close_to(p[1], 3.0):
        return p[0], [node]
    if node is not None and node.op_type == "Mul" and len(node.inputs) == 2:
        for a, b in (node.inputs, node.inputs[::-1]):
            sq = _producer(b)
            if sq is not None and sq.op_type == "Mul" and list(sq.inputs) == [a, a] and only_consumer(b) is node:
                return a, [sq, node]
    return None


def _gelu_tanh(tanh: ir.Node):
    scaled = _scaled(tanh.inputs[0], SQRT_2_OVER_PI)
    inner = _producer(scaled[0]) if scaled else None
    if inner is None or inner.op_type != "Add" or len(inner.inputs) != 2:
        return None
    for x, t in (inner.inputs, inner.inputs[::-1]):
        k = _scaled(t, 0.044715)
        cube = _cube_of(k[0]) if k else None
        if cube and cube[0] is x:
            break
    else:
        return None
    add = _plus_one(tanh.outputs[0])
    tail = _half_product(x, add.outputs[0]) if add else None
    if tail is None:
        return None
    return "Gelu", x, tail[0], [*cube[1], k[1], inner, scaled[1], tanh, add, *tail[1]], {"approximate": "tanh"}


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    from graphopt.passes.rewrite_utils import const_array

    if len(clip.inputs) > 1:
        lo = const_array(clip.inputs[1]) if clip.inputs[1] is not None else None
        hi = const_array(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2] is not None else None
        return (float(lo) if lo is not None and lo.size == 1 else None,
                float(hi) if hi is not None and hi.size == 1 else None)
    return clip.attributes.get_float("min", None), clip.attributes.get_float("max", None)


def _hardswish_clip(clip: ir.Node):
    add = _producer(clip.inputs[0])
    hit = binary_with_const(add, ("Add",))
    if not hit or not close_to(hit[1], 3.0) or _clip_bounds(clip) != (0.0, 6.0):
        return None
    x = hit[0]
    m = only_consumer(clip.outputs[0])
    if m is None or only_consumer(add.outputs[0]) is not clip:
        return None
    if m.op_type == "Mul" and other_input(m, clip.outputs[0]) is x:  # (x·clip)/6
        d = _consumer_scaled(m.outputs[0], 1.0 / 6)
        return ("HardSwish", x, d.outputs[0], [add, clip, m, d], {}) if d else None
    scaled = _scaled(m.outputs[0], 1.0 / 6)  # x·(clip/6)
    if scaled and scaled[0] is clip.outputs[0]:
        m2 = only_consumer(m.outputs[0])
        if m2 is not None and m2.op_type == "Mul" and other_input(m2, m.outputs[0]) is x:
            return "HardSwish", x, m2.outputs[0], [add, clip, m, m2], {}
    return None


def _hardswish_hsig(hs: ir.Node):
    alpha = hs.attributes.get_float("alpha", 0.2)
    beta = hs.attributes.get_float("beta", 0.5)
    if not (math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5, rel_tol=1e-6)):
        return None
    x = hs.inputs[0]
    m = only_consumer(hs.outputs[0])
    if m is None or m.op_type != "Mul" or other_input(m, hs.outputs[0]) is not x:
        return None
    return "HardSwish", x, m.outputs[0], [hs, m], {}


def _mish(softplus: ir.Node):
    x = softplus.inputs[0]
    tanh = only_consumer(softplus.outputs[0])
    if tanh is None or tanh.op_type != "Tanh":
        return None
    m = only_consumer(tanh.outputs[0])
    if m is None or m.op_type != "Mul" or other_input(m, tanh.outputs[0]) is not x:
        return None
    return "Mish", x, m.outputs[0], [softplus, tanh, m], {}


ANCHORS = {
    "Erf": _gelu_erf,
    "Tanh": _gelu_tanh,
    "Clip": _hardswish_clip,
    "HardSigmoid": _hardswish_hsig,
    "Softplus": _mish,
}


class FuseActivationsPass(ir.passes.InPlacePass):
    """Recognise Gelu (erf and tanh forms), HardSwish and Mish chains as single ops."""

    def __init__(self, *, target_runtime: str = "onnx", ops: tuple[str, ...] = ("Gelu", "HardSwish", "Mish")):
        super().__init__()
        self.target_runtime = check_target_runtime(target_runtime, "pass 'fuse_activations'")
        self.ops = frozenset(ops)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opsets = dict(model.opset_imports)  # an exact opset upgrade is a modification too
        matches = []
        for graph in list(graphs_of(model)):
            taken: set[int] = set()
            for node in list(graph):
                finder = ANCHORS.get(node.op_type)
                if finder is None or node.domain not in ("", "ai.onnx") or id(node) in taken:
                    continue
                found = finder(node)
                if found is None or found[0] not in self.ops or any(id(n) in taken for n in found[3]):
                    continue
                taken.update(id(n) for n in found[3])
                matches.append((graph, *found))
        domains: dict[str, str | None] = {}
        fused = 0
        for graph, op, x, out, nodes, attrs in matches:
            if op not in domains:
                domains[op] = choose_domain(model, op, self.target_runtime)
            domain = usable_in(graph, op, domains[op], self.target_runtime)
            if domain is None:
                continue
            new = ir.node(op, [x], attrs or None, domain=domain)
            graph.insert_before(out.producer(), new)
            new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
            replace_value(out, new.outputs[0])
            remove_dead(graph, nodes)
            fused += 1
        return ir.passes.PassResult(model, modified=fused > 0 or dict(model.opset_imports) != opsets)

"""The graphopt-domain ops the fusion passes emit, and how to turn them back into standard ONNX.

Node contracts (domain ``graphopt``, version 1; every input and output is a float tensor of one dtype):

* ``Gelu(X) -> Y``, attribute ``approximate``: ``"none"`` (0.5·x·(1+erf(x/√2))) or ``"tanh"``
  (0.5·x·(1+tanh(√(2/π)·(x+0.044715·x³)))). Same as ONNX ``Gelu``-20.
* ``HardSwish(X) -> Y``: x·max(0, min(1, x/6 + 1/2)). Same as ONNX ``HardSwish``-14.
* ``Mish(X) -> Y``: x·tanh(ln(1+eˣ)). Same as ONNX ``Mish``-18.
* ``LayerNormalization(X, Scale[, B]) -> Y``, attributes ``axis`` (int, default -1) and ``epsilon``
  (float, default 1e-5): normalizes over dims ``axis..rank-1`` with the biased variance:
  (x-mean)/sqrt(var+eps)·Scale + B. Same as ONNX ``LayerNormalization``-17 (first output only).
* ``Attention(Q, K, V[, Mask]) -> Y``, attribute ``scale`` (float): Q [..., Sq, D], K [..., Skv, D]
  (not transposed), V [..., Skv, Dv], Mask additive, broadcastable to [..., Sq, Skv];
  Y = softmax((Q·Kᵀ)·scale + Mask, last axis)·V, with numpy broadcasting over the leading dims.

Fusions emit these only when asked to (``target_runtime="graphopt"``) and the model's opset has no
standard op for the job; :func:`expand_graphopt_ops` rewrites them as standard ops so that ONNX Runtime
can run the model (the differential check uses it).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from graphopt.passes.rewrite_utils import GRAPHOPT_DOMAIN, graphs_of, replace_value

# Where the optimized ONNX will run: "onnx", any runtime (standard ops only); "ort", ONNX Runtime
# (standard ops and its com.microsoft FusedConv/FusedGemm); "graphopt", graphopt's lowering
# (graphopt-domain ops where the model's opset has no standard one).
TARGET_RUNTIMES = ("onnx", "ort", "graphopt")
# the passes whose output depends on it (their ``target_runtime`` option)
RUNTIME_AWARE_PASSES = ("fuse_activations", "fuse_layernorm", "fuse_attention", "fuse_conv_activation",
                        "fuse_sibling_matmuls")


def with_target_runtime(options: dict | None, target_runtime: str) -> dict:
    """Per-pass ``options`` with ``target_runtime`` set for every runtime-aware pass (an explicit
    per-pass option wins)."""
    check_target_runtime(target_runtime, "optimize")  # before any pass is made
    merged = {name: dict(opts) for name, opts in (options or {}).items()}
    for name in RUNTIME_AWARE_PASSES:
        merged[name] = {"target_runtime": target_runtime, **merged.get(name, {})}
    return merged

OPS = ("Gelu", "HardSwish", "Mish", "LayerNormalization", "Attention")

# op -> first default-domain opset with an equivalent standard op (Attention: rank-4 inputs only)
STANDARD_SINCE = {"Gelu": 20, "HardSwish": 14, "Mish": 18, "LayerNormalization": 17, "Attention": 23}


def choose_domain(model: ir.Model, op: str, target_runtime: str, *, may_upgrade: bool = True) -> str | None:
    """Where to put a fused ``op``: ``""`` (standard, upgrading the opset when exact), ``"graphopt"``,
    or None (no fusion: the target is plain ONNX and the opset cannot be raised exactly)."""
    from graphopt.passes.opset_upgrade import try_upgrade

    since = STANDARD_SINCE[op]
    current = model.opset_imports.get("", 0)
    if current >= since:
        return ""
    if target_runtime == "graphopt":
        model.opset_imports[GRAPHOPT_DOMAIN] = 1
        return GRAPHOPT_DOMAIN
    if may_upgrade and try_upgrade(model, since):
        return ""
    return None


def usable_in(graph, op: str, domain: str | None, target_runtime: str) -> str | None:
    """The domain a fused ``op`` may take in ``graph`` (``domain`` as chosen for the model): a model
    function has its own opset imports, which must reach the standard op; else graphopt's domain is
    used (declared in the function) when the target allows it, else nothing."""
    if domain is None or not isinstance(graph, ir.Function):
        return domain
    if domain == "" and graph.opset_imports.get("", 0) >= STANDARD_SINCE[op]:
        return domain
    if target_runtime != "graphopt":
        return None
    graph.opset_imports[GRAPHOPT_DOMAIN] = 1
    return GRAPHOPT_DOMAIN


def check_target_runtime(value: str, where: str) -> str:
    """``value`` when it is one of ``TARGET_RUNTIMES``; else a UsageError naming ``where`` it was given."""
    from graphopt.core.errors import UsageError

    if value not in TARGET_RUNTIMES:
        raise UsageError(f"{where}: target_runtime must be one of {', '.join(TARGET_RUNTIMES)}, got {value!r}")
    return value


class _Builder:
    """Appends standard nodes before ``anchor`` in ``graph``."""

    def __init__(self, graph, anchor: ir.Node, opset: int, dtype: np.dtype):
        self.graph, self.anchor, self.opset, self.dtype = graph, anchor, opset, dtype

    def op(self, op_type: str, *inputs, **attrs) -> ir.Value:
        node = ir.node(op_type, list(inputs), attrs or None)
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def const(self, value) -> ir.Value:
        arr = np.asarray(value, dtype=self.dtype)
        node = ir.node("Constant", [], {"value": ir.tensor(arr)})
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def reduce_mean(self, x: ir.Value, axes: list[int]) -> ir.Value:
        if self.opset >= 18:
            node = ir.node("Constant", [], {"value": ir.tensor(np.array(axes, dtype=np.int64))})
            self.graph.insert_before(self.anchor, node)
            return self.op("ReduceMean", x, node.outputs[0], keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)


def _expand_node(node: ir.Node, b: _Builder) -> ir.Value:
    x = node.inputs[0]
    op = node.op_type
    if op == "Gelu":
        if node.attributes.get_string("approximate", "none") == "tanh":
            inner = b.op("Add", x, b.op("Mul", b.const(0.044715), b.op("Mul", x, b.op("Mul", x, x))))
            t = b.op("Tanh", b.op("Mul", b.const(math.sqrt(2 / math.pi)), inner))
        else:
            t = b.op("Erf", b.op("Div", x, b.const(math.sqrt(2.0))))
        return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", t, b.const(1.0)))
    if op == "HardSwish":
        return b.op("Mul", x, b.op("HardSigmoid", x, alpha=1.0 / 6, beta=0.5))
    if op == "Mish":
        return b.op("Mul", x, b.op("Tanh", b.op("Softplus", x)))
    if op == "LayerNormalization":
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            raise ValueError(f"graphopt.LayerNormalization {node.name}: input rank unknown")
        axis = node.attributes.get_int("axis", -1) % rank
        eps = node.attributes.get_float("epsilon", 1e-5)
        axes = list(range(axis, rank))
        centered = b.op("Sub", x, b.reduce_mean(x, axes))
        var = b.reduce_mean(b.op("Mul", centered, centered), axes)
        y = b.op("Div", centered, b.op("Sqrt", b.op("Add", var, b.const(eps))))
        y = b.op("Mul", y, node.inputs[1])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            y = b.op("Add", y, node.inputs[2])
        return y
    if op == "Attention":
        q, k, v = node.inputs[:3]
        rank = len(k.shape) if k.shape is not None else None
        if rank is None:
            raise ValueError(f"graphopt.Attention {node.name}: K rank unknown")
        perm = [*range(rank - 2), rank - 1, rank - 2]
        s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=perm)),
                 b.const(node.attributes.get_float("scale", 1.0)))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            s = b.op("Add", s, node.inputs[3])
        axis = {"axis": -1} if b.opset >= 13 else {"axis": len(q.shape) - 1}
        return b.op("MatMul", b.op("Softmax", s, **axis), v)
    raise ValueError(f"unknown graphopt op {op}")


def expand_graphopt_ops(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every graphopt-domain node rewritten as standard ONNX ops."""
    copy = ir.from_proto(ir.to_proto(model))
    opset = copy.opset_imports.get("", 13)
    for graph in list(graphs_of(copy)):
        for node in list(graph):
            if node.domain != GRAPHOPT_DOMAIN:
                continue
            dtype = node.outputs[0].dtype or node.inputs[0].dtype
            np_dtype = dtype.numpy() if dtype is not None else np.float32
            y = _expand_node(node, _Builder(graph, node, opset, np_dtype))
            y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
            replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
    copy.opset_imports.pop(GRAPHOPT_DOMAIN, None)
    for function in copy.functions.values():
        function.opset_imports.pop(GRAPHOPT_DOMAIN, None)
    NameFixPass()(copy)  # values created inside functions have no names yet
    return copy


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray], *, threads: int = 1) -> list[np.ndarray]:
    """Run ``model`` in ONNX Runtime (graphopt-domain ops expanded first); all outputs, in order."""
    import onnxruntime as ort

    if any(n.domain == GRAPHOPT_DOMAIN for g in graphs_of(model) for n in g):
        model = expand_graphopt_ops(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)

"""ONNX graph (onnx_ir) -> Relax IRModule, one node at a time through the op table.

``lower(model)`` checks every op first (``check_supported``, which lists all unsupported ops at once),
then walks the graph: graph inputs become Relax parameters (symbolic dims become shared ``tirx.Var``s),
large initializers become weight parameters (``params``), small ones and values computable from
constants (shape arithmetic: ``Shape`` of a static tensor, and every small all-constant node) are
folded to numpy here, so ``ctx.const`` sees them even when the graph was not folded before lowering.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter, ChainMap
from typing import Any

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering.context import LowerContext, attr_value
from graphopt.backends.lowering.table import RULES, find_rule
from graphopt.core.errors import GraphoptError, UnsupportedError

# Initializers with more elements than this become weight parameters; smaller ones are inlined.
PARAM_MIN_ELEMENTS = 64
# A node whose inputs are all constant is evaluated here when its inputs hold at most this many elements.
FOLD_MAX_ELEMENTS = 1 << 16
_NO_FOLD = frozenset(
    {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
     "Multinomial", "Bernoulli"}
)


@dataclasses.dataclass
class Lowered:
    """A lowered model: ``mod["main"]`` takes the data inputs in order, then the weights in ``params`` order."""

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    inputs: list[tuple[str, tuple, str]]
    outputs: list[tuple[str, tuple, str]]

    @property
    def num_input(self) -> int:
        return len(self.inputs)


# ---------------------------------------------------------------------------- op support


def _opset_of(node: ir.Node, opsets: dict[str, int]) -> int:
    if node.version is not None:
        return int(node.version)
    domain = "" if node.domain == "ai.onnx" else node.domain
    return int(opsets.get(domain, opsets.get("ai.onnx", 1) if domain == "" else 1))


def _walk(graph: ir.Graph):
    """Every node of the graph and of its subgraphs."""
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _walk(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _walk(g)


def _why_unsupported(domain: str, op: str, opset: int) -> str:
    versions = [r for r in RULES if r.op == op and r.domain == domain]
    if not versions:
        return "no lowering rule for this op"
    ranges = ", ".join(f"{r.since}-{r.until or ''}" for r in versions)
    return f"no rule for opset {opset} (rules cover opsets {ranges})"


def coverage(model: ir.Model, target: str = "x86") -> list[dict[str, Any]]:
    """One row per (op, domain, opset) in the model: count, status and why it is unsupported."""
    opsets = dict(model.opset_imports)
    counts: Counter = Counter()
    for node in _walk(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        counts[(node.op_type, domain, _opset_of(node, opsets))] += 1
    rows = []
    for (op, domain, opset), count in sorted(counts.items()):
        rule = find_rule(domain, op, opset)
        status = "unsupported" if rule is None else ("decomposed" if rule.kind == "decomposed" else "supported")
        reason = _why_unsupported(domain, op, opset) if rule is None else ""
        rows.append({"op": op, "domain": domain, "opset": opset, "count": count, "status": status, "reason": reason})
    return rows


def check_supported(model: ir.Model) -> None:
    """Raise UnsupportedError listing every op (op, domain, opset, count) graphopt cannot lower."""
    bad = [r for r in coverage(model) if r["status"] == "unsupported"]
    problems = [
        f"{r['op']} (domain '{r['domain'] or 'ai.onnx'}', opset {r['opset']}, {r['count']} node(s)): {r['reason']}"
        for r in bad
    ]
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            kind = type(value.type).__name__.replace("Type", "").lower()
            problems.append(f"'{value.name}' has {kind} type; graphopt compiles tensors only")
        elif value.dtype is not None and helpers.relax_dtype(value.dtype) is None:
            problems.append(f"input '{value.name}' has dtype {value.dtype.name}, which Relax cannot hold")
    if problems:
        raise UnsupportedError(f"{len(problems)} unsupported op(s)/type(s): " + "; ".join(problems))


# ---------------------------------------------------------------------------- lowering


class _Lowerer:
    def __init__(self, model: ir.Model):
        self.model = model
        self.opsets = dict(model.opset_imports)
        self.bb = relax.BlockBuilder()
        self.env: ChainMap = ChainMap()  # ir.Value -> relax.Expr
        self.consts: ChainMap = ChainMap()  # ir.Value -> np.ndarray
        self.sym_dims: dict[str, tvm.tirx.Var] = {}
        self.weights: dict[ir.Value, tuple[relax.Var, np.ndarray]] = {}
        self._ids = itertools.count()

    def next_id(self) -> int:
        return next(self._ids)

    # ---------------------------------------------------------------- values
    def const_of(self, value: ir.Value) -> np.ndarray | None:
        if value in self.consts:
            return self.consts[value]
        if value.const_value is not None:
            arr = _storage(value.const_value.numpy())
            self.consts[value] = arr
            return arr
        return None

    def expr_of(self, value: ir.Value | None) -> relax.Expr | None:
        """The Relax expression of a value; a constant becomes a weight parameter when large, else inline."""
        if value is None:
            return None
        if value in self.env:
            return self.env[value]
        if value in self.weights:  # first used inside a subgraph
            return self.weights[value][0]
        arr = self.const_of(value)
        if arr is None:
            raise UnsupportedError(f"value '{value.name}' is used before it is produced")
        if arr.size > PARAM_MIN_ELEMENTS:
            name = helpers.safe_name(value.name, "w")
            var = relax.Var(name, relax.TensorType(arr.shape, _dtype_str(arr)))
            self.weights[value] = (var, arr)
            expr = var
        else:
            expr = helpers.const(arr, _dtype_str(arr))
        self.env[value] = expr
        return expr

    def _dim(self, d, value_name: str, axis: int):
        if isinstance(d, int) and d >= 0:
            return d
        name = helpers.safe_name(str(d.value) if getattr(d, "value", None) else "", "")
        if not name:
            name = f"{helpers.safe_name(value_name)}_dim{axis}"
        if name not in self.sym_dims:
            self.sym_dims[name] = tvm.tirx.Var(name, "int64")
        return self.sym_dims[name]

    def input_var(self, value: ir.Value) -> relax.Var:
        dtype = helpers.relax_dtype(value.dtype)
        if dtype is None:
            raise UnsupportedError(f"input '{value.name}': dtype {value.dtype} is not supported by Relax")
        if value.shape is None:
            raise UnsupportedError(f"input '{value.name}' has no shape (rank unknown); give it one with --input-shape")
        dims = [self._dim(d, value.name, i) for i, d in enumerate(value.shape)]
        return relax.Var(helpers.safe_name(value.name, "x"), relax.TensorType(dims, dtype))

    # ---------------------------------------------------------------- nodes
    def lower_nodes(self, graph: ir.Graph) -> None:
        for node in graph:
            self.lower_node(node)

    def lower_node(self, node: ir.Node) -> None:
        opset = _opset_of(node, self.opsets)
        domain = "" if node.domain == "ai.onnx" else node.domain
        if self._try_fold(node, domain, opset):
            return
        rule = find_rule(domain, node.op_type, opset)
        name = node.name or node.op_type
        if rule is None:
            raise UnsupportedError(f"node '{name}' ({node.op_type}): {_why_unsupported(domain, node.op_type, opset)}")
        inputs = [self.expr_of(v) for v in node.inputs]
        ctx = LowerContext(self, node, opset, inputs)
        try:
            self._bind_outputs(node, rule.fn(ctx, inputs))
        except GraphoptError:
            raise
        except Exception as exc:  # a TVM/numpy error from bad shapes or attributes: one line for the user
            msg = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            msg = re.sub(r"In ir\.Op\(.*?support_level=\d+\),\s*", "", msg[0].strip() if msg else "")
            msg = msg or type(exc).__name__
            raise UnsupportedError(f"node '{ctx.name}' ({node.op_type}): cannot lower: {msg[:300]}") from exc

    def _bind_outputs(self, node: ir.Node, result) -> None:
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        for j, out in enumerate(node.outputs):
            if j >= len(results) or results[j] is None or not out.name:
                continue
            expr = results[j]
            if not isinstance(expr, (relax.Var, helpers.Constant)):
                expr = self.bb.emit(expr, name_hint=helpers.safe_name(out.name, "t"))
            self.env[out] = expr
            if isinstance(expr, helpers.Constant):
                self.consts[out] = helpers.const_value(expr)

    def _try_fold(self, node: ir.Node, domain: str, opset: int) -> bool:
        """Evaluate a small all-constant node (and Shape/Size of a static tensor) in numpy."""
        if domain != "" or node.op_type in _NO_FOLD:
            return False
        if node.op_type == "Constant" and not any(a.is_ref() for a in node.attributes.values()):
            arr = _constant_attr(node)
            if arr is not None:
                self._set_const(node.outputs[0], arr)
                return True
        if node.op_type in ("Shape", "Size") and node.inputs and node.inputs[0] in self.env:
            shape = helpers.static_shape(self.env[node.inputs[0]])
            if shape is None:
                return False
            if node.op_type == "Size":
                value = np.array(helpers.numel(shape), dtype=np.int64)
            else:
                start = node.attributes.get("start")
                end = node.attributes.get("end")
                rank = len(shape)
                s = 0 if start is None else int(start.value)
                e = rank if end is None else int(end.value)
                s, e = (min(max(x + rank if x < 0 else x, 0), rank) for x in (s, e))
                value = np.array(shape[s:e], dtype=np.int64)
            self._set_const(node.outputs[0], value)
            return True
        arrays = []
        for v in node.inputs:
            if v is None:
                arrays.append(None)
                continue
            arr = self.const_of(v)
            if arr is None:
                return False
            arrays.append(arr)
        if sum(a.size for a in arrays if a is not None) > FOLD_MAX_ELEMENTS:
            return False
        if any(a is not None and a.dtype.kind in "OSU" for a in arrays):
            return False
        if any(a.type == ir.AttributeType.GRAPH or a.is_ref() for a in node.attributes.values()):
            return False
        try:
            outs = _reference_eval(node, opset, arrays)
        except Exception:  # the reference cannot evaluate it: lower it instead
            return False
        produced = [(v, o) for v, o in zip(node.outputs, outs) if v.name]
        if any(o is None or o.size > FOLD_MAX_ELEMENTS or o.dtype.kind in "OSUc" for _, o in produced):
            return False
        for value, arr in produced:
            self._set_const(value, arr)
        return True

    def _set_const(self, value: ir.Value, arr: np.ndarray) -> None:
        self.consts[value] = arr  # its Relax expression is made on first use (expr_of)

    # ---------------------------------------------------------------- subgraphs
    def lower_subgraph(self, graph: ir.Graph, inputs: list[relax.Expr]) -> list[relax.Expr]:
        self.env = self.env.new_child()
        self.consts = self.consts.new_child()
        try:
            for value, expr in zip(graph.inputs, inputs):
                self.env[value] = expr
                if isinstance(expr, helpers.Constant):  # e.g. an unrolled Loop's iteration number
                    self.consts[value] = helpers.const_value(expr)
            for init in graph.initializers.values():
                if init.const_value is not None:
                    self.consts[init] = _storage(init.const_value.numpy())
            self.lower_nodes(graph)
            return [self.expr_of(v) for v in graph.outputs]
        finally:
            self.env = self.env.parents
            self.consts = self.consts.parents


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    """A Constant node's value (None for string and sparse values: the rule reports those)."""
    for name, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        attr = node.attributes.get(name)
        if attr is not None:
            arr = attr_value(attr) if dtype is None else np.array(attr_value(attr), dtype)
            return None if arr.dtype.kind in "OSU" else np.asarray(arr)
    return None


_NARROW_STORAGE = {"int4": np.int8, "int2": np.int8, "uint4": np.uint8, "uint2": np.uint8}


def _storage(arr: np.ndarray) -> np.ndarray:
    """4- and 2-bit integer constants (ml_dtypes) held one value a byte, as ``helpers.NARROW_INTS`` says."""
    storage = _NARROW_STORAGE.get(arr.dtype.name)
    return arr.astype(storage) if storage is not None else arr


def _dtype_str(arr: np.ndarray) -> str:
    if arr.dtype == np.bool_:
        return "bool"
    return "bfloat16" if arr.dtype.name == "bfloat16" else str(arr.dtype)


def _reference_eval(node: ir.Node, opset: int, arrays: list[np.ndarray | None]) -> list[np.ndarray]:
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    outs = [f"o{k}" if v is not None and v.name else "" for k, v in enumerate(node.outputs)]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outs if o],
        initializer=[onnx.numpy_helper.from_array(a, n) for a, n in zip(arrays, names) if a is not None],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    results = ReferenceEvaluator(model).run(None, {})
    it = iter(results)
    return [np.asarray(next(it)) if o else None for o in outs]


def _unique_names(weights: list[tuple[str, Any, np.ndarray]]) -> list[tuple[str, Any, np.ndarray]]:
    """Weights keyed by value name, made unique: an If's two branches may each hold an initializer of the
    same name (``params`` must keep one entry per weight parameter of ``main``)."""
    seen: set[str] = set()
    out = []
    for name, var, arr in weights:
        key, k = name, 1
        while key in seen:
            key, k = f"{name}__{k}", k + 1
        seen.add(key)
        out.append((key, var, arr))
    return out


def _named_shape(expr) -> tuple | None:
    """A Relax tensor's shape: ints, a symbolic dim's name (``seq``), None for other expressions."""
    shape, values = helpers.shape_of(expr), helpers.dims_of(expr)
    if shape is None or values is None:
        return shape
    return tuple(d if d is not None else (v.name if isinstance(v, tvm.tirx.Var) else None)
                 for d, v in zip(shape, values))


def _output_shape(expr) -> tuple | None:
    """``_named_shape``, or None when a dim is neither known nor named: an If whose branches return
    different shapes (a merged decoder's cached and uncached branches) is known only at run time."""
    shape = _named_shape(expr)
    if shape is None:
        return ()
    return None if any(d is None for d in shape) else shape


def lower(model: ir.Model) -> Lowered:
    """Lower a whole model to a Relax IRModule (see :class:`Lowered`)."""
    check_supported(model)
    low = _Lowerer(model)
    graph = model.graph
    init_names = set(graph.initializers)
    data_inputs = [v for v in graph.inputs if v.name not in init_names]
    in_vars = [low.input_var(v) for v in data_inputs]
    for v, var in zip(data_inputs, in_vars):
        low.env[v] = var
    for v in graph.inputs:  # an input with an initializer (IR < 4): its default is a weight
        if v.name in init_names and v not in low.env and v.const_value is None:
            low.consts[v] = _storage(graph.initializers[v.name].const_value.numpy())
    with low.bb.function("main"):
        low.lower_nodes(graph)
        outs = [low.expr_of(v) for v in graph.outputs]
        out_exprs = [low.bb.emit(o) if isinstance(o, helpers.Constant) else o for o in outs]
        result = out_exprs[0] if len(out_exprs) == 1 else low.bb.emit(relax.Tuple(out_exprs))
        weights = _unique_names([(value.name, var, arr) for value, (var, arr) in low.weights.items()])
        params = in_vars + [var for _, var, _ in weights]
        low.bb.emit_func_output(result, params=params)
    mod = low.bb.get()
    mod = relax.transform.ConvertToDataflow(min_size=1)(mod)
    mod["main"] = mod["main"].with_attr("num_input", len(in_vars))
    mod = relax.transform.Normalize()(mod)
    outputs = [(v.name, _output_shape(e), helpers.dtype_of(e)) for v, e in zip(graph.outputs, out_exprs)]
    inputs = [(v.name, _named_shape(var), helpers.dtype_of(var)) for v, var in zip(data_inputs, in_vars)]
    return Lowered(
        mod=mod,
        params={name: arr for name, _, arr in weights},
        inputs=inputs,
        outputs=outputs,
    )

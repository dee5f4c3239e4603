"""The graph verifier: the invariants every pass may rely on, checked after every pass in the tests.

``verify(model)`` raises :class:`~graphopt.core.errors.VerificationError` naming the first broken node
and value, e.g. ``node 'conv1' (Conv): input 'x7' is used but never defined``. Checked:

* every value a node reads is defined before it: a graph input, an initializer, an earlier node's
  output, or (inside an If/Loop/Scan body) a value of an enclosing graph defined before the node that
  holds the body; a read of a later value is reported as a cycle when there is one, otherwise as
  nodes out of topological order;
* value names are unique within a graph; every graph output is produced; initializers have data;
* every op exists in the opset the model imports for its domain (``onnx.defs``), with its required
  inputs and attributes, no more inputs/outputs than it takes, and only attributes it knows, of the
  right type; a custom domain must be imported by the model (or the op be a model-local function);
  graphopt's own domain is allowed;
* with ``check_types``: dtypes and shapes recorded in the IR agree with ONNX shape inference where
  both are known (skipped for models with more than 1.5 GB of weights).

Model-local functions are checked like graphs. Nothing is mutated.
"""

from __future__ import annotations

import dataclasses
import functools

import onnx
import onnx_ir as ir

from graphopt.core.analysis import find_cycle, subgraphs_of
from graphopt.core.errors import VerificationError

GRAPHOPT_DOMAIN = "graphopt"
_TYPE_CHECK_MAX_WEIGHT_BYTES = 1_500_000_000
_ONNX_DOMAINS = frozenset(s.domain for s in onnx.defs.get_all_schemas_with_history())


def _norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _domain_label(domain: str) -> str:
    return domain or "ai.onnx"


def node_label(node: ir.Node, index: int | None = None) -> str:
    """``node 'conv1' (Conv)``; the op is domain-qualified outside the default domain."""
    name = node.name or (f"#{index}" if index is not None else "<unnamed>")
    op = node.op_type if _norm_domain(node.domain) == "" else f"{node.domain}::{node.op_type}"
    return f"node '{name}' ({op})"


@dataclasses.dataclass(frozen=True)
class _Signature:
    """What a node of one op at one opset must look like (from its ONNX schema)."""

    problem: str | None = None  # the op itself is not usable at this opset
    required_inputs: tuple[tuple[int, str], ...] = ()
    max_inputs: int = 0
    max_outputs: int = 0
    attributes: dict = dataclasses.field(default_factory=dict)  # name -> (AttributeType int, required)


@functools.lru_cache(maxsize=4096)
def _signature(op_type: str, domain: str, version: int) -> _Signature:
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        if onnx.defs.has(op_type, domain):
            first = min(
                s.since_version
                for s in onnx.defs.get_all_schemas_with_history()
                if s.name == op_type and s.domain == domain
            )
            return _Signature(f"op needs {_domain_label(domain)} opset >= {first}, the model imports {version}")
        return _Signature(f"unknown op in {_domain_label(domain)} opset {version}")
    if schema.deprecated:
        return _Signature(f"op is deprecated in {_domain_label(domain)} opset {version}")
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    return _Signature(
        None,
        tuple((i, p.name) for i, p in enumerate(schema.inputs) if p.option == single),
        schema.max_input,
        schema.max_output,
        {name: (int(a.type), a.required) for name, a in schema.attributes.items()},
    )


def _signature_problem(node: ir.Node, sig: _Signature) -> str | None:
    """How ``node`` breaks its op's signature: missing/extra inputs, outputs or attributes."""
    inputs = node.inputs
    for i, name in sig.required_inputs:
        if i >= len(inputs) or inputs[i] is None:
            return f"required input #{i} ({name}) is missing"
    n_in = len(inputs)
    while n_in and inputs[n_in - 1] is None:
        n_in -= 1
    if n_in > sig.max_inputs:
        return f"has {n_in} inputs, the op takes at most {sig.max_inputs}"
    n_out = sum(1 for v in node.outputs if v.name != "")
    if n_out > sig.max_outputs:
        return f"has {n_out} outputs, the op has at most {sig.max_outputs}"
    attrs = node.attributes
    for name, attr in attrs.items():
        spec = sig.attributes.get(name)
        if spec is None:
            return f"unknown attribute '{name}'"
        if not attr.is_ref() and attr.type.value != spec[0]:
            return f"attribute '{name}' is {attr.type.name}, the op expects {ir.AttributeType(spec[0]).name}"
    for name, (_, required) in sig.attributes.items():
        if required and name not in attrs:
            return f"required attribute '{name}' is missing"
    return None


class _Checker:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.functions = {f.identifier() for f in model.functions.values()}

    # --- ops ---------------------------------------------------------------------------------
    def check_op(self, node: ir.Node, index: int, opsets: dict[str, int], where: str) -> None:
        domain = _norm_domain(node.domain)
        if (node.domain, node.op_type, node.overload) in self.functions or domain == GRAPHOPT_DOMAIN:
            return
        version = opsets.get(domain)
        if version is None:
            raise VerificationError(
                f"{node_label(node, index)}{where}: domain '{_domain_label(domain)}' is not imported by the model",
                node=node.name,
            )
        if domain not in _ONNX_DOMAINS:
            return  # a custom domain the model declares: its ops cannot be checked here
        sig = _signature(node.op_type, domain, version)
        problem = sig.problem or _signature_problem(node, sig)
        if problem:
            raise VerificationError(f"{node_label(node, index)}{where}: {problem}", node=node.name)

    # --- graphs ------------------------------------------------------------------------------
    def check_graph(
        self,
        graph: ir.Graph | ir.Function,
        opsets: dict[str, int],
        outer: tuple[set, ...] = (),
        where: str = "",
    ) -> None:
        defined: set[ir.Value] = set()
        names: dict[str, str] = {}

        def define(v: ir.Value, what: str, node: ir.Node | None = None) -> None:
            if v.name:  # an omitted optional output has the empty name
                if v.name in names:
                    raise VerificationError(
                        f"{what}{where}: value name '{v.name}' is already used by {names[v.name]}",
                        node=None if node is None else node.name,
                        value=v.name,
                    )
                names[v.name] = what
            defined.add(v)

        for v in graph.inputs:
            define(v, f"graph input '{v.name}'")
        for name, v in getattr(graph, "initializers", {}).items():
            if v in defined:
                continue  # an input with a default value
            if v.const_value is None:
                raise VerificationError(f"initializer '{name}'{where} has no data", value=name)
            define(v, f"initializer '{name}'")

        nodes = list(graph)
        position = {n: i for i, n in enumerate(nodes)}
        for i, node in enumerate(nodes):
            self.check_op(node, i, opsets, where)
            for v in node.inputs:
                if v is not None and v not in defined and not any(v in s for s in outer):
                    self._undefined(graph, node, i, v, position, where)
            for sub in subgraphs_of(node):
                label = f"{node_label(node, i)}{where}"
                self.check_graph(sub, opsets, (*outer, defined), f" in subgraph '{sub.name}' of {label}")
            for v in node.outputs:
                define(v, f"{node_label(node, i)}", node)
        for v in graph.outputs:
            if v not in defined and not any(v in s for s in outer):
                p = v.producer()
                by = f" (its producer {node_label(p)} is not in this graph)" if p is not None else ""
                raise VerificationError(f"graph output '{v.name}'{where} is never produced{by}", value=v.name)

    def _undefined(self, graph, node: ir.Node, index: int, v: ir.Value, position: dict, where: str):
        head = f"{node_label(node, index)}{where}: input '{v.name}'"
        p = v.producer()
        if p is not None and p in position:
            cycle = find_cycle(graph)
            if cycle is not None:
                raise VerificationError(
                    f"{head} closes a cycle: {' -> '.join(cycle)}", node=node.name, value=v.name
                )
            raise VerificationError(
                f"{head} is used before {node_label(p, position[p])} defines it (nodes are not in topological order)",
                node=node.name,
                value=v.name,
            )
        if p is not None:
            raise VerificationError(
                f"{head} is produced by {node_label(p)}, which is not in scope here", node=node.name, value=v.name
            )
        if v.is_initializer() or v.is_graph_input():
            raise VerificationError(
                f"{head} belongs to another graph and is not in scope here", node=node.name, value=v.name
            )
        raise VerificationError(f"{head} is used but never defined", node=node.name, value=v.name)


def _opsets(imports: dict[str, int]) -> dict[str, int]:
    return {_norm_domain(d): v for d, v in imports.items()}


def verify(model: ir.Model, *, check_types: bool = True) -> None:
    """Raise :class:`VerificationError` if ``model`` breaks an invariant (see the module docstring)."""
    checker = _Checker(model)
    opsets = _opsets(model.opset_imports)
    checker.check_graph(model.graph, opsets)
    for f in model.functions.values():
        f_opsets = {**opsets, **_opsets(f.opset_imports)}
        checker.check_graph(f, f_opsets, where=f" in function '{f.domain}::{f.name}'")
    if check_types:
        check_types_against_inference(model)


def check_types_against_inference(model: ir.Model) -> None:
    """Compare the dtypes/shapes the IR records with ONNX shape inference; raise on the first conflict."""
    from graphopt.core.io import weight_bytes
    from graphopt.core.shapes import _from_type_proto, onnx_inferred_types

    if weight_bytes(model) > _TYPE_CHECK_MAX_WEIGHT_BYTES:
        return
    inferred = onnx_inferred_types(model, keep_value_info=False, strict=False, data_prop=False, raw=True)
    if inferred is None:
        return  # inference itself failed: the structural checks above are what we can say
    for graph in (model.graph, *model.graph.subgraphs()):
        for i, node in enumerate(graph):
            for v in node.outputs:
                tp = inferred.get(v)
                if tp is not None and tp.HasField("tensor_type") and _conflicts(v, tp.tensor_type):
                    typ, shape = _from_type_proto(tp)
                    raise VerificationError(
                        f"{node_label(node, i)}: output '{v.name}' is recorded as {_fmt(v.dtype, v.shape)}"
                        f" but shape inference gives {_fmt(typ.dtype if typ else None, shape)}",
                        node=node.name,
                        value=v.name,
                    )


def _conflicts(v: ir.Value, tt) -> bool:
    """Whether ONNX's inferred tensor type ``tt`` contradicts what the IR records for ``v``."""
    if not isinstance(v.type, ir.TensorType):
        return False
    if tt.elem_type and v.type.dtype.value != tt.elem_type:
        return True
    shape = v.shape
    if shape is None or not tt.HasField("shape"):
        return False
    dims = tt.shape.dim
    if len(dims) != len(shape):
        return True
    for d, mine in zip(dims, shape):
        if isinstance(mine, int) and d.HasField("dim_value") and d.dim_value != mine:
            return True
    return False


def dtype_name(dtype: ir.DataType) -> str:
    """numpy's name where there is one (float32, int64), else ONNX's in lower case (bfloat16)."""
    try:
        return dtype.numpy().name
    except Exception:
        return dtype.name.lower()


def _fmt(dtype, shape) -> str:
    d = "?" if dtype is None else dtype_name(dtype)
    s = "" if shape is None else "[" + ",".join(str(x) for x in shape) + "]"
    return d + s

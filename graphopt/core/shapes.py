"""Input-shape specialization and shape inference.

* :func:`parse_input_shapes` reads ``--input-shape NAME:D0,D1,...`` specs.
* :func:`specialize` fixes graph-input dims, forgets recorded shapes the new sizes contradict (and
  recorded intermediate shapes that are not static), then runs :func:`infer_shapes`. When the new
  sizes make a node shape-invalid that was not before (typically inside an If branch those sizes
  never take, e.g. silero:vad's 8 kHz branch at 16 kHz sizes) it warns with :class:`ShapeWarning`:
  ONNX Runtime infers both branches at load time and refuses such a model.
* :func:`infer_shapes` records dtypes/shapes on every value: ONNX shape inference (with data
  propagation) over the whole model, then a walk that fills what ONNX leaves unknown on real models:
  shape tensors computed by Shape/Gather/Concat/Slice/Unsqueeze/Cast/arithmetic chains are evaluated
  statically (small tensors only) and handed, as known data, to ONNX's per-node inference of their
  consumers (Reshape, Expand, Resize, ConstantOfShape, Range, Tile, Slice...). The graph's structure is
  never changed: folding those chains is the constant-folding pass's job.
* :func:`infer_types` does the same without touching the model and returns ``{value: (type, shape)}``.

ONNX inference runs on a copy of the graph without large initializer data (they become typed inputs),
so models with external data or multi-GB weights never build a proto over 2 GB.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.analysis import captured_values, subgraphs_of
from graphopt.core.contrib_shapes import same_shape_outputs
from graphopt.core.errors import ShapeError
from graphopt.core.shape_eval import MAX_ELEMENTS, evaluate, known_constant

logger = logging.getLogger(__name__)

TypeAndShape = tuple["ir.TypeProtocol | None", "ir.Shape | None"]
# Initializers up to this size keep their data in the inference proto (data propagation uses them).
_KEEP_INITIALIZER_BYTES = 4096
_GENERATED_DIM = re.compile(r"^unk__\d+$")

# --- --input-shape ---------------------------------------------------------------------------


def parse_input_shapes(specs: Sequence[str] | Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """``["x:1,3,224,224", "mask:1,128"]`` (or ``{"x": [1, 3, 224, 224]}``) -> ``{"x": [1, 3, 224, 224]}``.

    The name is everything before the last ``:`` (so ``input:0:1,3`` names ``input:0``); an empty dim
    list (``sr:``) is a scalar. A dim may be a name (``input_ids:1,seq``): it stays symbolic, shared by
    every input that names it (compiling then needs its bound, ``--max seq=N``).
    """
    if not specs:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    out: dict[str, list[int]] = {}
    items = specs.items() if isinstance(specs, Mapping) else (_parse_one(s) for s in specs)
    for name, dims in items:
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
            raise ShapeError(f"input shape for '{name}': expected a list of ints, got {dims!r}")
        if not all(_dim_name(d) or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0)
                   for d in dims):
            raise ShapeError(f"input shape for '{name}': dims must be non-negative integers or names, got {list(dims)}")
        if name in out:
            raise ShapeError(f"input shape for '{name}' is given twice")
        out[name] = [d if isinstance(d, str) else int(d) for d in dims]
    return out


def parse_fixed_input_shapes(specs: Sequence[str] | Mapping[str, Sequence[int]] | None, *,
                             purpose: str) -> dict[str, list[int]]:
    """``parse_input_shapes`` for work that needs every dim fixed (``purpose`` says which, for the
    message): a symbolic dim name is refused with a ShapeError naming the input and the dim."""
    shapes = parse_input_shapes(specs)
    for name, dims in shapes.items():
        named = [d for d in dims if isinstance(d, str)]
        if named:
            raise ShapeError(f"--input-shape {name}: dim '{named[0]}' is a name; {purpose} needs numbers "
                             f"(symbolic dims are for compile, with --max {named[0]}=N)")
    return shapes


_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _dim_name(d) -> bool:
    """A symbolic dim given by name (``seq``): an identifier."""
    return isinstance(d, str) and bool(_DIM_NAME.match(d))


def _parse_one(spec: str) -> tuple[str, list[int]]:
    if not isinstance(spec, str):
        raise ShapeError(f"input shape {spec!r}: expected a string NAME:D0,D1,...")
    name, sep, dims_text = spec.strip().rpartition(":")
    if not sep or not name:
        raise ShapeError(f"input shape '{spec}': expected NAME:D0,D1,... (e.g. x:1,3,224,224)")
    dims_text = dims_text.strip()
    if not dims_text:
        return name, []
    dims = []
    for part in dims_text.split(","):
        part = part.strip()
        if _dim_name(part):
            dims.append(part)
            continue
        if not part.isdigit():
            raise ShapeError(f"input shape '{spec}': dim '{part}' is neither a non-negative integer nor a name")
        dims.append(int(part))
    return name, dims


def specialize(model: ir.Model, specs) -> ir.Model:
    """Fix the named graph inputs' shapes (in place), bind their symbolic dims elsewhere, infer shapes."""
    shapes = parse_input_shapes(specs)
    inputs = {v.name: v for v in model.graph.inputs}
    before = strict_inference_problem(model)
    bindings: dict[str, int] = {}
    for name, dims in shapes.items():
        v = inputs.get(name)
        if v is None:
            raise ShapeError(f"input shape for '{name}': the model has no input '{name}' (inputs: {', '.join(inputs)})")
        declared = v.shape
        if declared is not None:
            if len(declared) != len(dims):
                raise ShapeError(
                    f"input '{name}': declared with rank {len(declared)} {_fmt(declared)}, got {len(dims)} dims {dims}"
                )
            for i, (d, n) in enumerate(zip(declared, dims)):
                if _known(d) and isinstance(n, str):
                    raise ShapeError(f"input '{name}': dim {i} is declared {d}, it cannot be the symbolic '{n}'")
                if _known(d) and d != n:
                    raise ShapeError(f"input '{name}': dim {i} is declared {d}, got {n} ({_fmt(declared)} vs {dims})")
                if _named(d):
                    if bindings.setdefault(d.value, n) != n:
                        raise ShapeError(
                            f"input '{name}': dim {i} is '{d.value}', already fixed to {bindings[d.value]} by another input, got {n}"
                        )
        v.shape = ir.Shape([ir.SymbolicDim(n) if isinstance(n, str) else n for n in dims])
    for v in model.graph.inputs:  # other inputs sharing a symbolic dim with a fixed one
        if v.name not in shapes and v.shape is not None:
            v.shape = ir.Shape([_bound_dim(bindings.get(d.value, d)) if _named(d) else d for d in v.shape])
    _forget_stale_shapes(model)
    infer_shapes(model)
    if before is None:
        problem = strict_inference_problem(model)
        if problem is not None:
            warnings.warn(
                f"input shapes {' '.join(f'{k}:' + ','.join(map(str, d)) for k, d in shapes.items())} make {problem}"
                "; ONNX Runtime infers every If branch when it loads a model and refuses it, unless"
                " constant folding (-O2) removes that branch",
                ShapeWarning,
                stacklevel=2,
            )
    return model


class ShapeWarning(UserWarning):
    """Fixed input shapes make part of the model (typically an If branch they never take) shape-invalid."""


_INNERMOST = re.compile(r"\(op_type:(\w+)(?:, node name: ([^)]*))?\)")


def strict_inference_problem(model: ir.Model) -> str | None:
    """What ONNX's strict shape inference, given the shapes the IR records, rejects; None if nothing.

    ONNX Runtime runs the same inference over both branches of every If when it loads a model, so a
    problem here (even inside a branch the inputs never take) makes it refuse the model.
    """
    try:
        proto = _inference_proto(model, keep_value_info=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=False)
    except onnx.shape_inference.InferenceError as e:
        text = str(e)
        found = list(_INNERMOST.finditer(text))
        if not found:
            return text.splitlines()[0] if text else "shape inference failed"
        for match in found:  # the first error that is not a nested "Inference error(s)" of a subgraph
            why = re.sub(r"^[):\s]*(\[\w+\]\s*)?", "", text[match.end():]).strip()
            if not why.startswith("Inference error"):
                break
        op, name = match.groups()
        return f"node '{name or '<unnamed>'}' ({op}) shape-invalid: {why.splitlines()[0] if why else 'inference failed'}"
    except Exception as e:  # noqa: BLE001 - anything else is not a statement about the shapes
        logger.debug("strict inference could not run: %s", e)
    return None


def _forget_stale_shapes(model: ir.Model) -> None:
    """Drop recorded shapes that contradict inference from the new input shapes.

    Exporters sometimes record intermediate shapes traced with one example input; once the inputs
    are fixed to other sizes those records are wrong, and they would win over inference. A recorded
    intermediate shape with a symbolic or ``-1`` dim is dropped as well (inference recomputes it
    from the fixed inputs): ONNX inference stops inside a subgraph at the first node it cannot infer
    (an If branch the new sizes make dead), so a stale record there would survive the check below
    and conflict later, once a pass folds the node that stopped it.
    """
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            for v in node.outputs:
                # the main graph's outputs keep their declaration (ONNX requires one to be there)
                if v.shape is not None and not _is_static(v.shape) and not (graph is model.graph and v.is_graph_output()):
                    v.shape = None
    fresh = onnx_inferred_types(model, keep_value_info=False, raw=True)
    for v, tp in (fresh or {}).items():
        if v.shape is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            continue
        dims = tp.tensor_type.shape.dim
        if len(dims) != len(v.shape) or any(
            d.HasField("dim_value") and _known(mine) and d.dim_value != mine for d, mine in zip(dims, v.shape)
        ):
            v.shape = None


def _bound_dim(d):
    return ir.SymbolicDim(d) if isinstance(d, str) else d


def _named(d) -> bool:
    """A symbolic dim with a real name (shared by the inputs that use it); not '?' or onnx's unk__N."""
    return (
        isinstance(d, ir.SymbolicDim)
        and bool(d.value)
        and any(c.isalpha() for c in d.value)
        and not _GENERATED_DIM.match(d.value)
    )


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


# --- ONNX inference on a proto without large weights ------------------------------------------


def _inference_proto(model: ir.Model, *, keep_value_info: bool) -> onnx.ModelProto:
    graph = model.graph
    inputs = list(graph.inputs)
    kept = []
    for v in graph.initializers.values():
        t = v.const_value
        if t is not None and t.nbytes <= _KEEP_INITIALIZER_BYTES and not isinstance(t, ir.ExternalTensor):
            kept.append(v)
        elif not v.is_graph_input():
            if t is None and v.type is None:
                continue
            typ = v.type if t is None else ir.TensorType(t.dtype)
            shape = v.shape if t is None else ir.Shape(t.shape)
            inputs.append(ir.Value(name=v.name, type=typ, shape=shape))
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    if keep_value_info:
        view = ir.GraphView(inputs, graph.outputs, nodes=graph, initializers=kept, name=graph.name)
        ir.serde.serialize_graph_into(proto.graph, view, model_ir_version=model.ir_version)
    else:  # only what inference needs: typed inputs, small initializers, nodes, output names
        gp = proto.graph
        for v in inputs:
            ir.serde.serialize_value_into(gp.input.add(), v)
        for v in kept:
            v.const_value.name = v.name
            ir.serde.serialize_tensor_into(gp.initializer.add(), v.const_value)
        for node in graph:
            ir.serde.serialize_node_into(gp.node.add(), node, model_ir_version=model.ir_version)
        for v in graph.outputs:
            gp.output.add(name=v.name)
    for f in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(f))
    if not keep_value_info:
        _strip_value_info(proto.graph)
    return proto


def _strip_value_info(g: onnx.GraphProto) -> None:
    g.ClearField("value_info")
    for out in g.output:
        out.ClearField("type")
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _strip_value_info(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _strip_value_info(sub)


def _from_type_proto(tp: onnx.TypeProto) -> TypeAndShape:
    if tp.HasField("tensor_type"):  # the common case, read directly (fast)
        tt = tp.tensor_type
        typ = ir.TensorType(ir.DataType(tt.elem_type)) if tt.elem_type else None
        if not tt.HasField("shape"):
            return typ, None
        # onnx's generated names (unk__3) carry no meaning: unknown
        return typ, ir.Shape([
            d.dim_value if d.HasField("dim_value")
            else (d.dim_param if d.dim_param and not _GENERATED_DIM.match(d.dim_param) else None)
            for d in tt.shape.dim
        ])
    try:
        return ir.serde.deserialize_type_proto_for_type(tp), ir.serde.deserialize_type_proto_for_shape(tp)
    except Exception:  # map types and other exotic values
        return None, None


def _collect(graph: ir.Graph, gp: onnx.GraphProto, out: dict, *, main: bool, convert: bool) -> None:
    types = {vi.name: vi.type for part in (gp.input, gp.value_info, gp.output) for vi in part}
    conv = _from_type_proto if convert else (lambda tp: tp)
    if not main:
        for v in graph.inputs:
            if v.name in types:
                out[v] = conv(types[v.name])
    for node, np_ in zip(graph, gp.node):
        for v in node.outputs:
            tp = types.get(v.name)
            if tp is not None and tp.WhichOneof("value") is not None:
                out[v] = conv(tp)
        attrs = {a.name: a for a in np_.attribute}
        for name, attr in node.attributes.items():
            pa = attrs.get(name)
            if pa is None:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                _collect(attr.value, pa.g, out, main=False, convert=convert)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub, sp in zip(attr.value, pa.graphs):
                    _collect(sub, sp, out, main=False, convert=convert)


def onnx_inferred_types(
    model: ir.Model,
    *,
    keep_value_info: bool = True,
    strict: bool = False,
    data_prop: bool = True,
    raw: bool = False,
) -> dict[ir.Value, TypeAndShape] | dict[ir.Value, onnx.TypeProto] | None:
    """ONNX shape inference's view of every value (main graph and subgraphs); ``None`` if it fails.

    With ``keep_value_info=False`` the shapes the IR records are not given to ONNX, so the answer is
    independent of them (what the verifier compares against). ``raw=True`` gives ONNX's ``TypeProto``
    per value instead of ``(type, shape)`` (faster to compare). The model is not modified.
    """
    proto = _inference_proto(model, keep_value_info=keep_value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=strict, data_prop=data_prop)
    except Exception as e:
        logger.debug("onnx shape inference failed: %s", e)
        return None
    out: dict[ir.Value, TypeAndShape] = {}
    _collect(model.graph, inferred.graph, out, main=True, convert=not raw)
    return out


# --- merging and the gap-filling walk ---------------------------------------------------------


class _Types:
    """An overlay of inferred types/shapes over what the IR records (the IR itself is not touched)."""

    def __init__(self) -> None:
        self.values: dict[ir.Value, TypeAndShape] = {}

    def get(self, v: ir.Value) -> TypeAndShape:
        return self.values.get(v, (v.type, v.shape))

    def merge(self, v: ir.Value, typ, shape) -> None:
        old_type, old_shape = self.get(v)
        new_shape = _merge_shape(old_shape, shape)
        new_type = old_type if old_type is not None else typ
        if new_type is not old_type or new_shape is not old_shape:
            self.values[v] = (new_type, new_shape)


def _merge_shape(old: ir.Shape | None, new: ir.Shape | None) -> ir.Shape | None:
    """``new`` where it says more than ``old`` (never over a conflicting rank or static dim)."""
    if new is None:
        return old
    if old is None:
        return new
    if len(old) != len(new):
        return old
    dims, changed = [], False
    for a, b in zip(old, new):
        anonymous = not isinstance(a, int) and a.value is None
        if not _known(a) and (_known(b) or (anonymous and isinstance(b, ir.SymbolicDim) and b.value is not None)):
            dims.append(b)
            changed = True
        else:
            dims.append(a)
    return ir.Shape(dims) if changed else old


def _known(d) -> bool:
    """A static dim (some exporters write -1 for a dynamic one)."""
    return isinstance(d, int) and d >= 0


def _is_static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(_known(d) for d in shape)


@functools.lru_cache(maxsize=2048)
def _schema(op_type: str, domain: str, version: int):
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except Exception:
        return None


class _GapFiller:
    def __init__(self, model: ir.Model, types: _Types) -> None:
        self.model = model
        self.types = types
        self.opsets = {("" if d == "ai.onnx" else d): v for d, v in model.opset_imports.items()}
        self.opset_protos = [onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        self.known: dict[ir.Value, np.ndarray] = {}

    def walk(self, graph: ir.Graph) -> None:
        for v in graph.initializers.values():
            arr = known_constant(v)
            if arr is not None:
                self.known[v] = arr
        for node in graph:
            for sub in subgraphs_of(node):
                self.walk(sub)
            self.visit(node)

    def visit(self, node: ir.Node) -> None:
        inputs = [None if v is None else self.known.get(v) for v in node.inputs]
        shapes = [None if v is None else self.types.get(v)[1] for v in node.inputs]
        try:
            results = evaluate(node, inputs, shapes)
        except Exception as e:  # a bad graph: inference just stays unknown here
            logger.debug("evaluating %s failed: %s", node.name, e)
            results = None
        if results is not None:
            for v, arr in zip(node.outputs, results):
                if arr is not None and arr.size <= MAX_ELEMENTS:
                    self.known[v] = arr
                if arr is not None:
                    self.types.merge(v, ir.TensorType(ir.DataType.from_numpy(arr.dtype)), ir.Shape(arr.shape))
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and inputs[0] is not None:
            self.take_branch(node, bool(np.asarray(inputs[0]).reshape(-1)[0]))
        if all(_is_static(self.types.get(v)[1]) for v in node.outputs):
            return
        for v, (typ, shape) in self.infer_node(node).items():
            self.types.merge(v, typ, shape)

    def take_branch(self, node: ir.Node, cond: bool) -> None:
        """An If whose condition is known statically has the types (and data) of that branch's outputs."""
        branch = node.attributes.get("then_branch" if cond else "else_branch")
        if branch is None:
            return
        for v, out in zip(node.outputs, branch.value.outputs):
            self.types.merge(v, *self.types.get(out))
            if out in self.known:
                self.known[v] = self.known[out]

    def infer_node(self, node: ir.Node) -> dict[ir.Value, TypeAndShape]:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = self.opsets.get(domain)
        schema = _schema(node.op_type, domain, version) if version is not None else None
        if schema is None:  # ONNX knows no com.microsoft op; some keep their input's shape
            if not node.inputs or node.inputs[0] is None:
                return {}
            same = self.types.get(node.inputs[0])
            return {node.outputs[i]: same for i in same_shape_outputs(domain, node.op_type)
                    if i < len(node.outputs) and node.outputs[i] is not None}
        input_types, input_data = {}, {}
        for v in (*node.inputs, *captured_values(node)):
            if v is None:
                continue
            typ, shape = self.types.get(v)
            if typ is None:
                return {}
            tp = onnx.TypeProto()
            ir.serde.serialize_type_into(tp, typ)
            if shape is not None:
                ir.serde.serialize_shape_into(tp, shape)
            input_types[v.name] = tp
            if v in self.known:
                input_data[v.name] = onnx.numpy_helper.from_array(self.known[v], v.name)
        try:
            out = onnx.shape_inference.infer_node_outputs(
                schema, ir.serde.serialize_node(node), input_types, input_data,
                opset_imports=self.opset_protos, ir_version=self.model.ir_version,
            )
        except Exception as e:
            logger.debug("per-node inference of %s failed: %s", node.name, e)
            return {}
        return {v: _from_type_proto(out[v.name]) for v in node.outputs if v.name in out}


def infer_types(model: ir.Model) -> dict[ir.Value, TypeAndShape]:
    """Types and shapes inference finds for the model's values, without modifying the model.

    Returns only values where it knows more than the IR records.
    """
    types = _Types()
    for v, (typ, shape) in (onnx_inferred_types(model) or {}).items():
        if not v.is_graph_input() or v.graph is not model.graph:
            types.merge(v, typ, shape)
    for graph in (model.graph, *model.graph.subgraphs()):
        for v in graph.initializers.values():
            if v.const_value is not None:
                types.merge(v, ir.TensorType(v.const_value.dtype), ir.Shape(v.const_value.shape))
    _GapFiller(model, types).walk(model.graph)
    return types.values


def infer_shapes(model: ir.Model) -> ir.Model:
    """Record inferred dtypes and shapes on the model's values (in place); returns the model."""
    for v, (typ, shape) in infer_types(model).items():
        if typ is not None:
            v.type = typ
        v.shape = shape
    return model

"""ONNX Runtime's flatbuffer model format (``.ort``) read back into an ONNX ``ModelProto``.

Some packages ship their models only as ``.ort`` files (ONNX Runtime's minimal-build format). The
flatbuffer holds the same graph as the ONNX file it was saved from: opset imports, initializers
(raw bytes), every value's type, nodes with their attributes and subgraphs (If/Loop/Scan bodies).
This module reads it with the schema bindings that ship in the ``onnxruntime`` wheel
(``onnxruntime.tools.ort_format_model``) and writes an equivalent ONNX model:

    >>> from graphopt.models.ort_format import ort_to_onnx
    >>> proto = ort_to_onnx("encoder_model.ort")

Nodes are written in a topological order (ONNX requires one; the flatbuffer keeps ORT's node indices).
Runtime optimisation records and kernel hashes have no ONNX equivalent and are dropped; a model with
sparse initializers or externally stored tensor data is refused with a :class:`GraphoptError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

from graphopt.core.errors import GraphoptError

_ATTR = {1: "F", 2: "I", 3: "S", 4: "T", 5: "G", 6: "FLOATS", 7: "INTS", 8: "STRINGS", 9: "TENSORS", 10: "GRAPHS"}


def _fbs():
    """The flatbuffer schema classes of the installed onnxruntime wheel."""
    try:
        import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ort_flatbuffers_py on sys.path
        import ort_flatbuffers_py.fbs as fbs
    except ImportError as e:
        raise GraphoptError(f"reading .ort models needs the onnxruntime wheel's flatbuffer schema: {e}") from None
    return fbs


def _s(b) -> str:
    return b.decode("utf-8") if isinstance(b, bytes) else (b or "")


class _Reader:
    def __init__(self, fbs, where: str):
        self.fbs = fbs
        self.where = where

    def tensor(self, t) -> onnx.TensorProto:
        name = _s(t.Name())
        if t.ExternalDataOffset() >= 0:
            raise GraphoptError(f"{self.where}: tensor {name!r} keeps its data outside the flatbuffer (not supported)")
        out = onnx.TensorProto(name=name, data_type=t.DataType())
        if t.DimsLength():
            out.dims.extend(int(d) for d in t.DimsAsNumpy())
        if t.StringDataLength():
            out.string_data.extend(t.StringData(j) for j in range(t.StringDataLength()))
        elif t.RawDataLength():
            out.raw_data = t.RawDataAsNumpy().tobytes()
        return out

    def type_proto(self, ti) -> onnx.TypeProto | None:
        if ti is None or ti.ValueType() != 1:  # tensor_type only
            return None
        tts = self.fbs.TensorTypeAndShape.TensorTypeAndShape()
        tts.Init(ti.Value().Bytes, ti.Value().Pos)
        shape = tts.Shape()
        dims = None
        if shape is not None:
            dims = []
            for j in range(shape.DimLength()):
                v = shape.Dim(j).Value()
                if v is None or v.DimType() == 0:
                    dims.append(None)
                elif v.DimType() == 1:
                    dims.append(int(v.DimValue()))
                else:
                    dims.append(_s(v.DimParam()))
        return helper.make_tensor_type_proto(tts.ElemType(), dims)

    def attribute(self, a) -> onnx.AttributeProto:
        name, kind = _s(a.Name()), _ATTR.get(a.Type())
        if kind == "F":
            return helper.make_attribute(name, float(a.F()), attr_type=onnx.AttributeProto.FLOAT)
        if kind == "I":
            return helper.make_attribute(name, int(a.I()), attr_type=onnx.AttributeProto.INT)
        if kind == "S":
            return helper.make_attribute(name, a.S() or b"", attr_type=onnx.AttributeProto.STRING)
        if kind == "T":
            return helper.make_attribute(name, self.tensor(a.T()))
        if kind == "G":
            return helper.make_attribute(name, self.graph(a.G(), name))
        if kind == "FLOATS":
            return helper.make_attribute(name, [float(x) for x in a.FloatsAsNumpy()] if a.FloatsLength() else [],
                                         attr_type=onnx.AttributeProto.FLOATS)
        if kind == "INTS":
            return helper.make_attribute(name, [int(x) for x in a.IntsAsNumpy()] if a.IntsLength() else [],
                                         attr_type=onnx.AttributeProto.INTS)
        if kind == "STRINGS":
            return helper.make_attribute(name, [a.Strings(j) for j in range(a.StringsLength())],
                                         attr_type=onnx.AttributeProto.STRINGS)
        if kind == "TENSORS":
            return helper.make_attribute(name, [self.tensor(a.Tensors(j)) for j in range(a.TensorsLength())])
        if kind == "GRAPHS":
            return helper.make_attribute(name, [self.graph(a.Graphs(j), name) for j in range(a.GraphsLength())])
        raise GraphoptError(f"{self.where}: attribute {name!r} has type {a.Type()}, which ONNX cannot hold")

    def node(self, n) -> onnx.NodeProto:
        if n.Type() != 0:
            raise GraphoptError(f"{self.where}: node {_s(n.Name())!r} is a fused ORT node (not an ONNX op)")
        node = helper.make_node(
            _s(n.OpType()),
            [_s(n.Inputs(j)) for j in range(n.InputsLength())],
            [_s(n.Outputs(j)) for j in range(n.OutputsLength())],
            name=_s(n.Name()) or None,
            domain=_s(n.Domain()) or None,
        )
        node.attribute.extend(self.attribute(n.Attributes(j)) for j in range(n.AttributesLength()))
        return node

    def graph(self, g, name: str) -> onnx.GraphProto:
        if g.SparseInitializersLength():
            raise GraphoptError(f"{self.where}: graph {name!r} has sparse initializers (not supported)")
        types = {}
        for j in range(g.NodeArgsLength()):
            arg = g.NodeArgs(j)
            types[_s(arg.Name())] = self.type_proto(arg.Type())
        nodes = [g.Nodes(j) for j in range(g.NodesLength())]
        protos = _topological([self.node(n) for n in nodes if n is not None])
        inits = [self.tensor(g.Initializers(j)) for j in range(g.InitializersLength())]
        init_names = {t.name for t in inits}

        def info(v: str) -> onnx.ValueInfoProto:
            vi = onnx.ValueInfoProto(name=v)
            if types.get(v) is not None:
                vi.type.CopyFrom(types[v])
            return vi

        inputs = [info(_s(g.Inputs(j))) for j in range(g.InputsLength())]
        inputs = [vi for vi in inputs if vi.name not in init_names]
        outputs = [info(_s(g.Outputs(j))) for j in range(g.OutputsLength())]
        return helper.make_graph(protos, name, inputs, outputs, initializer=inits)


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes ordered so that each comes after the producers of its inputs (stable otherwise)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done: list[bool] = [False] * len(nodes)
    order: list[onnx.NodeProto] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if done[i]:
                continue
            if expanded:
                done[i] = True
                order.append(nodes[i])
                continue
            stack.append((i, True))
            for v in reversed(_consumed(nodes[i])):
                p = producer.get(v)
                if p is not None and not done[p] and p != i:
                    stack.append((p, False))
    return order


def _consumed(node: onnx.NodeProto) -> list[str]:
    """The node's inputs and the outer-scope values its subgraphs read."""
    names = [v for v in node.input if v]
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [v for n in g.node for v in _consumed(n) if v not in inner]
    return names


def _domains(graph: onnx.GraphProto) -> set[str]:
    out = set()
    for n in graph.node:
        out.add(n.domain)
        for attr in n.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                out |= _domains(g)
    return out


def ort_to_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX model held in an ``.ort`` file."""
    fbs = _fbs()
    p = Path(path)
    try:
        buf = bytearray(p.read_bytes())
    except OSError as e:
        raise GraphoptError(f"cannot read {p}: {e.strerror}") from None
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise GraphoptError(f"{p}: not an ONNX Runtime (.ort) model")
    model = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model()
    if model is None or model.Graph() is None:
        raise GraphoptError(f"{p}: the .ort file holds no model graph")
    reader = _Reader(fbs, str(p))
    graph = reader.graph(model.Graph(), "main")
    used = _domains(graph) | {""}  # ORT lists every domain it knows; keep those the graph uses
    opsets = [helper.make_opsetid(_s(model.OpsetImport(j).Domain()), int(model.OpsetImport(j).Version()))
              for j in range(model.OpsetImportLength()) if _s(model.OpsetImport(j).Domain()) in used]
    proto = helper.make_model(graph, opset_imports=opsets,
                              ir_version=int(model.IrVersion()) or onnx.IR_VERSION)
    proto.producer_name = _s(model.ProducerName())
    proto.producer_version = _s(model.ProducerVersion())
    for j in range(model.MetadataPropsLength()):
        kv = model.MetadataProps(j)
        proto.metadata_props.add(key=_s(kv.Key()), value=_s(kv.Value()))
    return proto


def converted_name(ort_name: str, sha256: str) -> str:
    """The cache file name of an ``.ort`` model's ONNX form (the source's digest in it: never stale)."""
    stem = ort_name[: -len(".ort")] if ort_name.endswith(".ort") else ort_name
    return f"{stem}.{sha256[:12]}.onnx"


def cached_onnx(ort_path: Path, sha256: str) -> Path:
    """The ONNX form of a (verified) cached ``.ort`` model beside it, converted on first use and written
    atomically (two processes converting at once write the same bytes; the last rename wins)."""
    out = ort_path.with_name(converted_name(ort_path.name, sha256))
    if out.exists():
        return out
    import tempfile

    data = ort_to_onnx(ort_path).SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out

"""graphopt.core.verify: every broken graph is rejected with the node (and value) named; good graphs pass."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.core import io

from graphopt import models
from graphopt.core.errors import VerificationError
from graphopt.core.shapes import specialize
from graphopt.core.verify import verify


def parse(text: str) -> ir.Model:
    """A model from ONNX text, every node named ``<op>_<index>`` (subgraph nodes included)."""
    model = ir.from_onnx_text(text)
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        node.name = f"{node.op_type.lower()}_{i}"
    return model


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == name)


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] z) {
  y = Relu(x)
  w = Neg(y)
  z = Add(w, y)
}
"""


def rejects(model: ir.Model, *fragments: str, check_types: bool = True) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify(model, check_types=check_types)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert "\n" not in msg
    return info.value


def test_valid_chain_passes():
    verify(parse(CHAIN))


def test_cycle_is_named():
    m = parse(CHAIN)
    relu = node(m, "relu_0")
    relu.replace_input_with(0, node(m, "add_2").outputs[0])  # relu reads add's output: a cycle
    err = rejects(m, "node 'relu_0' (Relu)", "closes a cycle", "relu_0", "add_2")
    assert err.node == "relu_0"


def test_dangling_value():
    m = parse(CHAIN)
    node(m, "neg_1").replace_input_with(0, ir.Value(name="x7"))
    err = rejects(m, "node 'neg_1' (Neg): input 'x7' is used but never defined")
    assert (err.node, err.value) == ("neg_1", "x7")


def test_missing_initializer():
    m = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] z) <float[3] b = {1.0, 2.0, 3.0}> {
          z = Add(x, b)
        }
        """
    )
    verify(m)
    m.graph.initializers["b"].const_value = None
    err = rejects(m, "initializer 'b' has no data")
    assert err.value == "b"
    m.graph.initializers.pop("b")
    rejects(m, "node 'add_0' (Add): input 'b' is used but never defined")


def test_use_before_definition_without_cycle():
    m = parse(CHAIN)
    neg = node(m, "neg_1")
    m.graph.remove(neg)
    m.graph.insert_before(node(m, "relu_0"), neg)  # neg now runs before relu, which it reads
    rejects(m, "node 'neg_1' (Neg): input", "before node 'relu_0' (Relu) defines it", "topological order")


def test_unknown_op():
    m = parse(CHAIN)
    node(m, "neg_1").op_type = "Frobnicate"
    rejects(m, "node 'neg_1' (Frobnicate)", "unknown op in ai.onnx opset 17")


def test_op_from_a_later_opset():
    m = parse(CHAIN)
    node(m, "neg_1").op_type = "Gelu"  # Gelu arrived in opset 20
    rejects(m, "node 'neg_1' (Gelu)", "needs ai.onnx opset >= 20", "imports 17")


def test_op_removed_in_the_imported_opset():
    m = parse(CHAIN.replace('"" : 17', '"" : 11'))
    node(m, "neg_1").op_type = "Upsample"  # deprecated since opset 10
    rejects(m, "node 'neg_1' (Upsample)", "deprecated")


def test_signature_checks():
    m = parse(CHAIN)
    add = node(m, "add_2")
    add.resize_inputs(1)
    rejects(m, "node 'add_2' (Add): required input #1 (B) is missing")

    m = parse(CHAIN)
    node(m, "neg_1").attributes["alpha"] = ir.AttrFloat32("alpha", 0.5)
    rejects(m, "node 'neg_1' (Neg): unknown attribute 'alpha'")

    m = parse(CHAIN)
    node(m, "neg_1").op_type = "Softmax"
    verify(m)
    node(m, "neg_1").attributes["axis"] = ir.AttrFloat32("axis", 1.0)
    rejects(m, "node 'neg_1' (Softmax): attribute 'axis' is FLOAT, the op expects INT")

    m = parse(CHAIN)
    node(m, "neg_1").op_type = "Cast"
    rejects(m, "node 'neg_1' (Cast): required attribute 'to' is missing")

    m = parse(CHAIN)
    relu = node(m, "relu_0")
    relu.resize_inputs(2)
    relu.replace_input_with(1, m.graph.inputs[0])
    rejects(m, "node 'relu_0' (Relu): has 2 inputs, the op takes at most 1")


def test_custom_domains():
    m = parse(CHAIN)
    node(m, "neg_1").domain = "com.acme"
    rejects(m, "node 'neg_1' (com.acme::Neg)", "domain 'com.acme' is not imported")
    m.opset_imports["com.acme"] = 1
    verify(m, check_types=False)  # declared: accepted, it cannot be checked further
    node(m, "neg_1").domain = "graphopt"
    del m.opset_imports["com.acme"]
    verify(m, check_types=False)  # graphopt's own domain needs no declaration


def test_duplicate_value_names():
    m = parse(CHAIN)
    node(m, "neg_1").outputs[0].name = "y"
    rejects(m, "node 'neg_1' (Neg)", "value name 'y' is already used by node 'relu_0' (Relu)")


def test_graph_output_not_produced():
    m = parse(CHAIN)
    m.graph.outputs.append(ir.Value(name="nowhere", type=ir.TensorType(ir.DataType.FLOAT)))
    rejects(m, "graph output 'nowhere' is never produced")


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool c) => (float[2,3] z) {
  y = Relu(x)
  z = If(c) <then_branch = g1 () => (float[2,3] t) { t = Neg(y) },
             else_branch = g2 () => (float[2,3] e) { e = Abs(y) }>
  late = Sigmoid(x)
}
"""


def test_subgraph_reads_outer_values_defined_before():
    verify(parse(IF_MODEL))


def test_subgraph_uses_undefined_outer_value():
    m = parse(IF_MODEL)
    neg = node(m, "neg_2")
    neg.replace_input_with(0, ir.Value(name="outer_ghost"))
    err = rejects(m, "node 'neg_2' (Neg) in subgraph 'g1' of node 'if_1' (If)", "'outer_ghost' is used but never defined")
    assert err.node == "neg_2"


def test_subgraph_uses_outer_value_defined_after_its_node():
    m = parse(IF_MODEL)
    node(m, "abs_3").replace_input_with(0, node(m, "sigmoid_4").outputs[0])
    rejects(m, "node 'abs_3' (Abs) in subgraph 'g2' of node 'if_1' (If)", "input 'late'", "not in scope")


def test_loop_body_and_scan_pass():
    m = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x, int64 n) => (float[3] out) {
          cond = Constant <value = bool {1}> ()
          out = Loop(n, cond, x) <body = body (int64 i, bool c, float[3] acc) => (bool c2, float[3] acc2) {
              c2 = Identity(c)
              acc2 = Add(acc, x)
          }>
        }
        """
    )
    verify(m)
    node(m, "add_3").replace_input_with(1, ir.Value(name="lost"))
    rejects(m, "node 'add_3' (Add) in subgraph 'body' of node 'loop_1' (Loop)", "'lost'")

    scan = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] init, float[5,2] xs, float[2] bias) => (float[2] last, float[5,2] ys) {
          last, ys = Scan(init, xs) <num_scan_inputs = 1, body = step (float[2] s, float[2] x) => (float[2] s2, float[2] y) {
              t = Add(s, x)
              s2 = Add(t, bias)
              y = Identity(s2)
          }>
        }
        """
    )
    verify(scan)
    node(scan, "add_2").replace_input_with(1, ir.Value(name="bias_gone"))
    rejects(scan, "node 'add_2' (Add) in subgraph 'step' of node 'scan_0' (Scan)", "'bias_gone' is used but never defined")


def test_function_bodies_are_checked():
    m = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) { y = local.Twice(x) }
        <domain: "local", opset_import: ["" : 17]>
        Twice (a) => (b) { b = Add(a, a) }
        """
    )
    verify(m)
    f = next(iter(m.functions.values()))
    f[0].replace_input_with(1, ir.Value(name="ghost"))
    rejects(m, "in function 'local::Twice'", "'ghost' is used but never defined")


def test_shape_conflict_is_named():
    m = parse(CHAIN)
    node(m, "neg_1").outputs[0].shape = ir.Shape([5, 3])
    node(m, "neg_1").outputs[0].dtype = ir.DataType.FLOAT
    err = rejects(m, "node 'neg_1' (Neg): output 'w' is recorded as float32[5,3] but shape inference gives float32[2,3]")
    assert err.value == "w"
    verify(m, check_types=False)


def test_dtype_conflict_is_named():
    m = parse(CHAIN)
    node(m, "relu_0").outputs[0].dtype = ir.DataType.INT64
    rejects(m, "node 'relu_0' (Relu): output 'y' is recorded as int64 but shape inference gives float32[2,3]")


def test_symbolic_dims_are_not_conflicts():
    m = parse(CHAIN.replace("float[2,3] x", "float[N,3] x"))
    node(m, "relu_0").outputs[0].shape = ir.Shape(["N", 3])
    verify(m)


def test_real_models_pass_and_initializerless_models_too():
    path = onnx.__path__[0] + "/backend/test/data/light/light_squeezenet.onnx"
    verify(io.load(path))
    m = io.load(models.resolve("rapidocr:cls"))
    specialize(m, models.default_input_shapes("rapidocr:cls"))
    verify(m)


def test_verify_does_not_modify_the_model():
    m = io.load(models.resolve("rapidocr:cls"))
    before = ir.to_proto(m).SerializeToString()
    verify(m)
    assert ir.to_proto(m).SerializeToString() == before


def _chain_model(n: int) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    b = ir.Value(name="b", const_value=ir.tensor(np.ones(4, np.float32)))
    nodes, v = [], x
    for i in range(n):
        node_ = ir.Node("", "Add" if i % 2 else "Relu", [v, b] if i % 2 else [v], name=f"n{i}")
        nodes.append(node_)
        v = node_.outputs[0]
        v.name = f"v{i}"
    graph = ir.Graph([x], [v], nodes=nodes, initializers=[b], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def test_structural_checks_are_fast_on_1000_nodes():
    m = _chain_model(1000)
    verify(m, check_types=False)
    best = min(_timed(lambda: verify(m, check_types=False)) for _ in range(5))
    assert best < 0.05, f"structural verify of 1000 nodes took {best * 1000:.1f} ms"
    verify(m)  # with types: ONNX inference agrees with an unannotated graph


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# All 1,884 ONNX node conformance models must verify (no false alarms): checked, after shape
# inference, by tests/test_shapes.py::test_inferred_shapes_match_every_conformance_case.


def test_type_check_is_skipped_above_the_weight_limit(monkeypatch):
    import graphopt.core.verify as verify_module

    m = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] z) <float[3] b = {1.0, 2.0, 3.0}> { y = Relu(x) z = Add(y, b) }
        """
    )
    y = node(m, "relu_0").outputs[0]
    y.shape, y.dtype = ir.Shape([9, 9]), ir.DataType.FLOAT
    rejects(m, "recorded as float32[9,9]")
    monkeypatch.setattr(verify_module, "_TYPE_CHECK_MAX_WEIGHT_BYTES", 11)  # b has 12 bytes
    verify(m)  # structure only: a model this "large" is not serialized for ONNX inference

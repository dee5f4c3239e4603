"""graphopt.core.analysis: the networkx view and the algorithms on it, on small graphs and a real model."""

from __future__ import annotations

import networkx as nx
import onnx
import onnx_ir as ir

from graphopt.core import io
from graphopt.core.analysis import (
    captured_values,
    dominators,
    find_cycle,
    longest_path_length,
    to_networkx,
    topological_nodes,
    weakly_connected_components,
)


def parse(text: str) -> ir.Model:
    model = ir.from_onnx_text(text)
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        node.name = f"{node.op_type.lower()}_{i}"
    return model


DIAMOND = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] z) {
  a = Relu(x)
  b = Neg(a)
  c = Abs(a)
  d = Add(b, c)
  z = Mul(d, a)
}
"""


def test_view_layout():
    g = to_networkx(parse(DIAMOND).graph)
    assert g.nodes["input:x"]["kind"] == "input" and g.nodes["output:z"]["kind"] == "output"
    assert g.nodes["relu_0"] == {"kind": "node", "op_type": "Relu", "domain": "", "index": 0}
    assert g.edges["input:x", "relu_0"]["values"] == ["x"]
    assert g.edges["relu_0", "mul_4"]["values"] == ["a"]
    assert g.edges["mul_4", "output:z"]["values"] == ["z"]
    assert g.number_of_nodes() == 7 and g.number_of_edges() == 8
    assert nx.is_directed_acyclic_graph(g)


def test_view_is_rebuilt_from_the_ir():
    m = parse(DIAMOND)
    before = to_networkx(m.graph)
    neg = next(n for n in m.graph if n.op_type == "Neg")
    neg.replace_input_with(0, m.graph.inputs[0])
    after = to_networkx(m.graph)
    assert before.has_edge("relu_0", "neg_1") and not after.has_edge("relu_0", "neg_1")
    assert after.has_edge("input:x", "neg_1")


def test_unnamed_and_duplicate_names_get_unique_keys():
    m = parse(DIAMOND)
    m.graph[1].name = "same"
    m.graph[2].name = "same"
    m.graph[3].name = ""
    keys = set(to_networkx(m.graph).nodes)
    assert {"same#1", "same#2", "#3"} <= keys


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] z) {
  y = Relu(x)
  z = If(c) <then_branch = g1 () => (float[2] t) { t = Neg(y) },
             else_branch = g2 () => (float[2] e) { e = Abs(x) }>
}
"""


def test_captured_values_become_edges():
    m = parse(IF_MODEL)
    if_node = m.graph[1]
    assert [v.name for v in captured_values(if_node)] == ["y", "x"]
    g = to_networkx(m.graph)
    assert g.edges["relu_0", "if_1"]["captured"] is True
    assert g.edges["input:c", "if_1"]["captured"] is False
    m.graph.remove(m.graph[0])  # the If still reads y: now undefined, no edge, no crash
    assert not to_networkx(m.graph).has_edge("relu_0", "if_1")


def test_topological_nodes_and_cycles():
    m = parse(DIAMOND)
    order = [n.name for n in topological_nodes(m.graph)]
    assert order == ["relu_0", "neg_1", "abs_2", "add_3", "mul_4"]
    assert find_cycle(m.graph) is None
    add = next(n for n in m.graph if n.op_type == "Add")
    m.graph.remove(add)
    m.graph.insert_before(m.graph[0], add)  # out of order, still acyclic
    assert [n.name for n in topological_nodes(m.graph)][-2:] == ["add_3", "mul_4"]
    relu = next(n for n in m.graph if n.op_type == "Relu")
    relu.replace_input_with(0, add.outputs[0])  # relu -> neg -> add -> relu
    assert topological_nodes(m.graph) is None
    cycle = find_cycle(m.graph)
    assert cycle[0] == cycle[-1] and {"relu_0", "add_3"} <= set(cycle)


def test_dominators_components_and_critical_path():
    m = parse(DIAMOND)
    idom = dominators(m.graph)
    assert idom["add_3"] == "relu_0" and idom["neg_1"] == "relu_0" and idom["input:x"] is None
    assert longest_path_length(m.graph) == 4  # relu -> neg -> add -> mul
    assert weakly_connected_components(m.graph) == [{"relu_0", "neg_1", "abs_2", "add_3", "mul_4"}]
    two = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x, float[4] y) => (float[4] a, float[4] b) { a = Relu(x) b = Neg(y) }
        """
    )
    assert weakly_connected_components(two.graph) == [{"relu_0"}, {"neg_1"}]


def test_critical_path_agrees_with_networkx_on_a_real_model():
    m = io.load(onnx.__path__[0] + "/backend/test/data/light/light_inception_v1.onnx")
    g = to_networkx(m.graph)
    g.remove_nodes_from([v for v, k in g.nodes(data="kind") if k != "node"])
    assert longest_path_length(m.graph) == nx.dag_longest_path_length(g) + 1
    order = topological_nodes(m.graph)
    assert order == list(m.graph)  # a stored topological order is kept as is


def test_function_bodies_have_a_view_too():
    m = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) { y = local.Twice(x) }
        <domain: "local", opset_import: ["" : 17]>
        Twice (a) => (b) { t = Relu(a) b = Add(t, a) }
        """
    )
    f = next(iter(m.functions.values()))
    g = to_networkx(f)
    assert g.edges["input:a", "#0"]["values"] == ["a"] and g.has_edge("input:a", "#1")
    assert g.edges["#1", "output:b"]["values"] == ["b"]
    assert longest_path_length(f) == 2 and find_cycle(f) is None

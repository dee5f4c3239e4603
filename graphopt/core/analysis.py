"""Read-only graph analyses: a networkx view of an ``onnx_ir`` graph and a few classic algorithms.

The IR is always the source of truth: :func:`to_networkx` builds a fresh ``networkx.DiGraph`` every
time it is called and nothing here mutates the graph.

Vertices of the view are strings:

* a node is its name (``"#<index>"`` for a node without a name, ``"<name>#<index>"`` when the name
  is shared with another node), with attributes ``kind="node"``, ``op_type``, ``domain``, ``index``;
* a graph input is ``"input:<name>"`` (``kind="input"``), a graph output ``"output:<name>"``
  (``kind="output"``).

Every edge carries ``values``: the names of the values flowing along it (each once). A node whose subgraph
(If/Loop/Scan body) reads a value of the outer graph gets an edge from that value's producer too
(marked ``captured=True``), so the view orders it after the producer.
"""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import onnx_ir as ir

_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def subgraphs_of(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs held in the node's attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def captured_values(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing graphs read inside the node's subgraphs (at any depth), in first-use order."""
    inner: set[int] = set()
    found: dict[int, ir.Value] = {}

    def walk(graph: ir.Graph) -> None:
        for v in (*graph.inputs, *graph.initializers.values()):
            inner.add(id(v))
        for n in graph:
            for v in n.outputs:
                inner.add(id(v))
        for n in graph:
            for v in n.inputs:
                if v is not None and id(v) not in inner:
                    found.setdefault(id(v), v)
            for g in subgraphs_of(n):
                walk(g)
        for v in graph.outputs:
            if id(v) not in inner:
                found.setdefault(id(v), v)

    for g in subgraphs_of(node):
        walk(g)
    return list(found.values())


def node_keys(graph: ir.Graph | ir.Function) -> dict[ir.Node, str]:
    """A unique, readable string for every node of ``graph`` (not its subgraphs)."""
    counts: dict[str | None, int] = {}
    nodes = list(graph)
    for n in nodes:
        counts[n.name] = counts.get(n.name, 0) + 1
    keys = {}
    for i, n in enumerate(nodes):
        if not n.name:
            keys[n] = f"#{i}"
        elif counts[n.name] > 1:
            keys[n] = f"{n.name}#{i}"
        else:
            keys[n] = n.name
    return keys


def _node_inputs(node: ir.Node) -> Iterator[tuple[ir.Value, bool]]:
    for v in node.inputs:
        if v is not None:
            yield v, False
    for v in captured_values(node):
        yield v, True


def to_networkx(graph: ir.Graph | ir.Function) -> nx.DiGraph:
    """A new ``networkx.DiGraph`` of ``graph``'s nodes (see the module docstring for its layout)."""
    g = nx.DiGraph()
    keys = node_keys(graph)
    for v in graph.inputs:
        g.add_node(f"input:{v.name}", kind="input", value=v.name)
    for i, n in enumerate(graph):
        g.add_node(keys[n], kind="node", op_type=n.op_type, domain=n.domain, index=i)

    def add_edge(src: str, dst: str, value: ir.Value, captured: bool) -> None:
        if g.has_edge(src, dst):
            edge = g.edges[src, dst]
            if value.name not in edge["values"]:
                edge["values"].append(value.name)
            edge["captured"] &= captured
        else:
            g.add_edge(src, dst, values=[value.name], captured=captured)

    inputs = set(graph.inputs)

    def source_of(v: ir.Value) -> str | None:
        p = v.producer()
        if p is not None and p in keys:
            return keys[p]
        if v in inputs:
            return f"input:{v.name}"
        return None  # an initializer, an outer-scope value, or dangling

    for n in graph:
        for v, captured in _node_inputs(n):
            src = source_of(v)
            if src is not None:
                add_edge(src, keys[n], v, captured)
    for v in graph.outputs:
        out = f"output:{v.name}"
        g.add_node(out, kind="output", value=v.name)
        src = source_of(v)
        if src is not None:
            add_edge(src, out, v, False)
    return g


def topological_nodes(graph: ir.Graph | ir.Function) -> list[ir.Node] | None:
    """``graph``'s nodes in a topological order (stable: the stored order when it is one).

    Returns ``None`` when the nodes form a cycle. Captured values of subgraphs count as inputs.
    """
    nodes = list(graph)
    index = {n: i for i, n in enumerate(nodes)}
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = set()
        for v, _ in _node_inputs(n):
            p = v.producer()
            j = index.get(p) if p is not None else None
            if j is not None and j != i:
                d.add(j)
            elif j == i:
                return None  # a node reading its own output
        deps.append(d)
        for j in d:
            users[j].append(i)
    import heapq

    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    remaining = [len(d) for d in deps]
    order: list[ir.Node] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(nodes) else None


def find_cycle(graph: ir.Graph | ir.Function) -> list[str] | None:
    """The node keys (see :func:`node_keys`) of one cycle, first node repeated last; ``None`` if acyclic."""
    g = to_networkx(graph)
    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    cycle = [u for u, _ in edges]
    return [*cycle, cycle[0]]


def dominators(graph: ir.Graph | ir.Function) -> dict[str, str | None]:
    """Immediate dominator of every node reachable from the graph inputs (``None`` for the roots).

    A virtual root feeds every graph input and every node without a node or input predecessor
    (e.g. nodes reading only initializers), so every node is reachable.
    """
    g = to_networkx(graph)
    root = ("root",)
    g.add_node(root)
    for v, deg in list(g.in_degree()):
        if v is not root and deg == 0:
            g.add_edge(root, v)
    idom = nx.immediate_dominators(g, root)
    return {v: (None if d is root else d) for v, d in idom.items() if v is not root}


def weakly_connected_components(graph: ir.Graph | ir.Function) -> list[set[str]]:
    """Groups of node keys connected by data flow, largest first, then in graph order (no inputs/outputs)."""
    g = to_networkx(graph)
    g.remove_nodes_from([v for v, k in g.nodes(data="kind") if k != "node"])
    first = g.nodes(data="index")
    return sorted(
        (set(c) for c in nx.weakly_connected_components(g)),
        key=lambda c: (-len(c), min(first[v] for v in c)),
    )


def longest_path_length(graph: ir.Graph | ir.Function) -> int:
    """The critical path: the number of nodes on the longest dependency chain (0 for an empty graph)."""
    order = topological_nodes(graph)
    if order is None:
        raise ValueError("graph has a cycle")
    depth: dict[ir.Node, int] = {}
    best = 0
    for n in order:
        d = 1
        for v, _ in _node_inputs(n):
            p = v.producer()
            if p in depth:
                d = max(d, depth[p] + 1)
        depth[n] = d
        best = max(best, d)
    return best

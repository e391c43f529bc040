"""iter_graphs / apply_to_graphs reach the main graph, nested bodies and functions."""

from __future__ import annotations

import onnx_ir as ir
from helpers import parse

from graphopt.graphs import apply_to_graphs, bodies, iter_graphs, iter_nodes

_NESTED = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[2] x, bool c, int64 n) => (float[2] y) {
  y = If(c) <then_branch = t () => (float[2] o) {
      o = Relu(x)
    }, else_branch = e () => (float[2] o2) {
      o2 = local.F(x)
    }>
}
<domain: "local", opset_import: ["" : 17]>
F (a) => (b) {
  b = If(flag) <then_branch = ft () => (float[2] p) {
      p = Neg(a)
    }, else_branch = fe () => (float[2] q) {
      q = Abs(a)
    }>
  flag = Constant <value = bool {1}> ()
}
"""


def test_iter_graphs_visits_main_nested_and_function_graphs_once():
    model = parse(_NESTED)

    names = [graph.name for graph in iter_graphs(model)]

    assert names == ["g", "t", "e", "F", "ft", "fe"]
    assert [graph.name for graph in iter_graphs(model, functions=False)] == ["g", "t", "e"]


def test_apply_to_graphs_reports_whether_any_call_changed_a_graph():
    model = parse(_NESTED)
    seen = []

    def rename_bodies(graph) -> bool:
        seen.append(graph.name)
        if graph.name in ("t", "fe"):
            graph.name = graph.name.upper()
            return True
        return False

    assert apply_to_graphs(model, rename_bodies) is True
    assert seen == ["g", "t", "e", "F", "ft", "fe"]
    assert apply_to_graphs(model, lambda graph: False) is False
    assert [graph.name for graph in iter_graphs(model)] == ["g", "T", "e", "F", "ft", "FE"]


_LOOP_IN_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c, int64 n) => (float[2] y) {
  a = Neg(x)
  y = If(c) <then_branch = t () => (float[2] o) {
      o = Loop(n, c, a) <body = b (int64 i, bool cin, float[2] s) => (bool cout, float[2] s2) {
          cout = Identity(cin)
          s2 = Abs(s)
        }>
    }, else_branch = e () => (float[2] o2) {
      o2 = Relu(a)
    }>
}
"""


def test_iter_nodes_matches_onnx_ir_recursive_iterator_order():
    model = parse(_LOOP_IN_IF)

    ours = [node.op_type for node in iter_nodes(model.graph)]
    theirs = [node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)]

    assert ours == theirs == ["Neg", "If", "Loop", "Identity", "Abs", "Relu"]


def test_bodies_lists_the_graphs_a_node_holds():
    model = parse(_LOOP_IN_IF)
    neg, if_node = list(model.graph)

    assert bodies(neg) == []
    assert [body.name for body in bodies(if_node)] == ["t", "e"]

"""iter_graphs / apply_to_graphs reach the main graph, nested bodies and functions."""

from __future__ import annotations

from helpers import parse

from graphopt.graphs import apply_to_graphs, iter_graphs

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

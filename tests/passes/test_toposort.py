"""toposort: stable topological order of main graph, subgraphs and functions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, check_full, parse, run_ort, to_proto

from graphopt import run_pipeline
from graphopt.errors import InvalidModelError

X = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


_SORTED_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x, bool c) => (float[2,4] y) {
  a = Relu(x)
  z = If(c) <then_branch = t () => (float[2,4] o) {
      r = Relu(a)
      o = Neg(r)
    }, else_branch = e () => (float[2,4] o2) {
      o2 = Abs(a)
    }>
  y = Sigmoid(z)
}
"""


def _shuffled_with_if() -> ir.Model:
    #   main:  y = Sigmoid(If(c) ...) listed before its producers
    #   then:  o = Neg(r), r = Relu(a)  listed backwards too
    model = parse(_SORTED_IF)
    main = model.graph
    sigmoid = main.node(2)
    main.remove(sigmoid)  # move Sigmoid in front of its producers
    main.insert_before(main.node(0), sigmoid)
    then_body = main.node(2).attributes["then_branch"].as_graph()
    neg = then_body.node(1)
    then_body.remove(neg)
    then_body.insert_before(then_body.node(0), neg)
    return model


def test_sorts_main_graph_and_if_bodies_when_out_of_order():
    model = _shuffled_with_if()
    assert _ops(model.graph) == ["Sigmoid", "Relu", "If"]

    result = run_pipeline(model, "toposort")

    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu", "If", "Sigmoid"]
    then_body = result.model.graph.node(1).attributes["then_branch"].as_graph()
    assert _ops(then_body) == ["Relu", "Neg"]
    check_full(result.model)
    reference = parse(_SORTED_IF)
    for cond in (True, False):
        feeds = {"x": X, "c": np.array(cond)}
        assert_same_outputs(run_ort(reference, feeds), run_ort(result.model, feeds))


def test_leaves_sorted_graph_unchanged_and_keeps_independent_order():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y, float[2,4] z) {
          z = Abs(x)
          a = Relu(x)
          y = Neg(a)
        }
        """
    )
    before = to_proto(model).SerializeToString()

    result = run_pipeline(model, "toposort")

    assert result.modified is False
    assert _ops(result.model.graph) == ["Abs", "Relu", "Neg"]
    assert to_proto(model).SerializeToString() == before


def test_second_run_changes_nothing():
    model = _shuffled_with_if()
    run_pipeline(model, "toposort")

    assert run_pipeline(model, "toposort").modified is False


def test_cycle_is_reported_as_invalid_model():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y) {
          a = Add(x, b)
          b = Relu(a)
          y = Neg(b)
        }
        """
    )

    with pytest.raises(InvalidModelError, match="cannot sort"):
        run_pipeline(model, "toposort")

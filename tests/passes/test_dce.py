"""dce: dead nodes, initializers and functions go; everything an output needs stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, assert_second_run_changes_nothing, check_full, parse, run_ort, to_proto

from graphopt import run_pipeline

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4)).astype(np.float32)


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _run_dce(model: ir.Model):
    """Serializes the original first (the pass is in place), then runs dce via the pipeline."""
    original = to_proto(model)
    result = run_pipeline(model, "dce")
    return original, result


def _main_graph_with_dead_code() -> ir.Model:
    #   x -> Relu -> Sigmoid -> y
    #    \-> Neg -> Abs          (dead chain)
    #   W (initializer) -> only used by the dead MatMul
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y)
        <float[4,4] W = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}, float[4] unused_init = {1,2,3,4}> {
          r = Relu(x)
          y = Sigmoid(r)
          n = Neg(x)
          a = Abs(n)
          m = MatMul(r, W)
        }
        """
    )


def test_removes_dead_nodes_and_initializers_when_outputs_do_not_need_them():
    model = _main_graph_with_dead_code()
    original, result = _run_dce(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu", "Sigmoid"]
    assert list(result.model.graph.initializers) == []
    check_full(result.model)
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(result.model, {"x": X}))


def _dead_if_reading_outer_scope() -> ir.Model:
    #   x -> Relu(a) ----------------------------> If(c) [dead: output unused]
    #   |                                            then: Neg(a)   else: Abs(a)
    #   +--> Sigmoid -> y
    # Removing the If must also remove Relu, which only the If's bodies read.
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x, bool c) => (float[2,4] y) {
          a = Relu(x)
          dead = If(c) <then_branch = t () => (float[2,4] o) {
              o = Neg(a)
            }, else_branch = e () => (float[2,4] o2) {
              o2 = Abs(a)
            }>
          y = Sigmoid(x)
        }
        """
    )


def test_removes_outer_producer_when_only_a_dead_if_reads_it():
    model = _dead_if_reading_outer_scope()
    original, result = _run_dce(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Sigmoid"]
    check_full(result.model)
    feeds = {"x": X, "c": np.array(True)}
    assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def _live_if_with_dead_code_inside() -> ir.Model:
    #   x -> MatMul(W) -> h ---------> If(c) -> y
    #                     then: Relu(h) -> o ; Neg(h) dead ; initializer Z unused
    #                     else: Add(h, b) -> o2 ; Exp(h) dead
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x, bool c) => (float[2,4] y)
        <float[4,4] W = {1,0,0,0, 0,2,0,0, 0,0,3,0, 0,0,0,4}, float[4] b = {1,2,3,4}> {
          h = MatMul(x, W)
          y = If(c) <then_branch = t () => (float[2,4] o) <float[4] Z = {9,9,9,9}> {
              o = Relu(h)
              dead1 = Neg(h)
            }, else_branch = e () => (float[2,4] o2) {
              o2 = Add(h, b)
              dead2 = Exp(h)
            }>
        }
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_removes_dead_nodes_and_initializers_inside_if_bodies_when_if_is_live(cond):
    model = _live_if_with_dead_code_inside()
    original, result = _run_dce(model)

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["MatMul", "If"]
    then_body = graph.node(1).attributes["then_branch"].as_graph()
    else_body = graph.node(1).attributes["else_branch"].as_graph()
    assert _ops(then_body) == ["Relu"] and list(then_body.initializers) == []
    assert _ops(else_body) == ["Add"]
    # W and b are read from inside the bodies: outer-scope uses keep them.
    assert sorted(graph.initializers) == ["W", "b"]
    check_full(result.model)
    feeds = {"x": X, "c": np.array(cond)}
    assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def test_leaves_model_unchanged_when_nothing_is_dead():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x, float[2,4] unused_input) => (float[2,4] y, float[2,4] r) {
          r = Relu(x)
          y = Sigmoid(r)
        }
        """
    )
    original, result = _run_dce(model)

    assert result.modified is False
    assert _ops(result.model.graph) == ["Relu", "Sigmoid"]
    # Graph inputs are the user's interface, used or not.
    assert [v.name for v in result.model.graph.inputs] == ["x", "unused_input"]
    feeds = {"x": X, "unused_input": X}
    assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def test_second_run_changes_nothing():
    assert_second_run_changes_nothing(_live_if_with_dead_code_inside(), "dce")


def test_removes_unused_function_and_dead_nodes_inside_used_function():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2,4] x) => (float[2,4] y) {
          y = local.Used(x)
        }
        <domain: "local", opset_import: ["" : 17]>
        Used (a) => (b) {
          dead = Neg(a)
          b = Relu(a)
        }
        <domain: "local", opset_import: ["" : 17]>
        Unused (a) => (b) {
          b = Abs(a)
        }
        """
    )
    original, result = _run_dce(model)

    assert result.modified is True
    functions = result.model.functions
    assert [f.name for f in functions.values()] == ["Used"]
    assert _ops(next(iter(functions.values()))) == ["Relu"]
    # The custom-domain opset import is the user's; dce keeps it.
    assert result.model.opset_imports == {"": 17, "local": 1}
    check_full(result.model)
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(result.model, {"x": X}))


def test_keeps_initializer_that_is_a_graph_output():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y, float[4] b)
        <float[4] b = {1,2,3,4}> {
          y = Relu(x)
        }
        """
    )
    _, result = _run_dce(model)

    assert result.modified is False
    assert list(result.model.graph.initializers) == ["b"]

"""lift-constants: Constant nodes become initializers holding the same tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, assert_second_run_changes_nothing, check_full, parse, run_ort, to_proto

from graphopt import run_pipeline
from graphopt.errors import PipelineSpecError
from passes.lift_constants import LiftConstantsPass

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _paddle_style() -> ir.Model:
    #   x -> MatMul(W: Constant) -> Add(b: Constant) -> Mul(s: Constant value_float) -> y
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y) {
          W = Constant <value = float[4,4] {1,2,3,4, 5,6,7,8, 9,10,11,12, 13,14,15,16}> ()
          b = Constant <value = float[4] {0.5, -1, 2, 0}> ()
          s = Constant <value_float = 0.25> ()
          m = MatMul(x, W)
          a = Add(m, b)
          y = Mul(a, s)
        }
        """
    )


def test_lifts_every_constant_when_weights_live_in_constant_nodes():
    model = _paddle_style()
    original = to_proto(model)

    result = run_pipeline(model, "lift-constants")

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["MatMul", "Add", "Mul"]
    assert sorted(graph.initializers) == ["W", "b", "s"]
    np.testing.assert_array_equal(graph.initializers["W"].const_value.numpy(), np.arange(1, 17, dtype=np.float32).reshape(4, 4))
    assert graph.initializers["s"].const_value.numpy().dtype == np.float32
    check_full(result.model)
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(result.model, {"x": X}))


def test_lifts_constants_inside_if_bodies_into_the_body():
    #   x -> If(c):  then: Add(x, k: Constant)   else: Mul(x, k2: Constant value_floats)
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x, bool c) => (float[2,4] y) {
          y = If(c) <then_branch = t () => (float[2,4] o) {
              k = Constant <value = float[4] {1, 2, 3, 4}> ()
              o = Add(x, k)
            }, else_branch = e () => (float[2,4] o2) {
              k2 = Constant <value_floats = [2.0, 3.0, 4.0, 5.0]> ()
              o2 = Mul(x, k2)
            }>
        }
        """
    )
    original = to_proto(model)

    result = run_pipeline(model, "lift-constants")

    if_node = result.model.graph.node(0)
    then_body = if_node.attributes["then_branch"].as_graph()
    else_body = if_node.attributes["else_branch"].as_graph()
    assert result.modified is True
    assert _ops(then_body) == ["Add"] and list(then_body.initializers) == ["k"]
    assert _ops(else_body) == ["Mul"] and list(else_body.initializers) == ["k2"]
    check_full(result.model)
    for cond in (True, False):
        feeds = {"x": X, "c": np.array(cond)}
        assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


@pytest.mark.parametrize(
    ("attribute", "expected_dtype"),
    [
        ("value_int = 3", np.int64),
        ("value_ints = [1, 2]", np.int64),
        ("value_float = 1.5", np.float32),
        ("value = int64[2] {1, 2}", np.int64),
    ],
)
def test_lifts_each_attribute_form_with_its_onnx_dtype(attribute, expected_dtype):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4,2] x) => (float[4,2] y) {{
          k = Constant <{attribute}> ()
          kk = Cast <to = 1> (k)
          y = Add(x, kk)
        }}
        """
    )
    original = to_proto(model)
    feeds = {"x": X.reshape(4, 2)}

    result = run_pipeline(model, "lift-constants")

    assert result.modified is True
    assert result.model.graph.initializers["k"].const_value.numpy().dtype == expected_dtype
    assert _ops(result.model.graph) == ["Cast", "Add"]
    check_full(result.model)
    assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def test_leaves_constant_that_is_a_graph_output():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y, float[2] k) {
          k = Constant <value = float[2] {1, 2}> ()
          y = Relu(x)
        }
        """
    )
    result = run_pipeline(model, "lift-constants")

    assert result.modified is False
    assert _ops(result.model.graph) == ["Constant", "Relu"]


def test_leaves_constants_smaller_than_min_elements():
    model = _paddle_style()
    original = to_proto(model)

    result = run_pipeline(model, "lift-constants(min_elements=5)")

    assert result.modified is True
    assert sorted(result.model.graph.initializers) == ["W"]
    assert _ops(result.model.graph) == ["Constant", "Constant", "MatMul", "Add", "Mul"]
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(result.model, {"x": X}))


def _ir3_add_constant() -> onnx.ModelProto:
    """IR version 3: x + b, with b a Constant node (every initializer would have to be a graph input)."""
    return onnx.parser.parse_model(
        """
        <ir_version: 3, opset_import: ["" : 9]>
        g (float[2,4] x) => (float[2,4] y) {
          b = Constant <value = float[4] {1, 2, 3, 4}> ()
          y = Add(x, b)
        }
        """
    )


def test_ir3_model_gets_lifted_initializers_listed_as_inputs():
    proto = _ir3_add_constant()
    model = ir.serde.deserialize_model(proto)

    # The pass on its own keeps IR 3's rule; run_pipeline raises such models to IR 4 first.
    result = LiftConstantsPass()(model)

    assert result.modified is True
    assert result.model.ir_version == 3
    assert [v.name for v in result.model.graph.inputs] == ["x", "b"]
    check_full(result.model)
    assert_same_outputs(run_ort(proto, {"x": X}), run_ort(result.model, {"x": X}))


def test_ir3_model_through_the_pipeline_is_raised_to_ir4_and_lifts_plain_initializers():
    proto = _ir3_add_constant()
    model = ir.serde.deserialize_model(proto)

    result = run_pipeline(model, "lift-constants")

    assert [row.name for row in result.ledger.rows] == ["upgrade-ir", "lift-constants"]
    assert result.model.ir_version == 4 and [v.name for v in result.model.graph.inputs] == ["x"]
    assert "b" in result.model.graph.initializers
    check_full(result.model)
    assert_same_outputs(run_ort(proto, {"x": X}), run_ort(result.model, {"x": X}))


def test_second_run_changes_nothing():
    assert_second_run_changes_nothing(_paddle_style(), "lift-constants")


def test_rejects_negative_min_elements():
    with pytest.raises(PipelineSpecError, match="min_elements"):
        run_pipeline(_paddle_style(), "lift-constants(min_elements=-1)")

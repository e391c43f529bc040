"""dedup-initializers and cse: identical initializers and identical nodes are merged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    assert_same_outputs,
    assert_second_run_changes_nothing,
    assert_valid_and_equal,
    check_full,
    parse,
    run_ort,
    run_through_pipeline,
    to_proto,
)

import graphopt
from graphopt import provenance
from passes.fold.dedup import DeduplicateInitializersPass, EliminateCommonSubexpressionsPass

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 3)).astype(np.float32)
W = RNG.standard_normal((3, 3)).astype(np.float32)


def _lit(array: np.ndarray) -> str:
    return "{" + ",".join(repr(float(v)) for v in array.reshape(-1)) + "}"


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]








# ---------------------------------------------------------------- initializers


def _two_weights(w2_type: str = "float[3,3]", w2_value: np.ndarray = W, w2_is_input: bool = False) -> ir.Model:
    #   x -> MatMul(W1) -> a ; x -> Add(W2) -> b ; a + b -> y
    extra_input = f", {w2_type} W2" if w2_is_input else ""
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x{extra_input}) => (float[3,3] y)
        <float[3,3] W1 = {_lit(W)}, {w2_type} W2 = {_lit(w2_value)}> {{
          a = MatMul(x, W1)
          b = Add(x, W2)
          y = Add(a, b)
        }}
        """
    )


def test_merges_two_identical_weights_when_dtype_shape_and_bytes_match():
    model = _two_weights()
    original, result = run_through_pipeline(model, DeduplicateInitializersPass())

    graph = result.model.graph
    assert result.modified is True
    assert list(graph.initializers) == ["W1"]
    assert graph.node(1).inputs[1] is graph.initializers["W1"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    ("w2_type", "w2_value"),
    [
        ("float[9]", W.reshape(9)),  # same bytes, other shape
        ("double[3,3]", W),  # other dtype
        ("float[3,3]", W + np.float32(1e-3)),  # other bytes
    ],
)
def test_keeps_both_weights_when_dtype_shape_or_bytes_differ(w2_type, w2_value):
    # Add(x, W2) needs float[3,3]; a Reshape/Cast makes the other layouts usable.
    fix = {"float[9]": "w = Reshape(W2, shape)", "double[3,3]": "w = Cast <to = 1> (W2)"}.get(w2_type, "w = Identity(W2)")
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (float[3,3] y)
        <float[3,3] W1 = {_lit(W)}, {w2_type} W2 = {_lit(w2_value)}, int64[2] shape = {{3, 3}}> {{
          {fix}
          a = MatMul(x, W1)
          b = Add(x, w)
          y = Add(a, b)
        }}
        """
    )
    original, result = run_through_pipeline(model, DeduplicateInitializersPass())

    assert result.modified is False
    assert sorted(result.model.graph.initializers) == ["W1", "W2", "shape"]
    assert_valid_and_equal(original, result.model, {"x": X})


def test_keeps_a_duplicate_weight_when_it_is_also_a_graph_input():
    model = _two_weights(w2_is_input=True)
    original, result = run_through_pipeline(model, DeduplicateInitializersPass())

    assert result.modified is False
    assert sorted(result.model.graph.initializers) == ["W1", "W2"]
    assert_valid_and_equal(original, result.model, {"x": X, "W2": W + 1})


def test_merges_equal_string_tensors():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (string[2] y, string[2] z)
        <string[2] s1 = {"ab", "c"}, string[2] s2 = {"ab", "c"}, string[2] s3 = {"a", "bc"}> {
          y = Identity(s1)
          t = Identity(s2)
          u = Identity(s3)
          z = Identity(t)
        }
        """
    )
    original, result = run_through_pipeline(model, DeduplicateInitializersPass())

    assert result.modified is True
    assert list(result.model.graph.initializers) == ["s1", "s3"]
    check_full(result.model)
    expected, actual = run_ort(original, {"x": X}), run_ort(result.model, {"x": X})
    assert [list(a) for a in expected] == [list(a) for a in actual]


def _if_with_duplicate_weights() -> ir.Model:
    #   outer: W1, W2 (= W1) ; x -> If(c)
    #     then: e1, e2 (= W1 too) ; o = MatMul(x, e1) + MatMul(x, e2) + Add(x, W2)
    #     else: o2 = Neg(x)
    # W2 merges into W1 (its use inside the body is rewired), e2 into e1;
    # e1 is not merged into W1: each graph is deduplicated on its own.
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x, bool c) => (float[3,3] y) <float[3,3] W1 = {_lit(W)}, float[3,3] W2 = {_lit(W)}> {{
          y = If(c) <then_branch = t () => (float[3,3] o) <float[3,3] e1 = {_lit(W)}, float[3,3] e2 = {_lit(W)}> {{
              m1 = MatMul(x, e1)
              m2 = MatMul(x, e2)
              s = Add(m1, m2)
              w = Add(x, W2)
              o = Add(s, w)
            }}, else_branch = e () => (float[3,3] o2) {{
              o2 = Neg(x)
            }}>
        }}
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_merges_within_each_graph_when_if_bodies_hold_duplicates(cond):
    model = _if_with_duplicate_weights()
    original, result = run_through_pipeline(model, DeduplicateInitializersPass())

    graph = result.model.graph
    body = graph.node(0).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert list(graph.initializers) == ["W1"]
    assert list(body.initializers) == ["e1"]
    assert body.node(3).inputs[1] is graph.initializers["W1"]
    assert_valid_and_equal(original, result.model, {"x": X, "c": np.array(cond)})


@pytest.mark.parametrize("factory", [_two_weights, _if_with_duplicate_weights])
def test_dedup_second_run_changes_nothing(factory):
    assert_second_run_changes_nothing(factory(), [DeduplicateInitializersPass()])


# ------------------------------------------------------------------------ cse


@pytest.mark.parametrize(
    "op", ["Relu", "LeakyRelu <alpha = 0.1>", "Softmax <axis = 0>", "Clip(x, lo, hi)", "Transpose <perm = [1, 0]>"]
)
def test_merges_identical_nodes_when_op_attributes_and_inputs_match(op):
    call = op if "(" in op else f"{op} (x)"
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (float[3,3] y) <float lo = {{-0.5}}, float hi = {{0.5}}> {{
          r1 = {call}
          r2 = {call}
          y = Add(r1, r2)
        }}
        """
    )
    original, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    graph = result.model.graph
    assert result.modified is True
    assert len(graph) == 2
    assert graph.node(1).inputs[0] is graph.node(1).inputs[1]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("LeakyRelu <alpha = 0.1> (x)", "LeakyRelu <alpha = 0.2> (x)"),
        ("Relu(x)", "Relu(z)"),
        ("RandomUniformLike(x)", "RandomUniformLike(x)"),
        ("Div(x, pz)", "Div(x, nz)"),  # made from Constant 0.0 and -0.0 below
    ],
)
def test_keeps_nodes_when_attributes_inputs_or_determinism_differ(first, second):
    # Random draws are multiplied by 0 so outputs stay comparable.
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x, float[3,3] z) => (float[3,3] y) <float zero = {{0.0}}> {{
          pz = Constant <value_float = 0.0> ()
          nz = Constant <value_float = -0.0> ()
          r1 = {first}
          r2 = {second}
          a = Add(r1, r2)
          s = Sub(r1, r2)
          q = Mul(s, zero)
          y = Add(a, q)
        }}
        """
    )
    original, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    assert result.modified is False
    assert len(result.model.graph) == 8
    feeds = {"x": X, "z": X + 1}
    check_full(result.model)
    if "Random" not in first:
        assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def _relu_twice(outputs: str) -> ir.Model:
    #   r1 = Relu(x), r2 = Relu(x) ; y = Add(r1, r2) ; ``outputs`` picks names from {y, r1, r2}
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => ({", ".join(f"float[3,3] {name}" for name in outputs.split(", "))}) {{
          r1 = Relu(x)
          r2 = Relu(x)
          y = Add(r1, r2)
        }}
        """
    )


@pytest.mark.parametrize(
    ("outputs", "expected_ops"), [("y, r2", ["Relu", "Add"]), ("r1, r2", ["Relu", "Identity", "Add"])]
)
def test_keeps_graph_output_names_when_the_removed_node_feeds_one(outputs, expected_ops):
    model = _relu_twice(outputs)
    original, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    graph = result.model.graph
    assert result.modified is True
    # With both Relus named outputs, an Identity keeps the second name.
    assert _ops(graph) == expected_ops
    assert [v.name for v in graph.outputs] == outputs.split(", ")
    if outputs == "y, r2":
        # The kept Relu now carries the output name r2; r1 stands for it.
        assert provenance.read(result.model) == {"r2": "r1"}
    assert_valid_and_equal(original, result.model, {"x": X})


def test_graph_output_keeps_its_declared_shape_when_the_kept_node_knows_less():
    # Found by tests/properties: r1's inferred shape [a, b] replaced the declared [3, 3] of r2.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (float[3,3] y, float[3,3] r2) <float[a,b] r1> {
          r1 = Relu(x)
          r2 = Relu(x)
          y = Add(r1, r2)
        }
        """
    )
    original, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    assert _ops(result.model.graph) == ["Relu", "Add"]
    outputs = to_proto(result.model).graph.output
    assert [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in outputs] == [[3, 3], [3, 3]]
    assert_valid_and_equal(original, result.model, {"x": X})


def _if_with_common_subexpressions() -> ir.Model:
    #   r1 = Relu(x), r2 = Relu(x) (r2 read only inside the body)
    #   If(c): then: a = Exp(x), b = Exp(x), o = a + b + r2 ; else: o2 = Neg(r1)
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x, bool c) => (float[3,3] y) {
          r1 = Relu(x)
          r2 = Relu(x)
          y = If(c) <then_branch = t () => (float[3,3] o) {
              a = Exp(x)
              b = Exp(x)
              s = Add(a, b)
              o = Add(s, r2)
            }, else_branch = e () => (float[3,3] o2) {
              o2 = Neg(r1)
            }>
        }
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_merges_inside_if_bodies_and_rewires_outer_scope_uses(cond):
    model = _if_with_common_subexpressions()
    original, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    graph = result.model.graph
    body = graph.node(1).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert _ops(graph) == ["Relu", "If"]
    assert _ops(body) == ["Exp", "Add", "Add"]
    assert body.node(2).inputs[1] is graph.node(0).outputs[0]
    assert_valid_and_equal(original, result.model, {"x": X, "c": np.array(cond)})


@pytest.mark.parametrize(
    "factory", [_if_with_common_subexpressions, lambda: _relu_twice("y, r2"), lambda: _relu_twice("r1, r2")]
)
def test_cse_second_run_changes_nothing(factory):
    assert_second_run_changes_nothing(factory(), [EliminateCommonSubexpressionsPass()])


@pytest.mark.parametrize("size_limit", [-1, 1.5, True])
def test_cse_rejects_invalid_size_limit(size_limit):
    with pytest.raises(ValueError, match="size_limit"):
        EliminateCommonSubexpressionsPass(size_limit=size_limit)


def test_content_hash_is_computed_once_per_tensor_across_runs(monkeypatch):
    from passes.fold import dedup

    weights = np.ones((4, 4), np.float32)
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "A"], ["h"]), onnx.helper.make_node("MatMul", ["h", "B"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
            [onnx.numpy_helper.from_array(weights, "A"), onnx.numpy_helper.from_array(weights * 2, "B")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    model = graphopt.load(proto)
    computed = []
    real = dedup._compute_digest
    monkeypatch.setattr(dedup, "_compute_digest", lambda tensor: computed.append(tensor) or real(tensor))

    for _ in range(3):
        graphopt.run_pipeline(model, [dedup.DeduplicateInitializersPass()])

    assert len(computed) == 2


def test_never_merges_ops_onnx_does_not_define():
    # An unknown op may be a custom kernel with randomness or side effects.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (float[3,3] y) {
          a = FooBar(x)
          b = FooBar(x)
          y = Add(a, b)
        }
        """
    )
    _, result = run_through_pipeline(model, EliminateCommonSubexpressionsPass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["FooBar", "FooBar", "Add"]

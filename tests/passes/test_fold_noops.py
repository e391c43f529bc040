"""EliminateNoOpsPass: nodes computing y = x go, consumers read x, outputs keep their names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, check_full, parse, run_ort, to_proto

from graphopt import run_pipeline
from passes.fold.noops import EliminateNoOpsPass

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4)).astype(np.float32)  # batch 3 for the dynamic N
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _run(model: ir.Model):
    original = to_proto(model)
    return original, run_pipeline(model, [EliminateNoOpsPass()])


def _assert_same(original, model, feeds) -> None:
    check_full(model)
    assert_same_outputs(run_ort(original, feeds), run_ort(model, feeds))


def _sandwich(statement: str, initializers: str = "", x_type: str = "float[N,4]") -> ir.Model:
    #   x -> Relu -> r -> <statement: r to z> -> Sigmoid -> y
    # r's type is declared (value_info), as shape inference would have done.
    r_type = x_type.replace("x", "r") if " " in x_type else f"{x_type} r"
    inits = f"<{r_type}, {initializers}>" if initializers else f"<{r_type}>"
    return parse(
        f"""
        {HEADER}
        g ({x_type} x) => (float[N,4] y) {inits} {{
          r = Relu(x)
          {statement}
          y = Sigmoid(z)
        }}
        """
    )


NO_OPS = {
    "identity": ("z = Identity(r)", ""),
    "dropout_no_training_input": ("z = Dropout(r)", ""),
    "dropout_ratio_no_mask": ("z = Dropout(r, ratio)", "float ratio = {0.5}"),
    "dropout_training_false": ("z = Dropout(r, ratio, t)", "float ratio = {0.5}, bool t = {0}"),
    "dropout_unused_mask": ("z, mask = Dropout(r)", ""),
    "cast_same_type": ("z = Cast<to = 1>(r)", ""),
    "pad_zero": ("z = Pad(r, pads)", "int64[4] pads = {0,0,0,0}"),
    "pad_zero_with_value": ("z = Pad(r, pads, cv)", "int64[4] pads = {0,0,0,0}, float cv = {3}"),
    "slice_int64_max": ("z = Slice(r, s, e)", "int64[2] s = {0,0}, int64[2] e = {9223372036854775807,9223372036854775807}"),
    "slice_static_end_axes_steps": (
        "z = Slice(r, s, e, a, st)",
        "int64[1] s = {0}, int64[1] e = {4}, int64[1] a = {-1}, int64[1] st = {1}",
    ),
    "expand_ones": ("z = Expand(r, sh)", "int64[2] sh = {1,1}"),
    "expand_same_last_dim": ("z = Expand(r, sh)", "int64[1] sh = {4}"),
    "concat_single": ("z = Concat<axis = 1>(r)", ""),
    "split_single": ("z = Split<axis = 1>(r)", ""),
    "split_single_with_sizes": ("z = Split<axis = 1>(r, sp)", "int64[1] sp = {4}"),
}


@pytest.mark.parametrize("case", sorted(NO_OPS))
def test_removes_node_when_it_computes_its_input(case):
    model = _sandwich(*NO_OPS[case])
    original, result = _run(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu", "Sigmoid"]
    _assert_same(original, result.model, {"x": X})


KEPT = {
    "cast_changes_type": ("c = Cast<to = 11>(r)\n z = Cast<to = 1>(c)", ""),
    "pad_non_zero": ("p = Pad(r, pads)\n z = Slice(p, s, e)", "int64[4] pads = {0,1,0,0}, int64[2] s = {0,1}, int64[2] e = {100,100}"),
    "pad_reflect": ("z = Pad<mode = \"reflect\">(r, pads)", "int64[4] pads = {0,0,0,0}"),
    "pad_non_constant": ("q = Shape(r)\n pads = Concat<axis = 0>(zero, zero)\n z = Pad(r, pads)", "int64[2] zero = {0,0}"),
    "slice_step_2": ("s2 = Slice(r, s, e, a, st)\n z = Concat<axis = 1>(s2, s2)", "int64[1] s = {0}, int64[1] e = {4}, int64[1] a = {1}, int64[1] st = {2}"),
    "slice_partial_end": ("s3 = Slice(r, s, e, a)\n z = Concat<axis = 1>(s3, s3)", "int64[1] s = {0}, int64[1] e = {2}, int64[1] a = {1}"),
    "slice_end_on_dynamic_dim": ("z = Slice(r, s, e, a)", "int64[1] s = {0}, int64[1] e = {3}, int64[1] a = {0}"),
    "dropout_training_true": ("z = Dropout(r, ratio, t)", "float ratio = {0.0}, bool t = {1}"),
    "dropout_mask_used": ("d, mask = Dropout(r)\n mf = Cast<to = 1>(mask)\n z = Add(d, mf)", ""),
    "expand_broadcasts": ("z = Expand(r, sh)", "int64[2] sh = {1,4}"),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_keeps_node_when_it_is_not_a_no_op(case):
    statement, inits = KEPT[case]
    x_type = "float[N,1]" if case == "expand_broadcasts" else "float[N,4]"
    model = _sandwich(statement, inits, x_type=x_type)
    before = _ops(model.graph)
    original, result = _run(model)

    assert result.modified is False
    assert _ops(result.model.graph) == before
    x = X[:, :1] if case == "expand_broadcasts" else X
    _assert_same(original, result.model, {"x": np.ascontiguousarray(x)})


def test_renames_producer_when_no_op_output_is_a_graph_output():
    model = parse(
        f"""
        {HEADER}
        g (float[N,4] x) => (float[N,4] y) {{
          r = Relu(x)
          y = Identity(r)
        }}
        """
    )
    original, result = _run(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu"]
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    _assert_same(original, result.model, {"x": X})


def test_graph_output_keeps_its_declared_shape_when_the_renamed_producer_knows_less():
    # Found by tests/properties: r's inferred shape [a, b] replaced the declared [1, 9] of y.
    model = parse(
        f"""
        {HEADER}
        g (float[1,9] x) => (float[1,9] y) <float[a,b] r> {{
          r = Relu(x)
          y = Identity(r)
        }}
        """
    )
    original, result = _run(model)

    assert _ops(result.model.graph) == ["Relu"]
    (output,) = to_proto(result.model).graph.output
    assert [d.dim_value for d in output.type.tensor_type.shape.dim] == [1, 9]
    _assert_same(original, result.model, {"x": X[:1, :1].repeat(9, axis=1)})


@pytest.mark.parametrize(
    "outputs, body",
    [
        ("float[N,4] y", "y = Identity(x)"),  # input straight to output
        ("float[N,4] y, float[N,4] r", "r = Relu(x)\n y = Identity(r)"),  # r is itself an output
        ("float[4] y", "y = Identity(w)"),  # initializer straight to output
    ],
)
def test_keeps_no_op_when_its_input_cannot_take_the_output_name(outputs, body):
    model = parse(
        f"""
        {HEADER}
        g (float[N,4] x) => ({outputs}) <float[4] w = {{1,2,3,4}}> {{
          {body}
        }}
        """
    )
    original, result = _run(model)

    assert result.modified is False
    assert "Identity" in _ops(result.model.graph)
    _assert_same(original, result.model, {"x": X})


def _if_with_no_ops() -> ir.Model:
    #   x -> Relu -> r -> If(c)
    #        then: Cast(r, float) -> Dropout -> o  (o is the body output: producer renamed)
    #        else: Pad(r, zeros) -> Neg -> o2
    return parse(
        f"""
        {HEADER}
        g (float[N,4] x, bool c) => (float[N,4] y) <float[N,4] r, int64[4] pads = {{0,0,0,0}}> {{
          r = Relu(x)
          y = If(c) <then_branch = t () => (float[N,4] o) {{
              a = Cast<to = 1>(r)
              n = Neg(a)
              o = Dropout(n)
            }}, else_branch = e () => (float[N,4] o2) {{
              p = Pad(r, pads)
              o2 = Neg(p)
            }}>
        }}
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_removes_no_ops_inside_if_bodies(cond):
    model = _if_with_no_ops()
    original, result = _run(model)

    assert result.modified is True
    if_node = result.model.graph.node(1)
    then_body = if_node.attributes["then_branch"].as_graph()
    else_body = if_node.attributes["else_branch"].as_graph()
    assert _ops(then_body) == ["Neg"] and [v.name for v in then_body.outputs] == ["o"]
    assert _ops(else_body) == ["Neg"]
    _assert_same(original, result.model, {"x": X, "c": np.array(cond)})


def test_removes_chain_of_no_ops_in_one_run_and_second_run_changes_nothing():
    model = _sandwich("i = Identity(r)\n c1 = Concat<axis = 0>(i)\n z = Expand(c1, sh)", "int64[2] sh = {1,1}")
    original, result = _run(model)
    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu", "Sigmoid"]
    before = to_proto(result.model).SerializeToString()

    again = run_pipeline(result.model, [EliminateNoOpsPass()])

    assert again.modified is False
    assert to_proto(result.model).SerializeToString() == before
    _assert_same(original, result.model, {"x": X})


def test_leaves_custom_domain_identity_alone():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[N,4] x) => (float[N,4] y) {
          r = custom.Identity(x)
          y = Relu(r)
        }
        """
    )
    result = run_pipeline(model, [EliminateNoOpsPass()])

    assert result.modified is False
    assert _ops(result.model.graph) == ["Identity", "Relu"]

"""The graph generators themselves: every drawn model is valid before any pass sees it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import check_full, run_ort
from hypothesis import given
from hypothesis import strategies as st
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument
from properties.outcomes import run_ort_optimized
from properties.strategies import ALL_KINDS, LAYER_KINDS, models

pytestmark = pytest.mark.property

# The op types each step kind must produce (at least one of them), so a kind cannot silently stop generating.
_PRODUCES = {
    "constant_expression": {"ConstantOfShape", "Expand", "Tile", "Add", "Mul", "Sub"},
    "shape_reshape": {"Shape", "Size"},
    "unary": {"Relu", "Sigmoid", "Neg", "Tanh", "Abs"},
    "binary": {"Add", "Mul", "Sub", "Div"},
    "noop": {"Identity", "Dropout", "Cast", "Pad", "Slice", "Expand", "Concat", "Split"},
    "matmul": {"MatMul"},
    "gemm": {"Gemm"},
    "conv": {"Conv"},
    "batchnorm": {"BatchNormalization"},
    "transpose": {"Transpose"},
    "reshape": {"Reshape"},
    "flatten": {"Flatten", "Unsqueeze"},
    "concat": {"Concat"},
    "reduce": {"ReduceMean"},
    "split": {"Split"},
    "if": {"If"},
}


def _op_types(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found |= _op_types(attr.g)
    return found


@given(drawn=st.one_of(models(), models(LAYER_KINDS, widths=(8, 16), max_steps=6)))
def test_drawn_models_pass_the_full_checker_and_run(drawn):
    check_full(drawn.proto)
    outputs = run_ort(drawn.proto, drawn.feeds)
    assert [o.shape for o in outputs] == [
        tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in drawn.proto.graph.output
    ]


@pytest.mark.parametrize("kind", sorted(_PRODUCES))
@given(data=st.data())
def test_each_step_kind_builds_its_ops_validly(kind, data):
    # Only this kind, from an input of a rank it accepts.
    ranks = {"gemm": (2,), "conv": (4,)}.get(kind, (4, 2, 3))
    drawn = data.draw(models((kind,), max_steps=3, ranks=ranks))
    check_full(drawn.proto)
    run_ort(drawn.proto, drawn.feeds)
    assert _PRODUCES[kind] & _op_types(drawn.proto.graph)


def test_every_step_kind_is_checked_above():
    # "duplicate" copies whatever came before it, so it has no op type of its own.
    assert set(ALL_KINDS) - {"duplicate"} == set(_PRODUCES)


# Known onnxruntime bugs the properties work around (outcomes.assert_valid; the Neg in steps._noop's
# CastRoundTrip). Each is expected to fail; when an onnxruntime upgrade fixes one, its test passes,
# strict xfail reports that, and the workaround can go.
_DIV_TWICE_INTO_MATMULS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3,3] x) => (float[3,3] y) <float[1] d = {-0.5}, float[1] m = {1.1}, float[3,3] w = {1,2,3,4,5,6,7,8,9}> {
   a = Div(x, d)
   b = Mul(a, m)
   h = MatMul(b, w)
   a2 = Div(x, d)
   dead = MatMul(a2, w)
   y = Relu(h)
}
"""
_CAST_PAIR_INTO_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, bool c) => (float[3] y) {
   wide = Cast<to = 11>(x)
   back = Cast<to = 1>(wide)
   y = If(c) <then_branch = t () => (float[3] r1) { r1 = Relu(back) }, else_branch = e () => (float[3] r2) { r2 = Neg(back) }>
}
"""


@pytest.mark.xfail(strict=True, raises=InvalidArgument, reason="onnxruntime 1.32 ORT_ENABLE_ALL: 'Node input a is not a graph input'")
def test_onnxruntime_optimizers_accept_identical_divs_feeding_matmuls():
    run_ort_optimized(onnx.parser.parse_model(_DIV_TWICE_INTO_MATMULS), {"x": np.ones((3, 3), np.float32)})


@pytest.mark.xfail(strict=True, raises=Fail, reason="onnxruntime 1.32: 'Missing Input: back' in the If body")
def test_onnxruntime_runs_a_cast_round_trip_read_only_by_if_bodies():
    run_ort(onnx.parser.parse_model(_CAST_PAIR_INTO_IF), {"x": np.ones(3, np.float32), "c": np.array(True)})

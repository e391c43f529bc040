"""Why qdq leaves a layer float: the reason in ``float_layers`` says what is true of the layer."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_outputs, check_full, one_input_model, run_ort, to_proto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphopt import load, run_pipeline
from passes.qdq import QuantizePass


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_a_constant_left_operand_is_named_as_such_not_as_a_missing_weight(op):
    # y = W @ x: the constant is A, not B; per-channel int8 has no layout for it.
    weight = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    proto = one_input_model([oh.make_node(op, ["W", "x"], ["y"])], [nh.from_array(weight, "W")], [64, 5], [48, 5])
    model = load(proto)
    pass_ = QuantizePass(check_speed=False)

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert pass_.summary.float_layers == {f"{op}_0": "constant is the left operand: not a weight layout qdq quantizes"}
    assert "kept float (constant is the left operand: not a weight layout qdq quantizes)" in pass_.summary.line()
    check_full(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((64, 5)).astype(np.float32)}
    assert_same_outputs(run_ort(proto, feeds), run_ort(model, feeds), rtol=0, atol=0)


def test_two_activations_multiplied_are_still_said_to_have_no_weight():
    proto = one_input_model([oh.make_node("MatMul", ["x", "x"], ["y"])], [], [8, 8], [8, 8])
    model = load(proto)
    pass_ = QuantizePass(check_speed=False)

    run_pipeline(model, [pass_])

    assert pass_.summary.float_layers == {"MatMul_0": "no constant weight (both operands are computed, as attention's are)"}
    assert to_proto(model).graph.node[0].op_type == "MatMul"

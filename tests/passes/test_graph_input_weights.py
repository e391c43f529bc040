"""A weight that is also a graph input (every initializer, below IR version 4) is left alone, and the reason says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort

from graphopt import load, run_pipeline
from passes.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.prune.layer_checks import GRAPH_INPUT_WEIGHT
from passes.qdq import QuantizePass


def _ir3_two_layers() -> onnx.ModelProto:
    """IR version 3, opset 9: the initializers W1, W2 are listed as graph inputs, as that IR requires."""
    rng = np.random.default_rng(0)
    weights = {"W1": rng.standard_normal((64, 64)).astype(np.float32), "W2": rng.standard_normal((64, 64)).astype(np.float32)}
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"]), h.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
        "g",
        [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in (("x", [4, 64]), ("W1", [64, 64]), ("W2", [64, 64]))],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
        [onnx.numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 9)], ir_version=3)


@pytest.mark.parametrize(
    ("make", "reasons"),
    [
        (lambda: QuantizePass(check_speed=False), lambda p: dict(p.summary.float_layers)),
        (lambda: PrunePass(sparsity=0.5, skip=""), lambda p: dict(p.summary.skipped)),
        (lambda: LowRankPass(ratio=0.5, check_speed=False), lambda p: dict(p.summary.skipped)),
    ],
    ids=["qdq", "prune", "lowrank"],
)
def test_graph_input_weights_are_left_alone_with_the_reason(make, reasons):
    proto = _ir3_two_layers()
    model = load(proto)
    pass_ = make()

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert {reasons(pass_)[name] for name in ("fc1", "fc2")} == {GRAPH_INPUT_WEIGHT}  # was "weight is not a float initializer"
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(proto, x)[0])

"""What every property checks on a rewritten model: validity, the same interface, the outputs it gives."""

from __future__ import annotations

__all__ = ["assert_same_interface", "assert_valid", "run_ort_optimized"]

import numpy as np
import onnx
import onnxruntime as ort
from helpers import check_full, run_ort
from hypothesis import event


def run_ort_optimized(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the model with every onnxruntime graph optimization on: what a user deploys."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_valid(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Full onnx.checker on ``rewritten``, then onnxruntime with graph optimizations off and on.

    Returns both runs' outputs. The optimized run is None when onnxruntime's
    optimizers already fail on ``original``: that is onnxruntime's bug, not
    the rewrite's (seen with onnxruntime 1.32: two identical ``Div(x, c)``
    nodes each feeding a MatMul, one through a ``Mul`` by a constant, give
    "Node input ... is not a graph input" with ORT_ENABLE_ALL).
    """
    check_full(rewritten)
    plain = run_ort(rewritten, feeds)
    try:
        run_ort_optimized(original, feeds)
    except Exception:  # onnxruntime's errors share no base class worth naming
        event("onnxruntime's optimizers fail on the original")
        return plain, None
    return plain, run_ort_optimized(rewritten, feeds)


def _signature(values) -> list[tuple[str, int, tuple]]:
    return [
        (v.name, v.type.tensor_type.elem_type, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
        for v in values
    ]


def assert_same_interface(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """Graph inputs and outputs keep their names, element types and shapes, in order."""
    assert _signature(rewritten.graph.input) == _signature(original.graph.input)
    assert _signature(rewritten.graph.output) == _signature(original.graph.output)

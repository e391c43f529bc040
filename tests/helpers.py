"""Helpers for tests: run models through onnxruntime and compare outputs."""

from __future__ import annotations

__all__ = [
    "LOSSLESS_RTOL",
    "LOSSLESS_ATOL",
    "run_ort",
    "assert_same_outputs",
    "assert_second_run_changes_nothing",
    "assert_valid_and_equal",
    "run_through_pipeline",
    "check_full",
    "initializer_arrays",
    "one_input_model",
    "parse",
    "to_proto",
]

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

# The lossless-pass contract in shared/DESIGN.md.
LOSSLESS_RTOL = 1e-5
LOSSLESS_ATOL = 1e-6


def parse(text: str) -> ir.Model:
    """An IR model from onnx's textual syntax."""
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def run_ort(model: ir.Model | onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the model on CPU with all graph optimizations off, so what is compared is the graph itself."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, os.PathLike)) else to_proto(model).SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(
    expected: list[np.ndarray], actual: list[np.ndarray], *, rtol: float = LOSSLESS_RTOL, atol: float = LOSSLESS_ATOL
) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape and want.dtype == got.dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def initializer_arrays(model: ir.Model) -> dict[str, np.ndarray]:
    """The model's initializers by name, as numpy arrays."""
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items() if value.const_value is not None}


def one_input_model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], x_shape: list, y_shape: list, opset: int = 17) -> onnx.ModelProto:
    """A float model with input ``x`` and output ``y`` of the given shapes (IR version 8)."""
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)],
        initializers,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)


def check_full(model: ir.Model | onnx.ModelProto | Path) -> None:
    """onnx.checker with full_check (shape inference included)."""
    onnx.checker.check_model(str(model) if isinstance(model, Path) else to_proto(model), full_check=True)


def run_through_pipeline(model: ir.Model, pipeline: str | list | ir.passes.PassBase):
    """Serializes the original first (passes change the model in place), then runs the pipeline.

    ``pipeline`` is a spec string, a list of passes, or one pass instance.
    Returns ``(original_proto, PipelineResult)``.
    """
    from graphopt import run_pipeline

    original = to_proto(model)
    steps = [pipeline] if isinstance(pipeline, ir.passes.PassBase) else pipeline
    return original, run_pipeline(model, steps)


def assert_valid_and_equal(original: onnx.ModelProto, model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Full onnx.checker on the rewritten model, and the same outputs within the lossless tolerances."""
    check_full(model)
    assert_same_outputs(run_ort(original, feeds), run_ort(model, feeds))


def assert_second_run_changes_nothing(model: ir.Model, pipeline: str | list) -> None:
    """Idempotence: after one run, a second reports no change and leaves identical bytes.

    ``pipeline`` is a spec string or a list of pass instances (they keep no
    per-run state, so one instance serves both runs).
    """
    from graphopt import run_pipeline

    run_pipeline(model, pipeline)
    before = to_proto(model).SerializeToString()

    again = run_pipeline(model, pipeline)

    assert again.modified is False
    assert to_proto(model).SerializeToString() == before


class CountingJson:
    """Stands in for a module's ``json`` (monkeypatch), counting parses and dumps: how often metadata is rewritten."""

    def __init__(self, real) -> None:
        self._real = real
        self.JSONDecodeError = real.JSONDecodeError
        self.loads_calls = 0
        self.dumps_calls = 0

    @property
    def calls(self) -> int:
        return self.loads_calls + self.dumps_calls

    def loads(self, *args, **kwargs):
        self.loads_calls += 1
        return self._real.loads(*args, **kwargs)

    def dumps(self, *args, **kwargs):
        self.dumps_calls += 1
        return self._real.dumps(*args, **kwargs)


def log_then_two_layers(width: int, seed: int = 0) -> onnx.ModelProto:
    """x [8, 32] -> Log (NaN where x < 0) -> MatMul fc1 (32 -> 32) -> Relu -> Gemm fc2 (32 -> ``width``, bias) -> y.

    Calibration inputs drawn from N(0, 1) give fc1 NaN activations: what a pass must not fit on.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        onnx.helper.make_node("Log", ["x"], ["l"]),
        onnx.helper.make_node("MatMul", ["l", "w1"], ["a"], name="fc1"),
        onnx.helper.make_node("Relu", ["a"], ["r"]),
        onnx.helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    weights = {"w1": rng.standard_normal((32, 32)), "w2": rng.standard_normal((32, width)), "b2": rng.standard_normal(width)}
    initializers = [onnx.numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    return one_input_model(nodes, initializers, [8, 32], [8, width])


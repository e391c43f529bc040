"""Is a factored layer faster than the dense one? Measured, not assumed.

r (k + n) < k n promises fewer FLOPs, but small layers are bound by per-node
overhead and memory traffic: the zoo's attention model (k = n = 32, one row)
ran its factored layers 0.87x as fast as dense, and Tucker-2 made the trained
digits CNN (8x8 maps) 1.8x slower. So each candidate layer is timed alone on
onnxruntime CPU at its real input shape, dense against factored,
interleaved, and kept dense unless factoring wins.
"""

from __future__ import annotations

__all__ = ["conv_times", "matmul_chain", "matmul_times"]

import functools

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.runtime import ModelRunner, measure_latency

_MIN_TIMED_SECONDS = 0.002  # each timing covers enough runs to last this long


def matmul_chain(rows: int, shapes: list[tuple[int, int]], seed: int = 0) -> ir.Model:
    """x [rows, k] through MatMuls by random weights of ``shapes`` in turn (timing does not depend on the values)."""
    rng = np.random.default_rng(seed)
    names = [f"w{i}" for i in range(len(shapes))]
    values = ["x", *[f"h{i}" for i in range(len(shapes) - 1)], "y"]
    nodes = [helper.make_node("MatMul", [values[i], names[i]], [values[i + 1]]) for i in range(len(shapes))]
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in zip(names, shapes)]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, shapes[0][0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, shapes[-1][1]])],
        weights,
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@functools.lru_cache(maxsize=512)
def matmul_times(rows: int, k: int, n: int, rank: int, threads: int | None) -> tuple[float, float]:
    """Median seconds of the dense [k, n] layer and of its rank-``rank`` factors, on ``rows`` input rows."""
    feeds = {"x": np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)}
    with ModelRunner(matmul_chain(rows, [(k, n)]), threads=threads) as dense, ModelRunner(
        matmul_chain(rows, [(k, rank), (rank, n)]), threads=threads
    ) as factored:
        dense.run(feeds)
        factored.run(feeds)
        runs = _runs_per_timing(dense, feeds)
        batched = [_Repeated(runner, runs) for runner in (dense, factored)]
        seconds = measure_latency(batched, feeds, warmup=1, repeats=7)
    return seconds[0] / runs, seconds[1] / runs


ConvStep = tuple[tuple[int, ...], dict[str, object], bool]  # weight shape, attributes, has bias

_conv_cache: dict[str, tuple[float, float]] = {}


def conv_times(input_shape: tuple[int, ...], dense: ConvStep, factored: list[ConvStep], threads: int | None) -> tuple[float, float]:
    """Median seconds of the dense Conv and of its chain of factor Convs on an input of ``input_shape``."""
    key = repr((input_shape, dense, factored, threads))
    if key not in _conv_cache:
        feeds = {"x": np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)}
        with ModelRunner(_conv_chain(input_shape, [dense]), threads=threads) as one, ModelRunner(
            _conv_chain(input_shape, factored), threads=threads
        ) as chain:
            one.run(feeds)
            chain.run(feeds)
            runs = _runs_per_timing(one, feeds)
            seconds = measure_latency([_Repeated(one, runs), _Repeated(chain, runs)], feeds, warmup=1, repeats=7)
        _conv_cache[key] = (seconds[0] / runs, seconds[1] / runs)
    return _conv_cache[key]


def _conv_chain(input_shape: tuple[int, ...], steps: list[ConvStep]) -> ir.Model:
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index, (shape, attributes, has_bias) in enumerate(steps):
        inputs = [previous, f"w{index}"]
        weights.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{index}"))
        if has_bias:
            inputs.append(f"b{index}")
            weights.append(numpy_helper.from_array(np.zeros(shape[0], np.float32), f"b{index}"))
        output = "y" if index == len(steps) - 1 else f"h{index}"
        nodes.append(helper.make_node("Conv", inputs, [output], **attributes))
        previous = output
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights,
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


class _Repeated:
    """A runner whose one ``run`` is ``runs`` back-to-back runs: sub-millisecond layers time poorly one at a time."""

    def __init__(self, runner: ModelRunner, runs: int) -> None:
        self.runner, self.runs = runner, runs

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        for _ in range(self.runs):
            self.runner.run(feeds)


def _runs_per_timing(runner: ModelRunner, feeds: dict[str, np.ndarray]) -> int:
    import time

    start = time.perf_counter()
    runner.run(feeds)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(1000, int(_MIN_TIMED_SECONDS / once)))

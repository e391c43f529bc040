"""lowrank's judge: the output cosine over samples and its lower bound, against numpy's own arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import load
from passes.lowrank.judge import judge


def _scaled_plus(shift: np.ndarray):
    """y = x + shift: an output that drifts from x by a fixed vector."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "shift"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(shift.astype(np.float32), "shift")],
    )
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def test_identical_outputs_give_cosine_one_and_no_spread():
    samples = [{"x": np.random.default_rng(i).standard_normal(4).astype(np.float32)} for i in range(5)]
    result = judge(_scaled_plus(np.zeros(4)), samples, [{"y": s["x"]} for s in samples], threads=1)
    assert result.cosine == pytest.approx(1.0, abs=1e-12) and result.lower_bound == pytest.approx(1.0, abs=1e-12)


def test_bound_is_the_cosine_less_two_standard_errors_of_the_per_sample_cosines():
    shift = np.array([0.3, -0.2, 0.1, 0.5])
    samples = [{"x": np.random.default_rng(i).standard_normal(4).astype(np.float32)} for i in range(6)]
    expected = [{"y": s["x"]} for s in samples]

    result = judge(_scaled_plus(shift), samples, expected, threads=1)

    want = [s["x"].astype(np.float64) for s in samples]
    got = [w + shift.astype(np.float32).astype(np.float64) for w in want]
    overall = _cos(np.concatenate(want), np.concatenate(got))
    per_sample = [_cos(w, g) for w, g in zip(want, got)]
    assert result.cosine == pytest.approx(overall, abs=1e-6)
    assert result.lower_bound == pytest.approx(overall - 2 * np.std(per_sample, ddof=1) / math.sqrt(6), abs=1e-6)
    assert result.lower_bound < result.cosine < 1


def test_one_sample_has_no_spread_and_nan_outputs_count_as_opposite():
    sample = {"x": np.ones(4, np.float32)}
    one = judge(_scaled_plus(np.full(4, 1.0)), [sample], [{"y": sample["x"]}], threads=1)
    assert one.cosine == pytest.approx(1.0) and one.lower_bound == one.cosine  # x and x + 1 point the same way
    broken = judge(_scaled_plus(np.array([np.nan, 0, 0, 0])), [sample, sample], [{"y": sample["x"]}] * 2, threads=1)
    assert broken.cosine == -1.0

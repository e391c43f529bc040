"""The held-back judge of passes with fidelity targets: output cosine and SNR over samples and their lower bounds, against numpy's own arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import load
from passes.held_back import Judgement, judge, meets


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


def _snr(want: np.ndarray, got: np.ndarray) -> float:
    return 10 * math.log10(float(want @ want) / float((got - want) @ (got - want)))


def test_identical_outputs_give_cosine_one_and_no_spread():
    samples = [{"x": np.random.default_rng(i).standard_normal(4).astype(np.float32)} for i in range(5)]
    result = judge(_scaled_plus(np.zeros(4)), samples, [{"y": s["x"]} for s in samples], threads=1)
    assert result.cosine == pytest.approx(1.0, abs=1e-12) and result.lower_bound == pytest.approx(1.0, abs=1e-12)


def test_bounds_are_the_figures_less_two_standard_errors_of_their_per_sample_values():
    shift = np.array([0.3, -0.2, 0.1, 0.5])
    samples = [{"x": np.random.default_rng(i).standard_normal(4).astype(np.float32)} for i in range(6)]
    expected = [{"y": s["x"]} for s in samples]

    result = judge(_scaled_plus(shift), samples, expected, threads=1)

    want = [s["x"].astype(np.float64) for s in samples]
    got = [w + shift.astype(np.float32).astype(np.float64) for w in want]
    all_want, all_got = np.concatenate(want), np.concatenate(got)
    cosines = [_cos(w, g) for w, g in zip(want, got)]
    snrs = [_snr(w, g) for w, g in zip(want, got)]
    assert result.cosine == pytest.approx(_cos(all_want, all_got), abs=1e-6)
    assert result.lower_bound == pytest.approx(result.cosine - 2 * np.std(cosines, ddof=1) / math.sqrt(6), abs=1e-6)
    assert result.lower_bound < result.cosine < 1
    assert result.snr_db == pytest.approx(_snr(all_want, all_got), abs=1e-4)
    assert result.snr_lower_bound == pytest.approx(result.snr_db - 2 * np.std(snrs, ddof=1) / math.sqrt(6), abs=1e-4)
    assert result.snr_lower_bound < result.snr_db < 60


def test_one_sample_has_no_spread_and_nan_outputs_count_as_opposite():
    sample = {"x": np.ones(4, np.float32)}
    one = judge(_scaled_plus(np.full(4, 1.0)), [sample], [{"y": sample["x"]}], threads=1)
    assert one.cosine == pytest.approx(1.0) and one.lower_bound == one.cosine  # x and x + 1 point the same way
    broken = judge(_scaled_plus(np.array([np.nan, 0, 0, 0])), [sample, sample], [{"y": sample["x"]}] * 2, threads=1)
    assert broken.cosine == -1.0


def test_exact_outputs_have_infinite_snr_and_nan_outputs_minus_infinite():
    samples = [{"x": np.full(4, float(i + 1), np.float32)} for i in range(3)]
    exact = judge(_scaled_plus(np.zeros(4)), samples, [{"y": s["x"]} for s in samples], threads=1)
    assert exact.snr_db == math.inf and exact.snr_lower_bound == math.inf
    broken = judge(_scaled_plus(np.array([np.nan, 0, 0, 0])), samples, [{"y": s["x"]} for s in samples], threads=1)
    assert broken.snr_db == -math.inf and broken.snr_lower_bound == -math.inf


def test_targets_are_met_by_the_bounds_not_the_figures():
    spread = Judgement(cosine=0.995, lower_bound=0.985, snr_db=30.0, snr_lower_bound=25.0)
    assert meets(spread, 0.98) and not meets(spread, 0.99)  # the cosine alone would meet 0.99
    assert meets(spread, None, 24.0) and not meets(spread, None, 28.0)
    assert meets(spread, None, None) and not meets(spread, 0.98, 28.0)


def test_positions_that_are_nan_in_the_reference_do_not_count_against_the_candidate():
    samples = [{"x": np.array([np.nan, 1.0, 2.0, 3.0 + i], np.float32)} for i in range(3)]
    expected = [{"y": s["x"]} for s in samples]  # the original's own NaN, which the candidate reproduces

    same = judge(_scaled_plus(np.zeros(4)), samples, expected, threads=1)
    drifted = judge(_scaled_plus(np.array([0, 0.5, 0, 0])), samples, expected, threads=1)

    assert same.measured and same.cosine == pytest.approx(1.0, abs=1e-12) and same.samples == 3
    want = np.concatenate([s["x"][1:] for s in samples]).astype(np.float64)
    assert drifted.cosine == pytest.approx(_cos(want, want + np.tile([0.5, 0, 0], 3)), abs=1e-9)


def test_nothing_is_measured_when_the_reference_has_no_finite_value_or_no_value_at_all():
    nan_sample = {"x": np.full(4, np.nan, np.float32)}
    all_nan = judge(_scaled_plus(np.zeros(4)), [nan_sample], [{"y": nan_sample["x"]}], threads=1)
    empty = Judgement(math.nan, math.nan)

    assert not all_nan.measured and math.isnan(all_nan.cosine) and math.isnan(all_nan.snr_db) and all_nan.samples == 0
    assert not meets(all_nan, 0.5) and not meets(empty, None, 10.0)


def test_qdq_summary_says_not_measured_instead_of_a_cosine_when_nothing_was_compared():
    from passes.qdq import QuantizationSummary

    summary = QuantizationSummary(quantized=["fc"], fidelity={"cosine": math.nan, "cosine_lower_bound": math.nan, "samples": 1})

    assert "output cosine not measured (no finite value in the original's outputs to compare)" in summary.line()
    assert "nan" not in summary.line()

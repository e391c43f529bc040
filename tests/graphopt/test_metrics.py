"""Tests for graphopt.metrics: statistics against hand-computed values, streaming, NaN/Inf, tolerances."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from graphopt.metrics import DEFAULT_ATOL, DEFAULT_RTOL, OutputComparator, Tolerance, compare_arrays

LOOSE = Tolerance(atol=10.0)


def test_statistics_match_hand_computed_values_when_one_element_differs():
    # diff = [0, 0, 0, 1]; ||r||^2 = 30, ||c||^2 = 39, <r, c> = 34, ||d||^2 = 1
    result = compare_arrays("y", np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 5]), LOOSE)

    assert result.samples == 1 and result.elements == 4
    assert result.max_abs == 1.0
    assert result.mean_abs == 0.25
    assert result.rel_l2 == pytest.approx(1 / math.sqrt(30), rel=1e-12)
    assert result.cosine == pytest.approx(34 / math.sqrt(30 * 39), rel=1e-12)
    assert result.snr_db == pytest.approx(10 * math.log10(30), rel=1e-12)
    assert result.violations == 0 and result.passed is True and result.reason == ""


def test_statistics_match_hand_computed_values_when_values_are_swapped():
    # diff = [1, -1]; ||r||^2 = 25, <r, c> = 24, ||d||^2 = 2
    result = compare_arrays("y", np.array([3.0, 4.0]), np.array([4.0, 3.0]), LOOSE)

    assert (result.max_abs, result.mean_abs) == (1.0, 1.0)
    assert result.rel_l2 == pytest.approx(math.sqrt(2) / 5, rel=1e-12)
    assert result.cosine == pytest.approx(0.96, rel=1e-12)
    assert result.snr_db == pytest.approx(10 * math.log10(12.5), rel=1e-12)


def test_statistics_are_exact_when_outputs_are_identical():
    values = np.array([[0.5, -2.0], [3.0, 1e-3]], dtype=np.float32)

    result = compare_arrays("y", values, values.copy(), Tolerance(atol=0.0, rtol=0.0))

    assert (result.max_abs, result.mean_abs, result.rel_l2, result.cosine) == (0.0, 0.0, 0.0, 1.0)
    assert result.snr_db == math.inf
    assert result.passed is True and bool(result) is True


@pytest.mark.parametrize(
    ("candidate", "rel_l2", "cosine", "snr_db"),
    [
        ([0.0, 0.0], 0.0, 1.0, math.inf),
        ([1.0, 0.0], math.inf, 0.0, -math.inf),
    ],
)
def test_conventions_hold_when_reference_is_all_zero(candidate, rel_l2, cosine, snr_db):
    result = compare_arrays("y", np.zeros(2), np.array(candidate), LOOSE)

    assert (result.rel_l2, result.cosine, result.snr_db) == (rel_l2, cosine, snr_db)


def test_cosine_is_zero_when_only_candidate_is_all_zero():
    result = compare_arrays("y", np.array([1.0, 2.0]), np.zeros(2), LOOSE)

    assert result.cosine == 0.0
    assert result.rel_l2 == 1.0
    assert result.snr_db == 0.0


def test_streaming_over_three_samples_equals_one_shot_when_given_the_concatenation():
    rng = np.random.default_rng(0)
    references = [rng.standard_normal((rows, 6)).astype(np.float32) for rows in (2, 4, 3)]
    candidates = [r + rng.normal(0, 0.3, r.shape).astype(np.float32) for r in references]
    tolerance = Tolerance(atol=0.1, rtol=0.01)
    streamed = OutputComparator("y", tolerance)
    for reference, candidate in zip(references, candidates):
        streamed.update(reference, candidate)

    got = streamed.result()
    want = compare_arrays("y", np.concatenate(references), np.concatenate(candidates), tolerance)

    assert got.samples == 3 and want.samples == 1
    for field in dataclasses.fields(got):
        if field.name == "samples":
            continue
        value, expected = getattr(got, field.name), getattr(want, field.name)
        assert value == (pytest.approx(expected, rel=1e-12) if isinstance(value, float) else expected), field.name
    assert got.top1 is not None and got.top5 is not None


def test_comparator_keeps_accumulating_when_result_was_read_midway():
    comparator = OutputComparator("y", LOOSE)
    comparator.update(np.array([1.0]), np.array([1.5]))
    first = comparator.result()
    comparator.update(np.array([2.0]), np.array([4.0]))

    second = comparator.result()

    assert (first.samples, first.max_abs) == (1, 0.5)
    assert (second.samples, second.elements, second.max_abs, second.mean_abs) == (2, 2, 2.0, 1.25)


def test_matching_nan_and_inf_are_excluded_when_both_sides_have_them():
    reference = np.array([np.nan, 1.0, np.inf, -np.inf, 2.0])
    candidate = np.array([np.nan, 1.0, np.inf, -np.inf, 2.5])

    result = compare_arrays("y", reference, candidate, Tolerance(atol=1.0))

    assert result.elements == 5
    assert (result.nan_reference, result.inf_reference, result.nan_candidate, result.inf_candidate) == (1, 2, 1, 2)
    assert result.max_abs == 0.5
    assert result.mean_abs == 0.25  # over the two finite positions
    assert result.passed is True


def test_outputs_all_nan_in_both_models_are_not_compared_rather_than_a_perfect_match():
    # Before: cosine 1, SNR inf and PASS for an output with no finite value at all.
    nan = np.full((2, 40), np.nan, dtype=np.float32)
    comparator = OutputComparator("y", Tolerance(min_cosine=0.99))
    comparator.update(nan, nan.copy())

    result = comparator.result()

    assert comparator.nothing_compared and result.elements == 0 and not result.compared
    assert math.isnan(result.cosine) and math.isnan(result.snr_db) and result.nan_reference == 80
    assert result.passed  # the models agree; validate refuses when no output held a finite value


def test_comparison_fails_when_candidate_has_nan_the_reference_lacks():
    result = compare_arrays("y", np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]), Tolerance(min_cosine=-1.0))

    assert result.passed is False
    assert result.reason == "NaN in candidate only (1 element)"
    assert (result.nan_reference, result.nan_candidate) == (0, 1)
    assert math.isnan(result.max_abs) and math.isnan(result.cosine)


def test_comparison_fails_when_infinities_have_opposite_signs():
    result = compare_arrays("y", np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]), Tolerance(min_snr_db=0.0))

    assert result.passed is False
    assert result.reason.startswith("Inf in candidate only (1 element)")
    assert (result.inf_reference, result.inf_candidate) == (1, 1)


def test_comparison_fails_when_only_the_reference_is_not_finite():
    result = compare_arrays("y", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), Tolerance(min_cosine=-1.0))

    assert result.passed is False
    assert result.reason == "NaN/Inf in reference only (1 element)"


def test_default_tolerance_is_atol_1e4_rtol_1e3_when_nothing_is_set():
    tolerance = Tolerance()

    assert (tolerance.atol, tolerance.rtol) == (DEFAULT_ATOL, DEFAULT_RTOL) == (1e-4, 1e-3)
    assert (tolerance.min_cosine, tolerance.min_snr_db) == (None, None)
    assert tolerance.describe() == "atol=0.0001, rtol=0.001"


def test_violations_follow_atol_plus_rtol_times_reference_when_default_tolerance():
    # bounds: 1e-4, 0.1001, 0.0011 -> only the last element (diff 0.002) violates
    reference = np.array([0.0, 100.0, 1.0])
    candidate = np.array([5e-5, 100.05, 1.002])

    result = compare_arrays("y", reference, candidate, Tolerance())

    assert result.violations == 1
    assert result.passed is False
    assert result.reason == "1 element beyond atol=0.0001, rtol=0.001 (max abs 0.05)"


def test_rtol_counts_as_zero_when_only_atol_is_set():
    tolerance = Tolerance(atol=0.01)

    result = compare_arrays("y", np.array([100.0, 1.0]), np.array([100.05, 1.005]), tolerance)

    assert tolerance.describe() == "atol=0.01"
    assert result.violations == 1
    assert result.reason.startswith("1 element beyond atol=0.01 ")


@pytest.mark.parametrize(("min_cosine", "passed", "reason"), [(0.99, False, "cosine 0.96 < 0.99"), (0.95, True, "")])
def test_cosine_mode_ignores_atol_when_only_min_cosine_is_set(min_cosine, passed, reason):
    tolerance = Tolerance(min_cosine=min_cosine)

    result = compare_arrays("y", np.array([3.0, 4.0]), np.array([4.0, 3.0]), tolerance)

    assert (tolerance.atol, tolerance.rtol) == (None, None)
    assert tolerance.describe() == f"cosine >= {min_cosine}"
    assert result.violations == 0
    assert (result.passed, result.reason) == (passed, reason)


def test_cosine_reason_shows_enough_digits_when_value_is_just_below_threshold():
    tolerance = Tolerance(min_cosine=0.99)
    comparator = OutputComparator("y", tolerance)
    # cos(theta) = 0.98999 for unit vectors at angle theta
    theta = math.acos(0.98999)
    comparator.update(np.array([1.0, 0.0]), np.array([math.cos(theta), math.sin(theta)]))

    assert comparator.result().reason == "cosine 0.98999 < 0.99"


def test_snr_mode_fails_when_snr_is_below_threshold():
    # SNR = 10 log10(25 / 2) = 10.97 dB
    result = compare_arrays("y", np.array([3.0, 4.0]), np.array([4.0, 3.0]), Tolerance(min_snr_db=20.0))

    assert result.passed is False
    assert result.reason == "SNR 11 < 20 dB"
    assert Tolerance(min_snr_db=20.0).describe() == "SNR >= 20 dB"


def test_every_criterion_must_hold_when_several_are_set():
    tolerance = Tolerance(atol=2.0, min_cosine=0.99)

    result = compare_arrays("y", np.array([3.0, 4.0]), np.array([4.0, 3.0]), tolerance)

    assert tolerance.describe() == "atol=2, cosine >= 0.99"
    assert result.violations == 0
    assert result.reason == "cosine 0.96 < 0.99"


@pytest.mark.parametrize(
    "kwargs",
    [{"atol": -1e-3}, {"rtol": -0.1}, {"atol": math.nan}, {"min_cosine": 1.5}, {"min_cosine": -1.01}, {"min_snr_db": -3.0}],
)
def test_tolerance_raises_value_error_when_a_value_is_out_of_range(kwargs):
    with pytest.raises(ValueError):
        Tolerance(**kwargs)


def test_comparison_fails_with_both_shapes_when_shapes_differ():
    result = compare_arrays("logits", np.zeros((1, 10)), np.zeros((1, 11)), Tolerance())

    assert result.passed is False and not result
    assert result.reason == "shape (1,11) != reference (1,10)"
    assert result.top1 is None


def test_comparison_fails_when_no_sample_was_compared():
    result = OutputComparator("y", Tolerance()).result()

    assert (result.samples, result.passed, result.reason) == (0, False, "no samples compared")


def test_top1_and_top5_count_agreeing_rows_when_output_is_classifier_shaped():
    reference = np.array(
        [
            [9.0, 1, 2, 3, 4, 5],  # argmax 0
            [1.0, 9, 2, 3, 4, 5],  # argmax 1
            [1.0, 2, 9, 3, 4, 5],  # argmax 2
            [9.0, 1, 2, 3, 4, 5],  # argmax 0
        ],
        dtype=np.float32,
    )
    candidate = np.array(
        [
            [9.0, 1, 2, 3, 4, 5],  # agrees
            [1.0, 9, 2, 3, 4, 5],  # agrees
            [1.0, 2, 8, 9, 4, 5],  # argmax 3; reference's 2 is in its top five
            [0.0, 1, 2, 3, 4, 5],  # argmax 5; reference's 0 is its smallest
        ],
        dtype=np.float32,
    )

    result = compare_arrays("logits", reference, candidate, LOOSE)

    assert result.top1 == 0.5
    assert result.top5 == 0.75


def test_top5_is_none_when_there_are_fewer_than_five_classes():
    reference = np.array([[[[1.0]], [[2.0]], [[0.0]]]], dtype=np.float32)  # (1, 3, 1, 1)

    result = compare_arrays("logits", reference, reference.copy(), LOOSE)

    assert (result.top1, result.top5) == (1.0, None)


@pytest.mark.parametrize(
    "reference",
    [np.zeros((2, 3, 4, 4), np.float32), np.zeros((2, 1), np.float32), np.zeros(5, np.float32), np.zeros((2, 6), np.int64)],
    ids=["spatial", "one-class", "vector", "integer"],
)
def test_top1_is_none_when_output_is_not_classifier_shaped(reference):
    result = compare_arrays("y", reference, reference.copy(), LOOSE)

    assert (result.top1, result.top5) == (None, None)


def test_integer_outputs_are_compared_as_float64_when_dtype_is_int64():
    reference = np.array([1, 2, 3], dtype=np.int64)
    candidate = np.array([1, 2, 5], dtype=np.int64)

    result = compare_arrays("ids", reference, candidate, Tolerance(atol=0.0, rtol=0.0))

    assert (result.max_abs, result.violations, result.passed) == (2.0, 1, False)
    assert result.mean_abs == pytest.approx(2 / 3, rel=1e-12)
    assert result.cosine == pytest.approx(20 / math.sqrt(14 * 30), rel=1e-12)


def test_bool_outputs_are_compared_as_zero_and_one_when_dtype_is_bool():
    result = compare_arrays("mask", np.array([True, False, True]), np.array([True, True, True]), Tolerance(atol=0.0))

    assert (result.max_abs, result.violations) == (1.0, 1)
    assert result.cosine == pytest.approx(2 / math.sqrt(2 * 3), rel=1e-12)


def test_to_dict_is_strict_json_when_statistics_are_not_finite():
    identical = compare_arrays("y", np.ones(3), np.ones(3), Tolerance())
    broken = compare_arrays("z", np.ones(3), np.array([1.0, np.nan, np.inf]), Tolerance())

    for result in (identical, broken):
        text = json.dumps(result.to_dict(), allow_nan=False)
        assert json.loads(text)["name"] == result.name
    assert identical.to_dict()["snr_db"] == "inf"
    assert broken.to_dict()["max_abs"] == "nan"
    assert broken.to_dict()["top1"] is None
    assert set(identical.to_dict()) == {field.name for field in dataclasses.fields(identical)}


def test_huge_finite_float64_values_count_as_finite_when_their_squares_overflow():
    reference = np.array([1e200, -3e250, 1.0])

    result = compare_arrays("y", reference, reference.copy(), Tolerance())

    assert result.passed is True
    assert (result.nan_reference, result.inf_reference, result.nan_candidate, result.inf_candidate) == (0, 0, 0, 0)
    assert result.max_abs == 0.0 and result.violations == 0


def test_violations_are_counted_when_some_differences_exceed_atol_but_not_all():
    reference = np.zeros(4, dtype=np.float32)
    candidate = np.array([0.0, 5e-5, 2e-4, 1.0], dtype=np.float32)

    result = compare_arrays("y", reference, candidate, Tolerance(atol=1e-4, rtol=0.0))

    assert result.violations == 2 and result.passed is False


def test_string_outputs_are_compared_exactly_when_dtype_is_not_numeric():
    # Found by tests/graphopt/test_cli_node_sweep.py (StringConcat): astype(float64) raised ValueError.
    same = compare_arrays("s", np.array(["ab", "c"], dtype=object), np.array(["ab", "c"], dtype=object), Tolerance())
    differ = compare_arrays("s", np.array(["ab", "c"], dtype=object), np.array(["ab", "d"], dtype=object), LOOSE)

    assert same.passed and same.elements == 2 and same.max_abs == 0.0
    assert not differ.passed and differ.reason == "1 element of a string output differ"


def test_sequence_outputs_are_compared_element_by_element_when_shapes_differ_inside():
    # onnxruntime returns a sequence output as a list of arrays of any shapes: np.asarray raised on it.
    reference = [np.array([1.0, 2.0]), np.array([3.0])]
    close = compare_arrays("seq", reference, [np.array([1.0, 2.0]), np.array([3.5])], LOOSE)
    shorter = compare_arrays("seq", reference, [np.array([1.0, 2.0])], LOOSE)
    empty_optional = compare_arrays("opt", None, None, Tolerance())

    assert close.passed and close.elements == 3 and close.max_abs == 0.5 and close.top1 is None
    assert not shorter.passed and "1 element in the sequence != reference 2" in shorter.reason
    assert empty_optional.passed and empty_optional.elements == 0


def test_statistics_are_nan_not_perfect_when_shapes_differ():
    # They read max abs 0, cosine 1, SNR inf: a perfect match, for tensors that were never compared.
    result = compare_arrays("logits", np.ones((1, 10)), np.ones((1, 5)), Tolerance())

    assert result.elements == 0 and result.compared is False
    stats = (result.max_abs, result.mean_abs, result.rel_l2, result.cosine, result.snr_db)
    assert all(math.isnan(value) for value in stats), stats
    assert (result.passed, result.reason, result.top1, result.top5) == (False, "shape (1,5) != reference (1,10)", None, None)
    assert {key: result.to_dict()[key] for key in ("elements", "max_abs", "cosine", "snr_db")} == {
        "elements": 0, "max_abs": "nan", "cosine": "nan", "snr_db": "nan"
    }


def test_shapes_differing_in_one_sample_void_the_samples_that_matched():
    comparator = OutputComparator("y", LOOSE)
    comparator.update(np.ones((2, 3)), np.ones((2, 3)))
    comparator.update(np.ones((4, 3)), np.ones((5, 3)))

    result = comparator.result()

    assert (result.samples, result.elements, result.passed) == (2, 0, False)
    assert math.isnan(result.cosine) and math.isnan(result.max_abs)
    assert result.reason == "shape (5,3) != reference (4,3)"


def test_empty_outputs_of_equal_shape_are_not_compared_and_not_failed():
    comparator = OutputComparator("boxes", Tolerance(min_cosine=0.999))
    for _ in range(3):
        comparator.update(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))

    result = comparator.result()

    assert comparator.nothing_compared is True
    assert (result.samples, result.elements, result.compared, result.passed, result.reason) == (3, 0, False, True, "")
    assert all(math.isnan(v) for v in (result.max_abs, result.mean_abs, result.rel_l2, result.cosine, result.snr_db))
    assert result.top1 is None


def test_nothing_compared_is_false_once_an_element_is_compared_or_shapes_differ():
    compared, mismatched = OutputComparator("y", LOOSE), OutputComparator("y", LOOSE)
    compared.update(np.zeros((0, 4)), np.zeros((0, 4)))
    compared.update(np.ones((1, 4)), np.ones((1, 4)))
    mismatched.update(np.zeros((0, 4)), np.zeros((0, 5)))

    assert compared.nothing_compared is False and compared.result().elements == 4 and compared.result().cosine == 1.0
    assert mismatched.nothing_compared is False and mismatched.result().passed is False


def test_peak_relative_comparator_scales_rtol_by_the_largest_reference_value():
    reference = np.array([1000.0, 1e-4, -500.0], dtype=np.float32)
    candidate = np.array([1000.0, 6e-4, -500.0], dtype=np.float32)  # 5e-4 off where |r| is tiny
    tolerance = Tolerance()  # atol 1e-4, rtol 1e-3

    elementwise = OutputComparator("t", tolerance)
    peak = OutputComparator("t", tolerance, peak_relative=True)
    for comparator in (elementwise, peak):
        comparator.update(reference, candidate)

    assert not elementwise.result().passed and elementwise.result().violations == 1
    assert "all within rtol of the peak |value| 1e+03" in elementwise.result().reason
    assert peak.result().passed and peak.result().violations == 0
    drifted = OutputComparator("t", tolerance, peak_relative=True)
    drifted.update(reference, reference * np.float32(1.01))  # 10 off at the peak: beyond 1e-4 + 1e-3 * 1000
    assert not drifted.result().passed and "of the peak |value| 1e+03" in drifted.result().reason


def test_an_elementwise_failure_beyond_the_peak_bound_gets_no_rounding_hint():
    comparator = OutputComparator("t", Tolerance())
    comparator.update(np.array([1.0, 0.0], dtype=np.float32), np.array([1.5, 0.0], dtype=np.float32))

    assert not comparator.result().passed and "rounding" not in comparator.result().reason


@pytest.mark.parametrize(
    "tolerance",
    [Tolerance(min_cosine=0.9), Tolerance(min_snr_db=10.0), Tolerance(min_cosine=0.5, min_snr_db=10.0)],
    ids=["cosine", "snr", "both"],
)
def test_integer_outputs_are_judged_by_the_share_of_equal_values(tolerance):
    # Every class index swapped with its neighbour: a cosine of 0.98 and an SNR of 15 dB, no label right.
    labels = np.arange(10, dtype=np.int64)[None, :].repeat(4, axis=0)
    swapped = labels[:, [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]]
    mostly_right = labels.copy()
    mostly_right[0, 0] = 1  # 1 of 40 differs: 97.5% equal

    wrong, close = compare_arrays("label", labels, swapped, tolerance), compare_arrays("label", labels, mostly_right, tolerance)

    assert wrong.cosine > 0.98 and wrong.equal_share == 0.0 and not wrong.passed
    assert "of values equal < 0.9 required (integer output)" in wrong.reason
    assert close.equal_share == pytest.approx(0.975) and close.passed  # 0.975 >= 0.9, and >= 1 - 10^-1


def test_float_outputs_have_no_equal_share():
    assert compare_arrays("y", np.ones(3, dtype=np.float32), np.ones(3, dtype=np.float32), Tolerance()).equal_share is None


def test_thresholds_print_as_given_not_rounded_to_six_digits():
    tolerance = Tolerance(min_cosine=0.99999999)

    result = compare_arrays("y", np.array([1.0, 0.0]), np.array([1.0, 0.001]), tolerance)  # cosine 0.9999995

    assert tolerance.describe() == "cosine >= 0.99999999"
    assert result.reason.endswith("< 0.99999999")
    assert Tolerance().describe() == "atol=0.0001, rtol=0.001"

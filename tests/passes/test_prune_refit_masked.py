"""Reconstruction after unstructured pruning is kept only where held-out samples say it helps (passes/prune/refit_masked.py).

The regression: on a single 64 -> 48 Gemm with 16 synthesized samples of 5
rows, the unchecked refit raised the output error on fresh inputs from the
same N(0, 1) distribution from 0.052 to 0.086, and the summary said
"1 layers refit". With independent inputs plain pruning already is the best
linear fit: any refit learns the samples' noise. Errors here are measured
on fresh inputs, never on the calibration samples.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_full, initializer_arrays, run_ort
from onnx import TensorProto, helper, numpy_helper

from graphopt import load, run_pipeline
from passes.prune import PrunePass, refit_masked
from passes.prune.masks import unstructured_mask
from passes.prune.refit_masked import NOT_BETTER, checked_refit


def _gemm(rows: int = 5, k: int = 64, n: int = 48, seed: int = 0):
    """x [rows, k] -> Gemm(W / 4, B) -> y: the tester's model."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [
            numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) / 4, "W"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _fresh_error(proto, model, batches: int = 80, rows: int = 5, k: int = 64) -> float:
    """Mean over fresh N(0, 1) batches of ||y - y_original||^2 / ||y_original||^2, as the tester measured it."""
    rng = np.random.default_rng(11)
    errors = []
    for _ in range(batches):
        feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
        want, got = run_ort(proto, feeds)[0].astype(np.float64), run_ort(model, feeds)[0].astype(np.float64)
        errors.append(np.sum((got - want) ** 2) / np.sum(want**2))
    return float(np.mean(errors))


def test_refit_that_raises_the_error_on_fresh_inputs_is_refused_when_inputs_are_independent():
    proto = _gemm()
    plain, rebuilt = load(proto), load(proto)
    plain_pass, pass_ = PrunePass(skip="", reconstruct=False), PrunePass(skip="", reconstruct=True)

    run_pipeline(plain, [plain_pass])
    result = run_pipeline(rebuilt, [pass_])

    assert result.modified is True
    assert pass_.summary.reconstructed == []
    assert pass_.summary.not_reconstructed == {"Gemm(y)": NOT_BETTER}  # unnamed: op type and output
    assert "1 not refit (a refit did not beat plain pruning" in pass_.summary.line()
    check_full(rebuilt)
    for name in ("W", "B"):  # left exactly as plain pruning leaves it
        np.testing.assert_array_equal(initializer_arrays(rebuilt)[name], initializer_arrays(plain)[name])
    before, after = _fresh_error(proto, plain), _fresh_error(proto, rebuilt)
    # Seen: 0.0522 both (the unchecked refit: 0.0863).
    assert after <= before * (1 + 1e-6) and after < 0.06, (before, after)


def _correlated_gemm(n: int, k: int = 48, seed: int = 0):
    """x [N, 16] -> MatMul mix (16 -> k, frozen by skip) -> Gemm fc (k -> n, bias): fc's inputs have rank 16."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"], name="mix"), helper.make_node("Gemm", ["h", "W", "B"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [
            numpy_helper.from_array(rng.standard_normal((16, k)).astype(np.float32), "A"),
            numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("n", [24, 2 * refit_masked.SCORED_COLUMNS + 8])
def test_refit_that_helps_on_fresh_inputs_is_kept_when_inputs_are_redundant(n):
    # n above SCORED_COLUMNS: the strength is chosen on some columns and checked on all.
    proto = _correlated_gemm(n=n)
    rng = np.random.default_rng(3)
    calibration = [{"x": rng.standard_normal((16, 16)).astype(np.float32)} for _ in range(8)]
    fresh = {"x": np.random.default_rng(99).standard_normal((2000, 16)).astype(np.float32)}
    expected = run_ort(proto, fresh)[0].astype(np.float64)
    errors, passes = {}, {}
    for reconstruct in (False, True):
        model = load(proto)
        passes[reconstruct] = PrunePass(sparsity=0.5, skip="mix", reconstruct=reconstruct, data=calibration)
        run_pipeline(model, [passes[reconstruct]])
        check_full(model)
        assert abs(float((initializer_arrays(model)["W"] == 0).mean()) - 0.5) <= 0.01  # the mask survives
        errors[reconstruct] = float(np.linalg.norm(run_ort(model, fresh)[0] - expected) / np.linalg.norm(expected))

    assert passes[True].summary.reconstructed == ["fc"] and passes[True].summary.not_reconstructed == {}
    # Seen (rel L2 on 2000 fresh rows): n=24 plain 0.273, refit 0.0028; n=264 plain 0.272, refit 0.0090.
    assert errors[True] < errors[False] / 10, errors


def _grams(rows: np.ndarray) -> np.ndarray:
    with_ones = np.hstack([rows, np.ones((rows.shape[0], 1))])
    return with_ones.T @ with_ones


def test_checked_refit_refuses_without_a_second_half_or_with_nan_inputs():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4))
    mask = unstructured_mask(weight, 0.5)
    rows = rng.standard_normal((40, 8))
    poisoned = rows.copy()
    poisoned[3, 2] = np.nan

    assert checked_refit([_grams(rows)], weight, None, mask) == "one calibration sample: none left to check a refit on"
    assert checked_refit([_grams(rows), _grams(poisoned)], weight, None, mask) == "the layer's calibration inputs hold NaN/Inf"


def test_checked_refit_keeps_plain_pruning_when_it_is_already_exact():
    # The pruned weights were zero: plain pruning loses nothing, a refit can only tie (the tie refuses).
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((12, 3))
    weight[8:] = 0.0
    mask = np.ones_like(weight, bool)
    mask[8:] = False
    rows = rng.standard_normal((200, 12))

    assert checked_refit([_grams(rows[:100]), _grams(rows[100:])], weight, rng.standard_normal(3), mask) == NOT_BETTER


"""prune on inputs it must refuse or leave alone: bad option values, NaN/Inf weights and activations, W @ x.

Found by an exploratory tester: ``reconstruct="no"`` counted as true,
``ratio="abc"`` died with a Python TypeError, a NaN weight was pruned (its
NaN kept as the largest magnitude), NaN activations wrote NaN into a bias,
and MatMul(W, x) was skipped as "weight is a graph input".
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import check_full, initializer_arrays, log_then_two_layers, one_input_model, run_ort
from onnx import helper, numpy_helper

from graphopt import load, run_pipeline
from passes.prune import PrunePass
from passes.prune.layer_checks import NONFINITE_INPUTS


def _model(nodes: list, weights: dict[str, np.ndarray], x_shape: list, y_shape: list) -> onnx.ModelProto:
    return one_input_model(nodes, [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()], x_shape, y_shape)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reconstruct": "no"}, "reconstruct must be true or false, got 'no'"),
        ({"reconstruct": "off"}, "reconstruct must be true or false, got 'off'"),
        ({"reconstruct": 1}, "reconstruct must be true or false, got 1"),
        ({"ratio": "abc"}, r"ratio must be a number in \[0, 1\), got 'abc'"),
        ({"ratio": float("nan")}, r"ratio must be a number in \[0, 1\), got nan"),
        ({"sparsity": "0.5"}, r"sparsity must be a number in \[0, 1\), got '0.5'"),
        ({"sparsity": True}, r"sparsity must be a number in \[0, 1\), got True"),
        ({"align": 2.5}, "align must be an integer of at least 1, got 2.5"),
        ({"samples": 0}, "samples must be an integer of at least 1, got 0"),
        ({"samples": "8"}, "samples must be an integer of at least 1, got '8'"),
        ({"seed": -1}, "seed must be an integer of at least 0, got -1"),
        ({"threads": 0}, r"threads must be a positive integer or None \(onnxruntime's default\), got 0"),
        ({"threads": True}, "threads must be a positive integer or None"),
        ({"skip": 5}, "skip must be comma-separated node names or op types, got 5"),
        ({"pattern": 24}, "pattern must be 'unstructured', 'channel' or N:M"),
    ],
)
def test_bad_option_values_raise_value_error_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        PrunePass(**options)


def _two_matmuls(nan_in_last: bool = False, seed: int = 0):
    """x [4, 16] -> MatMul first (16 -> 16) -> Relu -> MatMul last (16 -> 8) -> y; ``last`` gets a NaN and an Inf if asked."""
    rng = np.random.default_rng(seed)
    w_last = rng.standard_normal((16, 8))
    if nan_in_last:
        w_last[0, 0], w_last[1, 1] = np.nan, np.inf
    nodes = [
        helper.make_node("MatMul", ["x", "w_first"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w_last"], ["y"], name="last"),
    ]
    return _model(nodes, {"w_first": rng.standard_normal((16, 16)), "w_last": w_last}, [4, 16], [4, 8])


@pytest.mark.parametrize("skip", [["last"], ("last",), "last", " last , "])
def test_skip_takes_a_list_of_names_as_well_as_a_comma_separated_string(skip):
    model = load(_two_matmuls())
    pass_ = PrunePass(sparsity=0.5, skip=skip)

    run_pipeline(model, [pass_])

    assert pass_.summary.skipped == {"last": "skip option"} and list(pass_.summary.sparsity) == ["first"]


def test_threads_none_and_plain_bools_are_accepted():
    pass_ = PrunePass(reconstruct=False, threads=None, ratio=0, sparsity=0)
    assert (pass_.reconstruct, pass_.threads, pass_.ratio, pass_.sparsity) == (False, None, 0.0, 0.0)


# ---------------------------------------------------------------- NaN/Inf weights


def _reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.maximum(x @ weights["w_first"].astype(np.float64), 0) @ weights["w_last"].astype(np.float64)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("reconstruct", [False, True])
def test_layer_whose_weight_holds_nan_or_inf_is_left_whole_with_the_reason(pattern, reconstruct):
    proto = _two_matmuls(nan_in_last=True)
    original = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    model = load(proto)
    pass_ = PrunePass(pattern=pattern, sparsity=0.5, skip="", reconstruct=reconstruct)

    result = run_pipeline(model, [pass_])

    assert result.modified is True
    assert pass_.summary.skipped == {"last": "weight has 2 NaN/Inf values"}
    assert list(pass_.summary.sparsity) == ["first"]
    if reconstruct:  # first's inputs are the graph input: finite, so its refit is judged as usual
        assert set(pass_.summary.reconstructed) | set(pass_.summary.not_reconstructed) == {"first"}
    weights = initializer_arrays(model)
    np.testing.assert_array_equal(weights["w_last"], original["w_last"])  # NaN and Inf where they were
    assert abs(float((weights["w_first"] == 0).mean()) - 0.5) <= 0.01
    check_full(model)
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    # The graph computes its (pruned) weights: NaN/Inf columns alike, the others within float32 rounding.
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], _reference(weights, x), rtol=1e-4, atol=1e-4, equal_nan=True)


def test_channel_pruning_leaves_a_producer_whose_weight_holds_nan_whole():
    # x -> MatMul first (NaN weight) -> Relu -> MatMul last -> y: first's chain is the only one.
    rng = np.random.default_rng(0)
    w_first = rng.standard_normal((16, 16))
    w_first[2, 3] = np.nan
    nodes = [
        helper.make_node("MatMul", ["x", "w_first"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w_last"], ["y"], name="last"),
    ]
    proto = _model(nodes, {"w_first": w_first, "w_last": rng.standard_normal((16, 8))}, [4, 16], [4, 8])
    model = load(proto)
    pass_ = PrunePass(pattern="channel", skip="", align=1, reconstruct=True)

    result = run_pipeline(model, [pass_])

    assert result.modified is False and pass_.summary.channels == {}
    assert pass_.summary.skipped["first"] == "weight has 1 NaN/Inf values"
    x = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(proto, x)[0])


@pytest.mark.parametrize("norm", ["l1", "activation"])
def test_channel_pruning_leaves_a_chain_whole_when_the_layer_reading_it_has_a_nan_weight(norm):
    # Activation importance would score the NaN row's channel NaN, and its mean would carry NaN into a bias.
    rng = np.random.default_rng(0)
    w_last = rng.standard_normal((16, 8))
    w_last[3, 2] = np.nan
    nodes = [
        helper.make_node("MatMul", ["x", "w_first"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w_last", "b_last"], ["y"], name="last"),
    ]
    proto = _model(nodes, {"w_first": rng.standard_normal((16, 16)), "w_last": w_last, "b_last": rng.standard_normal(8)}, [4, 16], [4, 8])
    model = load(proto)
    pass_ = PrunePass(pattern="channel", skip="", align=1, norm=norm)

    result = run_pipeline(model, [pass_])

    assert result.modified is False and pass_.summary.channels == {} and pass_.summary.compensated == []
    assert pass_.summary.skipped["first"] == "weight of last, which reads its channels, has 1 NaN/Inf values"
    x = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(proto, x)[0])


# ---------------------------------------------------------------- NaN activations


def _log_then_two_layers() -> onnx.ModelProto:
    return log_then_two_layers(width=8)


def _positive_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).uniform(0.5, 2.0, (8, 32)).astype(np.float32)}


def test_unstructured_refit_is_refused_when_the_calibration_activations_hold_nan():
    # Synthesized N(0, 1) feeds: Log makes about half of every layer's inputs NaN.
    proto = _log_then_two_layers()
    plain, model = load(proto), load(proto)
    run_pipeline(plain, [PrunePass(sparsity=0.5, skip="")])
    pass_ = PrunePass(sparsity=0.5, skip="", reconstruct=True)

    run_pipeline(model, [pass_])

    assert pass_.summary.reconstructed == []
    assert pass_.summary.not_reconstructed == {"fc1": NONFINITE_INPUTS, "fc2": NONFINITE_INPUTS}
    weights = initializer_arrays(model)
    assert all(np.all(np.isfinite(array)) for array in weights.values())
    for name, array in initializer_arrays(plain).items():
        np.testing.assert_array_equal(weights[name], array)  # plain pruning, untouched by a NaN fit
    check_full(model)
    np.testing.assert_array_equal(run_ort(model, _positive_feeds())[0], run_ort(plain, _positive_feeds())[0])


def test_activation_importance_leaves_a_chain_whole_when_its_activations_hold_nan():
    proto = _log_then_two_layers()
    model = load(proto)
    pass_ = PrunePass(pattern="channel", skip="", align=1, norm="activation")  # on synthesized N(0, 1) feeds

    result = run_pipeline(model, [pass_])

    assert result.modified is False and pass_.summary.channels == {} and pass_.summary.compensated == []
    assert pass_.summary.skipped["fc1"] == "its output holds NaN/Inf on the calibration data"
    np.testing.assert_array_equal(initializer_arrays(model)["b2"], numpy_helper.to_array(proto.graph.initializer[2]))
    np.testing.assert_array_equal(run_ort(model, _positive_feeds())[0], run_ort(proto, _positive_feeds())[0])


def test_channel_reconstruction_refuses_a_refit_on_nan_activations_and_keeps_plain_pruning():
    proto = _log_then_two_layers()
    plain, model = load(proto), load(proto)
    run_pipeline(plain, [PrunePass(pattern="channel", skip="", align=1, norm="l1")])
    pass_ = PrunePass(pattern="channel", skip="", align=1, norm="l1", reconstruct=True)

    run_pipeline(model, [pass_])

    assert pass_.summary.channels == {"fc1": (32, 22)}
    assert pass_.summary.reconstructed == [] and pass_.summary.not_reconstructed == {"fc2": NONFINITE_INPUTS}
    weights = initializer_arrays(model)
    for name, array in initializer_arrays(plain).items():
        np.testing.assert_array_equal(weights[name], array)
    check_full(model)
    got, want = run_ort(model, _positive_feeds())[0], run_ort(plain, _positive_feeds())[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- W @ x


def test_matmul_whose_constant_is_the_left_operand_is_skipped_with_the_true_reason():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="left")]
    proto = _model(nodes, {"w": rng.standard_normal((48, 64))}, [64, 5], [48, 5])
    model = load(proto)
    pass_ = PrunePass(skip="")

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert pass_.summary.skipped == {"left": "the constant is the left operand (W @ x): only x @ W is pruned"}
    x = {"x": rng.standard_normal((64, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(proto, x)[0])


def test_two_unnamed_layers_are_reported_apart():
    # Both went by "MatMul": the first layer's reason was overwritten by the second's ("0 pruned, 1 skipped" for 2 layers).
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    w1 = rng.standard_normal((16, 16))
    w1[0, 0] = np.nan
    pass_ = PrunePass(sparsity=0.5)

    run_pipeline(load(_model(nodes, {"w1": w1, "w2": rng.standard_normal((16, 8))}, [4, 16], [4, 8])), [pass_])

    assert pass_.summary.skipped == {"MatMul(h)": "weight has 1 NaN/Inf values", "MatMul(y)": "final classifier (default skip)"}

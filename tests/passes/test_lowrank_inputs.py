"""lowrank on inputs it must refuse or leave alone, and what it must keep: option values, NaN/Inf, W @ x, output docs.

Found by an exploratory tester: a NaN weight died in numpy's SVD ("SVD did
not converge"), ``data_aware="no"`` counted as true, ``threads=0`` gave a
traceback, MatMul(W, x) was skipped as "weight is not a float initializer",
and factoring the layer that writes a graph output dropped its doc_string.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import check_full, initializer_arrays, log_then_two_layers, one_input_model, run_ort, to_proto
from onnx import helper, numpy_helper

from graphopt import load, run_pipeline
from passes.lowrank import LowRankPass
from passes.prune.layer_checks import NONFINITE_INPUTS


def _model(nodes: list, weights: dict[str, np.ndarray], x_shape: list, y_shape: list) -> onnx.ModelProto:
    return one_input_model(nodes, [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()], x_shape, y_shape)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("name", ["data_aware", "sequential", "reconstruct", "check_speed"])
@pytest.mark.parametrize("value", ["no", "off", "true", 0, None])
def test_bool_options_refuse_anything_but_true_or_false(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be true or false, got {value!r}$"):
        LowRankPass(**{name: value})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threads": 0}, r"threads must be a positive integer or None \(onnxruntime's default\), got 0"),
        ({"threads": 1.5}, "threads must be a positive integer or None"),
        ({"ratio": "abc"}, r"ratio must be a number in \(0, 1\], got 'abc'"),
        ({"ratio": 0}, r"ratio must be a number in \(0, 1\], got 0"),
        ({"energy": "0.9"}, r"energy must be a number in \(0, 1\], got '0.9'"),
        ({"rank": True}, "rank must be an integer of at least 1, got True"),
        ({"min_gain": "x"}, r"min_gain must be a number in \(-inf, 1\), got 'x'"),
        ({"min_gain": float("-inf")}, r"min_gain must be a number in \(-inf, 1\), got -inf"),
        ({"target_cosine": "0.99"}, r"target_cosine must be a number in \(0, 1\], got '0.99'"),
        ({"samples": 2.5}, "samples must be an integer of at least 1, got 2.5"),
        ({"seed": "1"}, "seed must be an integer of at least 0, got '1'"),
        ({"skip": 3}, "skip must be comma-separated node names or op types, got 3"),
    ],
)
def test_numeric_options_are_checked_for_type_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        LowRankPass(**options)


def test_valid_values_of_every_kind_are_accepted():
    pass_ = LowRankPass(threads=None, min_gain=-0.5, energy=1, seed=0, skip=["a", "b"], data_aware=True, check_speed=False)
    assert (pass_.threads, pass_.min_gain, pass_.energy, pass_.skip) == (None, -0.5, 1.0, frozenset({"a", "b"}))


# ---------------------------------------------------------------- NaN/Inf weights


def _two_matmuls(seed: int = 0) -> onnx.ModelProto:
    """x [4, 32] -> MatMul first (32 -> 32) -> MatMul last (32 -> 32, a NaN and an Inf) -> y."""
    rng = np.random.default_rng(seed)
    w_last = rng.standard_normal((32, 32))
    w_last[0, 0], w_last[1, 1] = np.nan, np.inf
    nodes = [helper.make_node("MatMul", ["x", "w_first"], ["h"], name="first"), helper.make_node("MatMul", ["h", "w_last"], ["y"], name="last")]
    return _model(nodes, {"w_first": rng.standard_normal((32, 32)), "w_last": w_last}, [4, 32], [4, 32])


@pytest.mark.parametrize("options", [{}, {"data_aware": True}, {"data_aware": True, "sequential": False}, {"reconstruct": True}])
def test_layer_whose_weight_holds_nan_or_inf_is_left_whole_with_the_reason(options):
    proto = _two_matmuls()
    model = load(proto)
    # Full rank with min_gain < 0: the factored layer is exact, so the numbers show what was left whole.
    pass_ = LowRankPass(rank=32, min_gain=-1.0, check_speed=False, **options)

    result = run_pipeline(model, [pass_])

    assert result.modified is True and list(pass_.summary.decomposed) == ["first"]
    assert pass_.summary.skipped == {"last": "weight has 2 NaN/Inf values"}
    np.testing.assert_array_equal(initializer_arrays(model)["w_last"], numpy_helper.to_array(proto.graph.initializer[1]))
    check_full(model)
    x = {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, x)[0], run_ort(proto, x)[0], rtol=1e-3, atol=1e-3, equal_nan=True)


# ---------------------------------------------------------------- NaN activations


def _log_then_two_layers() -> onnx.ModelProto:
    return log_then_two_layers(width=32)


def _positive_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).uniform(0.5, 2.0, (8, 32)).astype(np.float32)}


@pytest.mark.parametrize(
    "options",
    [{"rank": 4}, {"rank": 4, "sequential": False}, {"scope": "global"}, {"target_cosine": 0.9}],
    ids=["sequential", "independent", "global", "target_cosine"],
)
def test_data_aware_fit_on_nan_activations_leaves_the_layers_whole_with_the_reason(options):
    # Synthesized N(0, 1) feeds: Log makes about half of fc1's inputs NaN, and fc1 spreads them to fc2's.
    proto = _log_then_two_layers()
    model = load(proto)
    pass_ = LowRankPass(data_aware=True, check_speed=False, **options)

    result = run_pipeline(model, [pass_])

    assert result.modified is False and pass_.summary.decomposed == {}
    reason = f"{NONFINITE_INPUTS} (no data-aware fit)"
    assert pass_.summary.skipped == {"fc1": reason, "fc2": reason}
    np.testing.assert_array_equal(run_ort(model, _positive_feeds())[0], run_ort(proto, _positive_feeds())[0])


def test_reconstruct_on_nan_activations_keeps_the_factors_as_they_are():
    proto = _log_then_two_layers()
    plain, model = load(proto), load(proto)
    run_pipeline(plain, [LowRankPass(rank=4, check_speed=False)])
    pass_ = LowRankPass(rank=4, check_speed=False, reconstruct=True)

    run_pipeline(model, [pass_])

    assert list(pass_.summary.decomposed) == ["fc1", "fc2"] and pass_.summary.reconstructed == []
    assert pass_.summary.not_reconstructed == {"fc1/lowrank/b": NONFINITE_INPUTS, "fc2/lowrank/b": NONFINITE_INPUTS}
    weights = initializer_arrays(model)
    assert all(np.all(np.isfinite(array)) for array in weights.values())
    for name, array in initializer_arrays(plain).items():
        np.testing.assert_array_equal(weights[name], array)
    check_full(model)
    got = run_ort(model, _positive_feeds())[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, run_ort(plain, _positive_feeds())[0])


# ---------------------------------------------------------------- W @ x


@pytest.mark.parametrize("data_aware", [False, True])
def test_matmul_whose_constant_is_the_left_operand_is_skipped_with_the_true_reason(data_aware):
    rng = np.random.default_rng(0)
    proto = _model([helper.make_node("MatMul", ["w", "x"], ["y"], name="left")], {"w": rng.standard_normal((48, 64))}, [64, 5], [48, 5])
    model = load(proto)
    pass_ = LowRankPass(check_speed=False, data_aware=data_aware)

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert pass_.summary.skipped == {"left": "the constant is the left operand (W @ x): only x @ W is factored"}
    x = {"x": rng.standard_normal((64, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(proto, x)[0])


# ---------------------------------------------------------------- graph output metadata


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_factoring_the_layer_that_writes_a_graph_output_keeps_its_doc_string_and_metadata(op, tmp_path):
    rng = np.random.default_rng(0)
    inputs = ["x", "w", "b"] if op == "Gemm" else ["x", "w"]
    weights = {"w": rng.standard_normal((24, 16)), **({"b": rng.standard_normal(16)} if op == "Gemm" else {})}
    proto = _model([helper.make_node(op, inputs, ["y"], name="fc")], weights, [3, 24], [3, 16])
    proto.graph.output[0].doc_string = "class logits"
    helper.set_metadata_props(proto.graph.output[0], {"unit": "logit"})
    model = load(proto)

    result = run_pipeline(model, [LowRankPass(rank=16, min_gain=-1.0, check_speed=False)])

    assert result.modified is True
    path = tmp_path / "out.onnx"
    onnx.save(to_proto(model), path)
    saved = onnx.load(path)
    assert [node.op_type for node in saved.graph.node] == ["MatMul", op]
    output = saved.graph.output[0]
    assert (output.name, output.doc_string) == ("y", "class logits")
    assert {prop.key: prop.value for prop in output.metadata_props} == {"unit": "logit"}
    check_full(path)
    x = {"x": rng.standard_normal((3, 24)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(path, x)[0], run_ort(proto, x)[0], rtol=1e-4, atol=1e-4)  # full rank: exact up to rounding

"""Channel pruning through MatMul layers, elementwise regions (Gelu, SiLU) and transformer blocks.

Exactness checks plant dead channels: all-zero weight columns (and zero
bias), which every activation here maps to zero, so removing them changes
nothing the model computes and the outputs must agree within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_full, initializer_arrays, one_input_model, run_ort
from onnx import helper, numpy_helper

from graphopt import load, run_pipeline
from model_zoo.encoder import build_encoder
from passes.prune import PrunePass

_DEAD = (1, 4, 6, 9)  # of 12 hidden channels: ratio 1/3 removes exactly these


def _two_linears(rng: np.random.Generator, outputs: int, dead, dead_bias: float) -> list:
    """w1 [8, 12] and b1 [12], the ``dead`` channels' weights zero and their bias ``dead_bias``; w2 [12, outputs] and b2."""
    w1 = rng.standard_normal((8, 12)).astype(np.float32)
    b1 = rng.standard_normal(12).astype(np.float32)
    w1[:, list(dead)], b1[list(dead)] = 0.0, dead_bias
    return [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(rng.standard_normal((12, outputs)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(outputs).astype(np.float32), "b2")]


def _feed_forward(activation: str = "gelu", dead=_DEAD, seed: int = 0):
    """x [2, 5, 8] -> MatMul up (8 -> 12) -> Add(b1, .) -> activation -> MatMul down (12 -> 8) -> Add b2.

    ``activation`` "gelu": x * 0.5 * (1 + Erf(x / sqrt 2)) with shared scalar
    constants (as torch exports it); "relu": Relu; "silu": x * Sigmoid(x);
    "leaky": the region x * Sigmoid(x) whose Sigmoid also feeds a residual Add,
    so it does not join into one tensor.
    """
    rng = np.random.default_rng(seed)
    inits = _two_linears(rng, outputs=8, dead=dead, dead_bias=0.0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["b1", "h0"], ["h"])]
    if activation == "gelu":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5))]
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["s"]), helper.make_node("Mul", ["h", "s"], ["g0"]),
                  helper.make_node("Mul", ["g0", "half"], ["a"])]
    elif activation == "relu":
        nodes.append(helper.make_node("Relu", ["h"], ["a"]))
    else:
        nodes += [helper.make_node("Sigmoid", ["h"], ["sig"]), helper.make_node("Mul", ["h", "sig"], ["a"])]
    nodes += [helper.make_node("MatMul", ["a", "w2"], ["o"], name="down"), helper.make_node("Add", ["o", "b2"], ["y" if activation != "leaky" else "z"])]
    if activation == "leaky":
        inits.append(numpy_helper.from_array(rng.standard_normal((12, 8)).astype(np.float32), "w3"))
        nodes += [helper.make_node("MatMul", ["sig", "w3"], ["side"], name="side"), helper.make_node("Add", ["z", "side"], ["y"])]
    return one_input_model(nodes, inits, [2, 5, 8], [2, 5, 8])


X = {"x": np.random.default_rng(7).standard_normal((2, 5, 8)).astype(np.float32)}


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_feed_forward_hidden_channels_shrink_through_bias_and_activation_exactly(activation):
    proto = _feed_forward(activation)
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3)  # default skip: "down" is the last layer before the output

    result = run_pipeline(model, [pass_])

    weights = initializer_arrays(model)
    assert result.modified is True and pass_.summary.channels == {"up": (12, 8)}
    assert pass_.summary.skipped["down"] == "final classifier (default skip)"
    assert weights["w1"].shape == (8, 8) and weights["b1"].shape == (8,) and weights["w2"].shape == (8, 8)
    assert np.all(weights["b1"] != 0)  # the four dead channels went, the live ones stayed
    if activation == "gelu":
        assert weights["sqrt2"].shape == () and weights["half"].shape == ()  # shared scalars are not cut
    check_full(model)
    np.testing.assert_allclose(run_ort(model, X)[0], run_ort(proto, X)[0], rtol=1e-5, atol=1e-5)


def test_a_region_that_does_not_join_into_one_tensor_is_left_alone():
    proto = _feed_forward("leaky")
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3, skip="")

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert pass_.summary.skipped["up"].startswith("channels reach Sigmoid")
    assert initializer_arrays(model)["w1"].shape == (8, 12)


def test_rank_two_matmul_feeds_a_gemm_consumer():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 12)).astype(np.float32)
    w1[:, list(_DEAD)] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal((3, 12)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
    proto = one_input_model(nodes, inits, [4, 6], [4, 3])
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3, skip="")

    run_pipeline(model, [pass_])

    assert pass_.summary.channels["up"] == (12, 8)
    assert initializer_arrays(model)["w1"].shape == (6, 8) and initializer_arrays(model)["w2"].shape == (3, 8)
    check_full(model)
    feeds = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_silu_between_convs_is_followed_as_one_region():
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((12, 3, 3, 3)).astype(np.float32)
    w1[list(_DEAD)] = 0.0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["s", "c"], ["a"]),  # SiLU, sigmoid first
             helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal((4, 12, 1, 1)).astype(np.float32), "w2")]
    proto = one_input_model(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6])
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3, skip="")

    run_pipeline(model, [pass_])

    assert pass_.summary.channels["c1"] == (12, 8) and initializer_arrays(model)["w2"].shape == (4, 8, 1, 1)
    check_full(model)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_conv_transpose_loses_output_channels_on_its_second_weight_axis():
    # ConvTranspose weights are [in, out, kh, kw]: cutting axis 0 would give an invalid model.
    rng = np.random.default_rng(3)
    wt = rng.standard_normal((5, 12, 3, 3)).astype(np.float32)
    wt[:, list(_DEAD)] = 0.0
    nodes = [helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["c"], name="up"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    bt = rng.standard_normal(12).astype(np.float32)
    bt[list(_DEAD)] = 0.0
    inits = [numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(bt, "bt"),
             numpy_helper.from_array(rng.standard_normal((4, 12, 1, 1)).astype(np.float32), "w2")]
    proto = one_input_model(nodes, inits, [1, 5, 4, 4], [1, 4, 6, 6])
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3, skip="")

    run_pipeline(model, [pass_])

    weights = initializer_arrays(model)
    assert pass_.summary.channels["up"] == (12, 8)
    assert weights["wt"].shape == (5, 8, 3, 3) and weights["bt"].shape == (8,) and weights["w2"].shape == (4, 8, 1, 1)
    check_full(model)
    feeds = {"x": rng.standard_normal((1, 5, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_activation_importance_reads_the_last_axis_after_a_matmul():
    # The four planted channels have the largest weights but a bias that keeps them below zero under Relu.
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((8, 12)).astype(np.float32)
    w1[:, list(_DEAD)] *= 10
    b1 = np.zeros(12, np.float32)
    b1[list(_DEAD)] = -1e4
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(rng.standard_normal((12, 8)).astype(np.float32), "w2")]
    proto = one_input_model(nodes, inits, [2, 5, 8], [2, 5, 8])
    calibration = [{"x": np.random.default_rng(10 + i).standard_normal((2, 5, 8)).astype(np.float32)} for i in range(4)]
    by_activation, by_norm = load(proto), load(proto)

    run_pipeline(by_activation, [PrunePass(pattern="channel", ratio=1 / 3, skip="", norm="activation", data=calibration)])
    run_pipeline(by_norm, [PrunePass(pattern="channel", ratio=1 / 3, skip="", norm="l1")])

    assert initializer_arrays(by_activation)["b1"].shape == (8,) and not np.any(initializer_arrays(by_activation)["b1"] < 0)
    want = run_ort(proto, X)[0]
    np.testing.assert_allclose(run_ort(by_activation, X)[0], want, rtol=1e-5, atol=1e-4)
    assert np.abs(run_ort(by_norm, X)[0] - want).max() > 1.0  # the weight norm keeps the silenced channels


def _small_encoder():
    return build_encoder(layers=2, hidden=32, heads=4, intermediate=64, vocab=50, max_positions=16, sequence=12, batch=2)


def test_encoder_prunes_each_feed_forward_and_leaves_attention_projections_with_their_reason():
    zoo = _small_encoder()
    model = load(zoo.model)
    pass_ = PrunePass(pattern="channel", ratio=0.25)

    run_pipeline(model, [pass_])

    assert sorted(pass_.summary.channels.values()) == [(64, 48), (64, 48)]
    assert all(name.endswith("/up_matmul") for name in pass_.summary.channels)
    reasons = {name: why for name, why in pass_.summary.skipped.items() if name.endswith("q_matmul")}
    assert len(reasons) == 2 and all(why.startswith("channels reach Reshape") for why in reasons.values())
    assert pass_.summary.skipped["layer0/attn/scores"].startswith("no constant weight")
    check_full(model)
    want, got = run_ort(zoo.model, zoo.feeds), run_ort(model, zoo.feeds)
    assert [w.shape for w in want] == [g.shape for g in got]


def test_reconstruction_refits_the_matmuls_after_pruned_feed_forwards():
    zoo = _small_encoder()
    expected = run_ort(zoo.model, zoo.feeds)[0]
    errors, passes = {}, {}
    for reconstruct in (False, True):
        model = load(zoo.model)
        passes[reconstruct] = PrunePass(pattern="channel", ratio=0.5, reconstruct=reconstruct, samples=16)
        run_pipeline(model, [passes[reconstruct]])
        check_full(model)
        got = run_ort(model, zoo.feeds)[0]
        errors[reconstruct] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    refit = passes[True].summary.reconstructed
    assert refit and all("matmul" in name for name in refit), refit
    # Seen: 0.0072 -> 0.0015 (every MatMul after the first pruned block refit, attention projections included).
    assert errors[True] < errors[False] / 2, errors


def test_default_skip_in_a_transformer_keeps_only_the_last_block_output_projection():
    zoo = _small_encoder()
    model = load(zoo.model)
    pass_ = PrunePass(sparsity=0.5)

    run_pipeline(model, [pass_])

    classifiers = [name for name, why in pass_.summary.skipped.items() if why == "final classifier (default skip)"]
    assert len(classifiers) == 1 and classifiers[0].endswith("/down_matmul"), pass_.summary.skipped
    assert len(pass_.summary.sparsity) == 11  # 2 blocks x 6 MatMuls by a weight, less the last one


def _constant_channels(consumer: str):
    """x [4, 8] -> MatMul up (8 -> 12) -> Add b1 -> Relu -> consumer -> y; the ``_DEAD`` channels are a constant 3.

    ``consumer`` "matmul": MatMul down then Add(b2, .); "gemm": Gemm with
    alpha 2 and beta 0.5 (the bias shift is scaled by alpha / beta).
    """
    inits = _two_linears(np.random.default_rng(5), outputs=5, dead=_DEAD, dead_bias=3.0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"])]
    if consumer == "matmul":
        nodes += [helper.make_node("MatMul", ["r", "w2"], ["o"], name="down"), helper.make_node("Add", ["b2", "o"], ["y"])]
    else:
        nodes.append(helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="down", alpha=2.0, beta=0.5))
    return one_input_model(nodes, inits, [4, 8], [4, 5])


@pytest.mark.parametrize("consumer", ["matmul", "gemm"])
def test_removed_constant_channels_move_into_the_consumer_bias(consumer):
    proto = _constant_channels(consumer)
    calibration = [{"x": np.random.default_rng(20 + i).standard_normal((4, 8)).astype(np.float32)} for i in range(3)]
    feeds = {"x": np.random.default_rng(30).standard_normal((4, 8)).astype(np.float32)}
    by_activation, by_norm = load(proto), load(proto)
    pass_ = PrunePass(pattern="channel", ratio=1 / 3, skip="", data=calibration)

    run_pipeline(by_activation, [pass_])
    run_pipeline(by_norm, [PrunePass(pattern="channel", ratio=1 / 3, skip="", norm="l1")])

    # Both remove the four constant channels (zero spread; zero weight norm), only the first keeps their 3 * w2 rows.
    assert initializer_arrays(by_activation)["w1"].shape == initializer_arrays(by_norm)["w1"].shape == (8, 8)
    assert pass_.summary.compensated == ["down"]
    assert not np.allclose(initializer_arrays(by_activation)["b2"], initializer_arrays(by_norm)["b2"])
    check_full(by_activation)
    want = run_ort(proto, feeds)[0]
    np.testing.assert_allclose(run_ort(by_activation, feeds)[0], want, rtol=1e-5, atol=1e-4)
    assert np.abs(run_ort(by_norm, feeds)[0] - want).max() > 1.0

"""Reconstruction skips layers whose Gram matrices would be too big, before building them.

alexnet's fc6 (9,217 inputs, batch 1) built 4 dense float64 grams of 0.7 GB
each and then solved them for minutes; vgg19's ended in a MemoryError.
"""

from __future__ import annotations

import numpy as np
from helpers import check_full
from onnx import TensorProto, helper, numpy_helper

from graphopt import load, run_pipeline
from passes.prune import PrunePass, prune, reconstruct, refit_channels


def _conv_fc(batch: int, seed: int = 0):
    """x [batch, 3, 8, 8] -> Conv c1 (3 -> 16, 3x3, pad 1) -> Relu -> Flatten -> Gemm fc (1024 -> 10) -> y."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((16, 3, 3, 3)) / 4, "w2": rng.standard_normal((10, 1024)) / 32, "b2": rng.standard_normal(10)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(value.astype(np.float32), key) for key, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(batch: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _refuse_grams_of(name: str, builder, nodes_at: int):
    """``builder`` (its node list at argument ``nodes_at``), failing when asked for ``name``'s grams."""

    def guarded(*args, **kwargs):
        nodes = args[nodes_at]
        assert all(node.name != name for node in nodes), f"grams built for {name}"
        return builder(*args, **kwargs)

    return guarded


def test_channel_refit_skips_a_layer_whose_grams_exceed_the_budget_before_building_them(monkeypatch):
    monkeypatch.setattr(reconstruct, "MAX_GRAM_BYTES", 10 * 2**20)  # fc's grams: 2 halves x 8 B x 705 x (705 + 1025) = 18.6 MiB
    monkeypatch.setattr(refit_channels, "cross_grams", _refuse_grams_of("fc", refit_channels.cross_grams, 2))
    model = load(_conv_fc(batch=64))
    pass_ = PrunePass(pattern="channel", ratio=0.3, align=1, skip="", reconstruct=True, data=_feeds(64, 4))

    run_pipeline(model, [pass_])

    assert pass_.summary.not_reconstructed == {"fc": "its Gram matrices would need 0.0 GiB (limit 0.00976562 GiB)"}


def test_channel_refit_still_runs_on_the_same_layer_with_enough_rows_and_budget():
    model = load(_conv_fc(batch=64))
    pass_ = PrunePass(pattern="channel", ratio=0.3, align=1, skip="", reconstruct=True, data=_feeds(64, 4))

    run_pipeline(model, [pass_])

    assert "fc" not in pass_.summary.not_reconstructed
    assert pass_.summary.reconstructed == ["fc"]


def test_unstructured_refit_skips_a_gemm_whose_grams_exceed_the_budget_before_building_them(monkeypatch):
    monkeypatch.setattr(reconstruct, "MAX_GRAM_BYTES", 10 * 2**20)  # fc's grams: 2 halves x 8 B x 1025^2 = 16 MiB
    monkeypatch.setattr(prune, "input_gram_halves", _refuse_grams_of("fc", prune.input_gram_halves, 1))
    model = load(_conv_fc(batch=1))
    pass_ = PrunePass(sparsity=0.5, skip="c1", reconstruct=True, data=_feeds(1, 4))

    run_pipeline(model, [pass_])

    assert pass_.summary.sparsity == {"fc": 0.5}
    assert pass_.summary.not_reconstructed == {"fc": "its Gram matrices would need 0.0 GiB (limit 0.00976562 GiB)"}
    check_full(model)


def test_a_wide_fc_layer_fed_few_rows_still_gets_its_grams_within_the_budget(monkeypatch):
    # Few rows alone are no reason to skip: the held-out check decides (resnet50's classifier,
    # 4 rows a half for 2,049 inputs, halved its output error).
    built = []

    def recording(*args, **kwargs):
        built.extend(node.name for node in args[2])
        return real(*args, **kwargs)

    real = refit_channels.cross_grams
    monkeypatch.setattr(refit_channels, "cross_grams", recording)
    model = load(_conv_fc(batch=1))
    pass_ = PrunePass(pattern="channel", ratio=0.3, align=1, skip="", reconstruct=True, data=_feeds(1, 8))

    run_pipeline(model, [pass_])

    assert "fc" in built  # 4 rows a half for 705 inputs
    assert "Gram" not in pass_.summary.not_reconstructed.get("fc", "")


def test_channel_summary_counts_refit_layers_and_does_not_call_a_refit_classifier_left_whole():
    model = load(_conv_fc(batch=64))
    pass_ = PrunePass(pattern="channel", ratio=0.3, align=1, reconstruct=True, data=_feeds(64, 4), skip="Gemm")

    run_pipeline(model, [pass_])

    summary = pass_.summary
    assert summary.reconstructed == ["fc"] and summary.skipped == {"fc": "skip option"}  # not pruned itself, but refit
    assert summary.line() == (
        "1 layer lost 5 of 16 output channels (tensors shrink, activation importance), "
        "1 layer took the removed channels' mean into their bias, "
        "skip= replaced the default skips (c1; add 'default' to keep them), 1 layer refit on calibration data"
    )

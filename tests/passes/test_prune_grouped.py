"""Channel pruning through grouped convs: every group loses as many channels, so the group count stays.

Exactness checks plant dead channels (all-zero filters, no bias), two in
each group, so a cut of half the channels removes exactly those.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_full, initializer_arrays, one_input_model, run_ort
from onnx import helper, numpy_helper

from graphopt import load, run_pipeline
from passes.prune import PrunePass

_DEAD = (1, 2, 5, 6)  # two of the four channels in each of two groups


def _into_grouped(dead=_DEAD, consumer_groups: int = 2):
    """x [1, 3, 6, 6] -> Conv c1 (8 out; ``dead`` filters zero) -> Relu -> Conv g (``consumer_groups`` groups, 8 -> 6) -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[list(dead)] = 0.0
    wg = rng.standard_normal((6 if consumer_groups == 2 else 8, 8 // consumer_groups, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "wg", "bg"], ["y"], name="g", group=consumer_groups, pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(wg, "wg"),
             numpy_helper.from_array(rng.standard_normal(wg.shape[0]).astype(np.float32), "bg")]
    return one_input_model(nodes, inits, [1, 3, 6, 6], [1, wg.shape[0], 6, 6])


def _from_grouped(producer_groups: int = 2, consumer_groups: int = 1):
    """x [1, 4, 6, 6] -> Conv gp (``producer_groups`` groups, 4 -> 8; ``_DEAD`` filters zero) -> Relu -> Conv c2 (``consumer_groups``, 8 -> 4)."""
    rng = np.random.default_rng(1)
    wp = rng.standard_normal((8, 4 // producer_groups, 3, 3)).astype(np.float32)
    wp[list(_DEAD)] = 0.0
    nodes = [helper.make_node("Conv", ["x", "wp"], ["c"], name="gp", group=producer_groups, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", group=consumer_groups)]
    inits = [numpy_helper.from_array(wp, "wp"), numpy_helper.from_array(rng.standard_normal((4, 8 // consumer_groups, 1, 1)).astype(np.float32), "w2")]
    return one_input_model(nodes, inits, [1, 4, 6, 6], [1, 4, 6, 6])


def _same_outputs(proto, model, channels: int) -> None:
    feeds = {"x": np.random.default_rng(9).standard_normal((1, channels, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_grouped_consumer_loses_the_same_input_channels_in_each_group():
    proto = _into_grouped()
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=0.5, skip="", align=1)

    run_pipeline(model, [pass_])

    weights = initializer_arrays(model)
    assert pass_.summary.channels == {"c1": (8, 4)}
    assert weights["w1"].shape == (4, 3, 3, 3) and weights["wg"].shape == (6, 2, 3, 3)
    assert next(node for node in model.graph if node.name == "g").attributes.get_int("group") == 2
    check_full(model)
    _same_outputs(proto, model, 3)


def test_a_grouped_producer_loses_the_same_output_channels_in_each_group():
    proto = _from_grouped()
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=0.5, skip="", align=1)

    run_pipeline(model, [pass_])

    assert pass_.summary.channels["gp"] == (8, 4)
    assert initializer_arrays(model)["wp"].shape == (4, 2, 3, 3) and initializer_arrays(model)["w2"].shape == (4, 4, 1, 1)
    check_full(model)
    _same_outputs(proto, model, 4)


def test_groups_keep_equal_sizes_when_the_least_important_channels_sit_in_one_group():
    # Channels 0-2 are dead, all in group 0: a free choice would remove them and one more; each group keeps 2.
    proto = _into_grouped(dead=(0, 1, 2))
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=0.5, skip="", align=1)

    run_pipeline(model, [pass_])

    kept_filters = initializer_arrays(model)["w1"]
    assert kept_filters.shape == (4, 3, 3, 3) and int((np.abs(kept_filters).sum(axis=(1, 2, 3)) == 0).sum()) == 1
    check_full(model)
    assert run_ort(model, {"x": np.zeros((1, 3, 6, 6), np.float32)})[0].shape == (1, 6, 6, 6)


def test_reconstruction_leaves_a_grouped_consumer_and_says_why():
    proto = _into_grouped()
    model = load(proto)
    calibration = [{"x": np.random.default_rng(i).standard_normal((1, 3, 6, 6)).astype(np.float32)} for i in range(4)]
    pass_ = PrunePass(pattern="channel", ratio=0.5, skip="", align=1, reconstruct=True, data=calibration)

    run_pipeline(model, [pass_])

    assert pass_.summary.not_reconstructed["g"].startswith("reconstruction of this Conv is not built")
    check_full(model)
    _same_outputs(proto, model, 3)


@pytest.mark.parametrize("producer_groups,consumer_groups", [(2, 4), (4, 2)])
def test_chains_grouped_two_ways_are_left_alone(producer_groups, consumer_groups):
    proto = _from_grouped(producer_groups, consumer_groups)
    model = load(proto)
    pass_ = PrunePass(pattern="channel", ratio=0.5, skip="", align=1)

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert pass_.summary.skipped["gp"] == "channels reach grouped conv Conv c2, grouped differently from the layers around it"

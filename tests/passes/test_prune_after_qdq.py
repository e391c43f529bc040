"""prune and lowrank on a model already through qdq: the weights are int8 behind DequantizeLinear, and the reason says so.

Found by an exploratory tester: prune called such a weight "computed, as
attention's operands are" and lowrank "not a float initializer", neither of
which tells the user to run them before qdq.
"""

from __future__ import annotations

import pytest
from helpers import check_full, to_proto

import model_zoo
from graphopt import load, run_pipeline
from passes.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.qdq import QuantizePass


def _quantized_cnn():
    """cnn_bn (Conv, Conv, Gemm) through qdq, every layer's weight an int8 initializer read by a DequantizeLinear."""
    model = load(model_zoo.build("cnn_bn").model)
    qdq = QuantizePass(samples=4, check_speed=False)
    run_pipeline(model, [qdq])
    assert len(qdq.summary.quantized) == 3
    return model


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: PrunePass(skip=""), "prune"),
        (lambda: PrunePass(pattern="channel", skip=""), "prune"),
        (lambda: PrunePass(pattern="2:4", skip=""), "prune"),
        (lambda: LowRankPass(check_speed=False), "lowrank"),
    ],
)
def test_a_weight_behind_dequantize_linear_is_left_whole_with_advice_to_run_the_pass_before_qdq(make, name):
    model = _quantized_cnn()
    before = to_proto(model).SerializeToString()
    pass_ = make()

    result = run_pipeline(model, [pass_])

    reason = f"weight is quantized (behind DequantizeLinear): run {name} before qdq"
    assert result.modified is False
    assert pass_.summary.skipped == dict.fromkeys(("conv_c1", "conv_c2", "gemm_logits"), reason)
    assert reason in pass_.details()["summary"]
    check_full(model)
    assert to_proto(model).SerializeToString() == before

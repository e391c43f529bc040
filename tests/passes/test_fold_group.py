"""The fold group on every model_zoo model: smaller or equal, valid, same outputs.

Error bound: folds that rewrite weights (BatchNorm, Mul/Div into Conv/Gemm)
change float32 rounding, so outputs are compared within 1e-4 of each output's
largest magnitude (seen: at most 3.8e-5, on resnet50); every other rewrite is
exact. Tests of the single passes hold them to the 1e-5 / 1e-6 contract.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import check_full, parse, run_ort, to_proto

import model_zoo
from graphopt import load, run_pipeline
from passes.fold import FixedPointGroup

RELATIVE_BOUND = 1e-4

# What fold must remove from each model, beyond not growing it.
_GONE = {
    "cnn_bn": {"BatchNormalization"},
    "residual": {"BatchNormalization"},
    "constant_weights": {"Constant"},
    "resnet50": {"BatchNormalization"},
    "inception_v2": {"BatchNormalization"},
    "squeezenet": {"Dropout"},
    "vgg19": {"Dropout"},
}


def _ops(model) -> list[str]:
    return [node.op_type for node in model.graph.all_nodes()]


@pytest.mark.parametrize("name", model_zoo.names())
def test_fold_shrinks_or_keeps_zoo_model_and_its_outputs(name):
    zoo = model_zoo.build(name)
    model = load(zoo.model)
    before = _ops(model)

    result = run_pipeline(model, "fold")

    after = _ops(result.model)
    assert len(after) <= len(before)
    assert not _GONE.get(name, set()) & set(after)
    if name != "vgg19":  # 550 MB: the full check serializes it twice; the zoo tests check it unfolded
        check_full(result.model)
    for want, got in zip(run_ort(zoo.model, zoo.feeds), run_ort(to_proto(result.model), zoo.feeds)):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE_BOUND * scale + 1e-6)
    assert run_pipeline(result.model, "fold").modified is False


class _Recording(ir.passes.InPlacePass):
    """Counts its calls; with ``rewrite_relu_to``, renames every Relu's op type and reports a change."""

    def __init__(self, trigger_ops=None, rewrite_relu_to=None):
        super().__init__()
        if trigger_ops is not None:
            self.trigger_ops = frozenset(trigger_ops)
        self.rewrite_relu_to = rewrite_relu_to
        self.calls = 0

    def call(self, model):
        self.calls += 1
        changed = False
        if self.rewrite_relu_to:
            for node in model.graph:
                if node.op_type == "Relu":
                    node.op_type = self.rewrite_relu_to
                    changed = True
        return ir.passes.PassResult(model, changed)


_RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) { y = Relu(x) }
"""


def test_fixed_point_group_skips_members_whose_ops_are_absent():
    gated, ungated = _Recording(trigger_ops={"Transpose"}), _Recording()

    result = FixedPointGroup([gated, ungated], max_rounds=5)(parse(_RELU))

    assert result.modified is False
    assert (gated.calls, ungated.calls) == (0, 1)


def test_fixed_point_group_runs_a_gated_member_once_its_op_appears():
    # The producer turns Relu into Identity, so the gated member runs after it
    # and finds nothing; the producer's second run, finding nothing either,
    # ends the group: both members have seen the final model.
    producer = _Recording(rewrite_relu_to="Identity")
    gated = _Recording(trigger_ops={"Identity"})

    result = FixedPointGroup([producer, gated], max_rounds=5)(parse(_RELU))

    assert result.modified is True
    assert [node.op_type for node in result.model.graph] == ["Identity"]
    assert (producer.calls, gated.calls) == (2, 1)


def test_fixed_point_group_reruns_members_before_the_last_change_only():
    before, changer, after = _Recording(), _Recording(rewrite_relu_to="Identity"), _Recording()

    FixedPointGroup([before, changer, after], max_rounds=5)(parse(_RELU))

    # Round 1: all three run, the changer changes. Round 2: before and the
    # changer find nothing; after already saw the final model.
    assert (before.calls, changer.calls, after.calls) == (2, 2, 1)


def test_fixed_point_group_stops_after_max_rounds():
    flipper = _Recording(rewrite_relu_to="Relu")  # "changes" every round

    FixedPointGroup([flipper], max_rounds=3)(parse(_RELU))

    assert flipper.calls == 3


def test_fold_members_trigger_ops_cover_what_they_rewrite():
    from passes.fold.noops import _CHECKS, EliminateNoOpsPass

    assert EliminateNoOpsPass.trigger_ops == frozenset(_CHECKS)

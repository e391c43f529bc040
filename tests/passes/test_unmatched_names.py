"""Names in prune(skip=...), lowrank(skip=...) and qdq(exclude=...) that match no node name or op type are reported, not silently ignored."""

from __future__ import annotations

import logging

import model_zoo
from graphopt import load, run_pipeline
from passes.lowrank.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.qdq import QuantizePass


def _cnn():
    return load(model_zoo.build("cnn_bn").model)  # conv_c1, conv_c2, gemm_logits


def test_prune_warns_about_skip_entries_that_match_nothing_and_says_the_default_skips_were_replaced(caplog):
    pass_ = PrunePass(pattern="channel", ratio=0.5, align=1, skip="nosuch,Convv")

    with caplog.at_level(logging.WARNING):
        run_pipeline(_cnn(), [pass_])

    summary = pass_.summary
    assert summary.unmatched_skip == ["Convv", "nosuch"]
    assert summary.defaults_replaced == ["conv_c1", "gemm_logits"]
    assert "skip entries match no node name or op type: Convv, nosuch" in caplog.text
    line = summary.line()
    assert "skip entries matching no node or op type: Convv, nosuch" in line
    assert "skip= replaced the default skips (conv_c1, gemm_logits; add 'default' to keep them)" in line


def test_prune_says_nothing_when_every_skip_entry_matches_and_default_is_kept(caplog):
    pass_ = PrunePass(sparsity=0.5, skip="default,Gemm")

    with caplog.at_level(logging.WARNING):
        run_pipeline(_cnn(), [pass_])

    assert pass_.summary.unmatched_skip == [] and pass_.summary.defaults_replaced == []
    assert "match no node" not in caplog.text
    assert "matching no node" not in pass_.summary.line() and "replaced the default" not in pass_.summary.line()


def test_qdq_warns_about_exclude_entries_that_match_nothing(caplog):
    pass_ = QuantizePass(check_speed=False, exclude=["Convv", "conv_c2"])

    with caplog.at_level(logging.WARNING):
        run_pipeline(_cnn(), [pass_])

    assert pass_.summary.unmatched_exclude == ["Convv"]
    assert "exclude entries match no node name or op type: Convv" in caplog.text
    assert "exclude entries matching no node or op type: Convv" in pass_.summary.line()
    assert "conv_c2" in pass_.summary.float_layers  # the entry that matches still works


def test_lowrank_warns_about_skip_entries_that_match_nothing(caplog):
    pass_ = LowRankPass(rank=2, check_speed=False, skip="gemm_logit")

    with caplog.at_level(logging.WARNING):
        run_pipeline(_cnn(), [pass_])

    assert pass_.summary.unmatched_skip == ["gemm_logit"]
    assert "skip entries match no node name or op type: gemm_logit" in caplog.text
    assert "skip entries matching no node or op type: gemm_logit" in pass_.summary.line()

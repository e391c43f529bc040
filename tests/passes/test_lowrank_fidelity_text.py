"""How lowrank's summary words its held-back fidelity: one sample has no spread, and nothing finite is not a figure."""

from __future__ import annotations

import math

from passes.lowrank.lowrank import LowRankSummary


def _line(**fidelity) -> str:
    return LowRankSummary(fidelity={"target_cosine": 0.9, "steps": 1, "of": 2, **fidelity}).line()


def test_one_held_back_sample_says_there_is_no_spread_estimate_instead_of_a_bound_equal_to_the_figure():
    line = _line(cosine=0.95423, lower_bound=0.95423, samples=1)
    assert "output cosine 0.95423 on held-back samples (one held-back sample: no spread estimate; target 0.9)" in line
    assert "allowing for their spread" not in line


def test_several_held_back_samples_keep_the_bound_allowing_for_their_spread():
    line = _line(cosine=0.96, lower_bound=0.95, samples=4)
    assert "output cosine 0.96000 on held-back samples, at least 0.95000 allowing for their spread (target 0.9)" in line


def test_nothing_finite_to_compare_says_not_measured():
    line = _line(cosine=math.nan, lower_bound=math.nan, samples=0)
    assert "output cosine not measured (no finite value in the original's outputs to compare) (target 0.9)" in line
    assert "nan" not in line

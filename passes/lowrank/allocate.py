"""Rank allocation across layers: under a fidelity budget (``target_cosine``) or a parameter one (``scope=global``).

Each layer gets a ladder of ranks, one rung per share of its parameters in
LEVELS. A step down a rung has a predicted cost: how much the layer's
squared relative output error grows per parameter the step saves. The
error comes from the singular values the rung drops: those of L^T W when
data-aware (the error on the calibration activations), of W otherwise, and
of the two channel modes for Tucker-2.

That error is relative to the layer's own output, and layers pass very
different shares of it to the model's output: on all-MiniLM-L6-v2, at the
same predicted error, a feed-forward layer moves the output 10-100x more
than a query projection. So each ladder is rescaled by a measurement: the
layer is factored alone at its middle rung (``reference_rung``) and the
model's output drift is measured (``rescaled``). Allocating by the
predicted errors alone put MiniLM's feed-forward output layers at rank 6
and did worse than every layer at the same share; rescaled, it beats it
(bench/lowrank.py).

Steps are taken cheapest first, each layer's rungs in order. For
``target_cosine`` the model's output cosine need not fall monotonically with
the number of steps, so the pass bisects on that number, measuring the
cosine on held-back samples the factors were not fitted to, and keeps the
most steps that meet the target; for a parameter budget it takes steps
until the layers fit in it (``steps_within``).
"""

from __future__ import annotations

__all__ = [
    "LEVELS",
    "Step",
    "allocation",
    "dropped_energy",
    "ladder",
    "most_steps",
    "plan",
    "reference_rung",
    "rescaled",
    "rungs",
    "steps_within",
]

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from passes.lowrank import factor
from passes.lowrank.layers import Layer

# Shares of a layer's parameters its rungs keep: fine enough that a parameter
# budget is met closely, since no layer need stop exactly at the average share.
LEVELS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.075, 0.05, 0.025)

Rung = tuple[tuple[int, ...], int, float]  # (ranks, parameters, predicted squared relative error)


@dataclass(frozen=True)
class Step:
    """Factoring ``layer`` at ``ranks``: its parameters then and the squared relative output error predicted."""

    layer: str
    ranks: tuple[int, ...]
    params: int
    error: float


def dropped_energy(singular_values: np.ndarray, rank: int) -> float:
    """Share of the squared singular values beyond ``rank``: the squared relative error of a rank-``rank`` fit."""
    squares = np.asarray(singular_values, np.float64) ** 2
    total = float(squares.sum())
    return float(squares[rank:].sum() / total) if total > 0 else 0.0


def rungs(layer: Layer, fitted: factor.Fit | None, min_gain: float) -> list[Rung]:
    """The layer's rung at each of LEVELS that saves ``min_gain`` of its parameters, predicted error from its spectrum.

    Whitened (``fitted``, data-aware) or plain singular values for two
    factors; both channel modes' for Tucker-2, their dropped shares added.
    """
    found = []
    if layer.kind == "tucker":
        out_channels, in_channels, kh, kw = layer.kernel.shape
        out_values, in_values = factor.mode_singular_values(layer.kernel)
        for level in LEVELS:
            r_out, r_in = factor.tucker_ranks_for_ratio(out_channels, in_channels, kh * kw, level)
            params = in_channels * r_in + r_out * r_in * kh * kw + r_out * out_channels
            found.append(((r_out, r_in), params, dropped_energy(out_values, r_out) + dropped_energy(in_values, r_in)))
    else:
        k, n = layer.matrix.shape
        values = factor.singular_values(layer.matrix) if fitted is None else fitted.singular_values()
        for level in LEVELS:
            rank = min(factor.matrix_rank_for_ratio(k, n, level), k, n)
            found.append(((rank,), rank * (k + n), dropped_energy(values, rank)))
    return [rung for rung in found if rung[1] <= (1 - min_gain) * layer.params]


def ladder(layer: str, rungs: Sequence[Rung], dense_params: int) -> list[Step]:
    """The layer's steps from ``rungs`` (ranks, params, error), fewest-parameter-saving first, duplicates and non-savers dropped."""
    steps, params = [], dense_params
    for ranks, count, error in sorted(rungs, key=lambda rung: -rung[1]):
        if count < params:
            steps.append(Step(layer, tuple(ranks), count, error))
            params = count
    return steps


def plan(ladders: Sequence[list[Step]], dense_params: dict[str, int]) -> list[Step]:
    """Every step of every ladder, cheapest first (error growth per parameter saved), each ladder in order."""
    keyed = []
    for steps in ladders:
        previous_params, previous_error, worst = None, 0.0, 0.0
        for index, step in enumerate(steps):
            before = dense_params[step.layer] if previous_params is None else previous_params
            cost = (step.error - previous_error) / max(before - step.params, 1)
            worst = max(worst, cost)  # a later rung never goes before an earlier one
            keyed.append((worst, index, step))
            previous_params, previous_error = step.params, step.error
    return [step for _, _, step in sorted(keyed, key=lambda item: (item[0], item[1]))]


def allocation(steps: Sequence[Step]) -> dict[str, tuple[int, ...]]:
    """The ranks each layer ends at after taking ``steps`` in order."""
    ranks: dict[str, tuple[int, ...]] = {}
    for step in steps:
        ranks[step.layer] = step.ranks
    return ranks


def reference_rung(rungs: Sequence[Rung], dense_params: int) -> Rung | None:
    """The rung whose measured drift calibrates the layer's ladder: the one nearest half its parameters that drops something."""
    dropping = [rung for rung in rungs if rung[2] > 0]
    return min(dropping, key=lambda rung: abs(rung[1] - dense_params / 2), default=None)


def rescaled(rungs: Sequence[Rung], reference: Rung, measured: float) -> list[Rung]:
    """``rungs`` with every predicted error scaled so that ``reference``'s equals ``measured``."""
    scale = measured / reference[2]
    return [(ranks, params, error * scale) for ranks, params, error in rungs]


def steps_within(steps: Sequence[Step], dense_params: dict[str, int], budget: float) -> int:
    """How many of ``steps``, in order, bring the layers' parameters to ``budget`` or below (all of them if none do)."""
    current = dict(dense_params)
    total = sum(current.values())
    for count, step in enumerate(steps):
        if total <= budget:
            return count
        total += step.params - current[step.layer]
        current[step.layer] = step.params
    return len(steps)


def most_steps(count: int, meets: Callable[[int], bool]) -> int:
    """The largest m in [0, count] for which ``meets(m)`` holds, by bisection (m = 0, no factoring, is taken to hold)."""
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        if meets(middle):
            low = middle
        else:
            high = middle - 1
    return low


"""Rank allocation under a fidelity budget (``target_cosine``).

Each layer gets a ladder of ranks, one rung per share of its parameters in
LEVELS. A step down a rung has a predicted cost: how much the layer's
squared relative output error grows per parameter the step saves. The
error comes from the singular values the rung drops: those of L^T W when
data-aware (the error on the calibration activations), of W otherwise, and
of the two channel modes for Tucker-2. Steps are taken cheapest first,
each layer's rungs in order. The model's output cosine need not fall
monotonically with the number of steps, so the pass bisects on that number,
measuring the cosine on held-back samples the factors were not fitted to,
and keeps the most steps that meet the target (see LowRankPass).
"""

from __future__ import annotations

__all__ = ["LEVELS", "Step", "allocation", "dropped_energy", "ladder", "most_steps", "plan"]

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LEVELS = (0.9, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.025)


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


def ladder(layer: str, rungs: Sequence[tuple[tuple[int, ...], int, float]], dense_params: int) -> list[Step]:
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


"""Task metrics in validation: top-1 accuracy against labels in the data, or the caller's own metric.

Output drift says how far the rewritten model moved; a task metric says what
that costs the user. With ``labels`` in the data files (one array beside the
inputs of each ``.npz``), validation reports both models' top-1 accuracy on
the first output that holds class scores ([N, C] or [N, C, 1, 1]) and the
drop. A ``metric(outputs, sample) -> float`` callback replaces it: it gets one
model's outputs by name and the sample (inputs, and ``labels`` when the data
has them) and scores that sample; the report gives the mean over samples.
"""

from __future__ import annotations

__all__ = ["TaskMetric", "TaskScore"]

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphopt.data import LABELS_KEY
from graphopt.errors import DataError

TaskMetric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


class TaskScore:
    """Accumulates one task metric for the reference and the candidate over the samples."""

    def __init__(self, metric: TaskMetric | None = None) -> None:
        self.metric = metric
        self.name = getattr(metric, "__name__", "task metric") if metric is not None else "top-1 accuracy"
        self._totals = [0.0, 0.0]
        self._count = 0  # samples for a metric callback, labelled rows for accuracy

    def update(self, sample: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        """Scores one sample's outputs of both models (a no-op for accuracy when the sample has no labels)."""
        if self.metric is not None:
            self._totals[0] += float(self.metric(reference, sample))
            self._totals[1] += float(self.metric(candidate, sample))
            self._count += 1
            return
        labels = sample.get(LABELS_KEY)
        if labels is None:
            return
        labels = np.asarray(labels).reshape(-1)
        for index, outputs in enumerate((reference, candidate)):
            self._totals[index] += _hits(outputs, labels)
        self._count += labels.size

    def result(self) -> dict[str, Any] | None:
        """``{metric, reference, candidate, drop, count}``, or None when nothing was scored."""
        if not self._count:
            return None
        reference, candidate = (total / self._count for total in self._totals)
        count_name = "samples" if self.metric is not None else "labelled rows"
        return {"metric": self.name, "reference": reference, "candidate": candidate, "drop": reference - candidate, count_name: self._count}


def _hits(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> int:
    """Rows whose top-1 class in the first class-score output equals the label."""
    for name, scores in outputs.items():
        shape = scores.shape
        if scores.dtype.kind == "f" and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))) and shape[1] >= 2:
            if shape[0] != labels.size:
                raise DataError(f"labels: {labels.size} labels for {shape[0]} rows of output '{name}'")
            return int((scores.reshape(shape[0], shape[1]).argmax(axis=1) == labels).sum())
    raise DataError("labels given, but no model output holds class scores ([N, C] or [N, C, 1, 1])")

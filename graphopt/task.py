"""Task metrics in validation: top-1 accuracy against labels in the data, or the caller's own metric.

Output drift says how far the rewritten model moved; a task metric says what
that costs the user. With ``labels`` in the data files (one array beside the
inputs of each ``.npz``), validation reports both models' top-1 accuracy on
the first output that holds class scores ([N, C] or [N, C, 1, 1]) and the
drop. Labels are class indices in ``[0, C)``, one per row of that output
(any shape holding that many, e.g. ``(N,)`` or ``(N, 1)``); integer dtypes,
or floats that are whole numbers. One-hot or probability rows, shape
``(N, C)``, are refused with the fix (``labels.argmax(axis=1)``) rather than
read by argmax: soft labels (label smoothing, mixup) look the same and their
argmax is not what they mean. A ``metric(outputs, sample) -> float`` callback replaces it: it gets one
model's outputs by name and the sample (inputs, and ``labels`` when the data
has them) and scores that sample; the report gives the mean over samples.
"""

from __future__ import annotations

__all__ = ["TaskMetric", "TaskScore"]

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphopt.data import LABELS_KEY
from graphopt.errors import DataError
from graphopt.metrics import class_score_shape

TaskMetric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


class TaskScore:
    """Accumulates one task metric for the reference and the candidate over the samples."""

    def __init__(self, metric: TaskMetric | None = None) -> None:
        self.metric = metric
        self.name = getattr(metric, "__name__", "task metric") if metric is not None else "top-1 accuracy"
        self._totals = [0.0, 0.0]
        self._count = 0  # samples for a metric callback, labelled rows for accuracy
        self._samples = 0  # samples seen, to name the one whose labels are wrong

    def update(self, sample: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        """Scores one sample's outputs of both models (a no-op for accuracy when the sample has no labels)."""
        if self.metric is not None:
            self._totals[0] += float(self.metric(reference, sample))
            self._totals[1] += float(self.metric(candidate, sample))
            self._count += 1
            return
        index, self._samples = self._samples, self._samples + 1
        labels = sample.get(LABELS_KEY)
        if labels is None:
            return
        name, scores = _class_scores(reference)
        try:
            labels = _class_indices(np.asarray(labels), name, scores.shape)
        except DataError as exc:
            raise DataError(f"sample {index}: {exc}") from None
        for total, outputs in enumerate((reference, candidate)):
            self._totals[total] += _hits(outputs.get(name), labels)
        self._count += labels.size

    def result(self) -> dict[str, Any] | None:
        """``{metric, reference, candidate, drop, count}``, or None when nothing was scored."""
        if not self._count:
            return None
        reference, candidate = (total / self._count for total in self._totals)
        count_name = "samples" if self.metric is not None else "labelled rows"
        return {"metric": self.name, "reference": reference, "candidate": candidate, "drop": reference - candidate, count_name: self._count}


def _class_scores(outputs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The first output holding class scores, [N, C] or [N, C, 1, 1] floats with C >= 2."""
    for name, scores in outputs.items():
        if not isinstance(scores, np.ndarray):  # sequence, map or optional outputs
            continue
        shape = scores.shape
        if scores.dtype.kind == "f" and class_score_shape(shape):
            return name, scores
    raise DataError("labels given, but no model output holds class scores ([N, C] or [N, C, 1, 1])")


def _hits(scores: Any, labels: np.ndarray) -> int:
    """Rows whose top-1 class is the label; none when the output has not one class-score row per label.

    The candidate's output may have changed shape (the output comparison fails it): it scores nothing.
    """
    if not isinstance(scores, np.ndarray) or scores.ndim < 2 or scores.shape[0] != labels.size or math.prod(scores.shape[2:]) != 1:
        return 0
    return int((scores.reshape(scores.shape[0], scores.shape[1]).argmax(axis=1) == labels).sum())


def _class_indices(labels: np.ndarray, output: str, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` as int64 class indices, one per row of the class scores, or a DataError saying what is wrong."""
    rows, classes = shape[0], shape[1]
    if labels.ndim == 2 and labels.shape == (rows, classes) and classes > 1:
        raise DataError(
            f"labels of shape {labels.shape} look one-hot or like class probabilities for output '{output}': "
            f"give class indices, shape ({rows},), e.g. labels.argmax(axis=1)"
        )
    flat = labels.reshape(-1)
    if flat.size != rows:
        raise DataError(f"labels: {flat.size} labels for {rows} rows of output '{output}'")
    if flat.dtype.kind not in "iuf":
        raise DataError(f"labels must be integer class indices, got dtype {flat.dtype}")
    if flat.dtype.kind == "f":
        whole = np.isfinite(flat) & (flat == np.round(flat))
        if not whole.all():
            raise DataError(f"labels must be integer class indices, got {flat[~whole][0].item()} (dtype {flat.dtype})")
    outside = (flat < 0) | (flat >= classes)
    if outside.any():
        raise DataError(f"label {flat[outside][0].item()} out of range [0, {classes}) for the {classes} classes of output '{output}'")
    return flat.astype(np.int64)

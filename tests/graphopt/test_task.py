"""graphopt.task: top-1 accuracy from labels, and the checks that refuse labels that cannot be class indices."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import DataError
from graphopt.task import TaskScore

SCORES = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.3, 0.4]], np.float32)  # top-1: 1, 0, 2, 2


def _score(labels, candidate=SCORES) -> dict:
    task = TaskScore()
    task.update({"x": np.zeros(1), "labels": labels}, {"p": SCORES}, {"p": candidate})
    return task.result()


def test_accuracy_counts_rows_whose_top1_is_the_label_for_both_models():
    candidate = SCORES[:, [1, 0, 2]]  # swaps classes 0 and 1: rows 0 and 1 go wrong

    result = _score(np.array([1, 0, 2, 0]), candidate)

    assert result == {"metric": "top-1 accuracy", "reference": 0.75, "candidate": 0.25, "drop": 0.5, "labelled rows": 4}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([1.0, 0.0, 2.5, 0.0]), r"labels must be integer class indices, got 2\.5 \(dtype float64\)"),
        (np.array([1.0, 0.0, np.nan, 0.0]), r"labels must be integer class indices, got nan"),
        (np.array([1, 0, 3, 0]), r"label 3 out of range \[0, 3\) for the 3 classes of output 'p'"),
        (np.array([1, 0, -2, 0]), r"label -2 out of range \[0, 3\)"),
        (np.array(["1", "0", "2", "0"]), r"labels must be integer class indices, got dtype <U1"),
        (np.eye(3)[[1, 0, 2, 2]], r"labels of shape \(4, 3\) look one-hot or like class probabilities for output 'p'"),
        (np.full((4, 3), 1 / 3), r"look one-hot or like class probabilities"),
        (np.array([1, 0, 2]), r"labels: 3 labels for 4 rows of output 'p'"),
    ],
)
def test_labels_that_cannot_be_class_indices_raise_data_error(labels, message):
    with pytest.raises(DataError, match=message):
        _score(labels)


def test_the_error_names_the_sample_whose_labels_are_wrong():
    task = TaskScore()
    task.update({"labels": np.array([1, 0, 2, 2])}, {"p": SCORES}, {"p": SCORES})
    task.update({}, {"p": SCORES}, {"p": SCORES})  # unlabelled samples still count

    with pytest.raises(DataError, match=r"^sample 2: label 7 out of range"):
        task.update({"labels": np.array([1, 0, 7, 2])}, {"p": SCORES}, {"p": SCORES})


def test_a_candidate_whose_output_lost_its_rows_scores_nothing_instead_of_crashing():
    # The output comparison fails such a candidate; the task metric must not raise on the mismatch.
    result = _score(np.array([1, 0, 2, 2]), SCORES[:2])

    assert (result["reference"], result["candidate"]) == (1.0, 0.0)


def test_labels_without_a_class_score_output_raise_data_error():
    task = TaskScore()

    with pytest.raises(DataError, match="no model output holds class scores"):
        task.update({"labels": np.array([1])}, {"boxes": np.zeros((1, 4, 3))}, {"boxes": np.zeros((1, 4, 3))})

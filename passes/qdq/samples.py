"""Calibration samples for ``qdq``: re-readable, and never all in memory at once.

Calibration may read the samples several times (once per chunk of exposed
tensors, once more for bias correction), so each read opens a fresh stream:
synthesized feeds are regenerated from their seed, ``.npz`` files are read
again from disk, and a list is iterated again. Only a one-shot source (a
generator, an onnxruntime ``CalibrationDataReader``) is read into memory,
because it cannot be rewound.

With a fidelity target, every fourth sample (at most ``MAX_HELD_BACK``) is
held back from calibration to judge the quantized model on data it was not
calibrated on; those few are kept in memory. Without one, ``check_unseen``
still judges on unseen samples where that costs calibration little:
synthesized ones come from a stream of their own, and real data gives up
every fourth sample (at most ``_CHECK_SAMPLES``) when ``MIN_CALIBRATION``
are left; otherwise the first calibration samples judge, and
``judged_on`` says so.
"""

from __future__ import annotations

__all__ = ["Samples", "MAX_HELD_BACK", "MIN_CALIBRATION", "CALIBRATION_SEED_OFFSET", "CHECK_SEED_OFFSET"]

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from graphopt.data import Feeds, load_feeds, synthesize_feeds
from graphopt.errors import GraphoptError

MAX_HELD_BACK = 16
# Synthesized calibration feeds use seed + this: graphopt.validate synthesizes with seed 0 by
# default, and a pass fitted to the feeds it is then judged on (prune's reconstruction, data-aware
# lowrank) would look lossless (digits_cnn channel pruning: rel L2 6e-5 on them, 0.24 elsewhere).
CALIBRATION_SEED_OFFSET = 7919
# Synthesized samples that judge a result without a target: a stream apart from calibration's.
CHECK_SEED_OFFSET = 104729
# Without a target, the fidelity and speed figures use this many samples.
_CHECK_SAMPLES = 4
# Real data without a target gives up samples to judge on only if this many are left to calibrate on:
# with fewer, a quarter less calibration data costs more than an in-sample figure (resnet50 with 16
# samples, 12 calibrating: output cosine 0.954 -> 0.948, its int8 activations alone 0.956 -> 0.921).
MIN_CALIBRATION = 60


class Samples:
    """Calibration samples (a fresh stream per call) and the samples that judge the result.

    ``judged_on`` is ``"held back"`` when calibration never reads
    ``held_back``, ``"calibration"`` when they are its first samples.
    """

    def __init__(
        self,
        model: ir.Model,
        data: Any,
        *,
        count: int,
        seed: int,
        hold_back: bool,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        check_unseen: bool = False,
    ) -> None:
        """``shapes`` fixes dynamic dims of synthesized samples (``--shape``); real data keeps its own.

        ``hold_back``: a fidelity target's samples, always held back.
        ``check_unseen``: without ``hold_back``, judge on unseen samples where calibration can spare them.
        """
        self._open = _opener(model, data, count, seed, shapes)
        held: dict[int, Feeds] = {}
        first: list[Feeds] = []
        total, last = 0, None
        for index, feeds in enumerate(self._open()):
            total, last = index + 1, feeds
            if index < _CHECK_SAMPLES:
                first.append(feeds)
            if index % 4 == 3 and len(held) < (MAX_HELD_BACK if hold_back else _CHECK_SAMPLES):
                held[index] = feeds
        if total == 0:
            raise GraphoptError("the calibration data is empty")
        if hold_back and not held:
            if total < 2:
                raise GraphoptError("target_cosine/target_snr need at least 2 calibration samples (one is held back)")
            held[total - 1] = last  # type: ignore[assignment]
        self.count = total
        self.judged_on = "held back"
        if not hold_back and check_unseen and data is None:
            held = {}  # calibration keeps every sample: unseen ones cost nothing to draw
            self.held_back: list[Feeds] = list(
                synthesize_feeds(model, count=_CHECK_SAMPLES, seed=CHECK_SEED_OFFSET + seed, shapes=shapes)
            )
        elif hold_back or (check_unseen and total - len(held) >= MIN_CALIBRATION):
            self.held_back = list(held.values())
        else:
            held, self.held_back, self.judged_on = {}, first, "calibration"
        self._skipped = frozenset(held)

    def calibration(self) -> Iterator[Feeds]:
        """A fresh stream of the samples used for calibration."""
        for index, feeds in enumerate(self._open()):
            if index not in self._skipped:
                yield feeds


def _opener(
    model: ir.Model, data: Any, count: int, seed: int, shapes: Mapping[str, tuple[int, ...]] | None
) -> Callable[[], Iterator[Feeds]]:
    """A function that opens the sample stream anew on every call."""
    if data is None:
        return lambda: synthesize_feeds(model, count=count, seed=CALIBRATION_SEED_OFFSET + seed, shapes=shapes)
    if isinstance(data, (str, os.PathLike, Sequence, dict)):
        return lambda: load_feeds(data, model=model)
    kept = list(load_feeds(data, model=model))  # a generator or reader: readable once only
    return lambda: iter(kept)

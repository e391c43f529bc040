"""Calibration samples for ``qdq``: re-readable, and never all in memory at once.

Calibration may read the samples several times (once per chunk of exposed
tensors, once more for bias correction), so each read opens a fresh stream:
synthesized feeds are regenerated from their seed, ``.npz`` files are read
again from disk, and a list is iterated again. Only a one-shot source (a
generator, an onnxruntime ``CalibrationDataReader``) is read into memory,
because it cannot be rewound.

With a fidelity target, every fourth sample (at most ``MAX_HELD_BACK``) is
held back from calibration to judge the quantized model on data it was not
calibrated on; those few are kept in memory.
"""

from __future__ import annotations

__all__ = ["Samples", "MAX_HELD_BACK", "CALIBRATION_SEED_OFFSET"]

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
# Without a target, the fidelity and speed figures use the first few samples.
_CHECK_SAMPLES = 4


class Samples:
    """Calibration samples (a fresh stream per call) and the samples that judge the result."""

    def __init__(
        self, model: ir.Model, data: Any, *, count: int, seed: int, hold_back: bool, shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> None:
        """``shapes`` fixes dynamic dims of synthesized samples (``--shape``); real data keeps its own."""
        self._open = _opener(model, data, count, seed, shapes)
        held: dict[int, Feeds] = {}
        total, last = 0, None
        for index, feeds in enumerate(self._open()):
            total, last = index + 1, feeds
            wanted = index % 4 == 3 if hold_back else index < _CHECK_SAMPLES
            if wanted and len(held) < (MAX_HELD_BACK if hold_back else _CHECK_SAMPLES):
                held[index] = feeds
        if total == 0:
            raise GraphoptError("the calibration data is empty")
        if hold_back and not held:
            if total < 2:
                raise GraphoptError("target_cosine/target_snr need at least 2 calibration samples (one is held back)")
            held[total - 1] = last  # type: ignore[assignment]
        self.count = total
        self.held_back: list[Feeds] = list(held.values())
        self._skipped = frozenset(held) if hold_back else frozenset()

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

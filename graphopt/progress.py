"""A minimal progress bar on stderr, drawn only when stderr is a terminal.

Hand-written instead of depending on tqdm: the pipeline reports a handful of
steps, and the bar must stay silent in logs and CI.
"""

from __future__ import annotations

__all__ = ["StepProgress"]

import sys
from typing import TextIO

_WIDTH = 24


class StepProgress:
    """Callable as ``progress(index, total, label)``; redraws one line in place."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def __call__(self, index: int, total: int, label: str) -> None:
        if not self.enabled or total <= 0:
            return
        filled = _WIDTH * index // total
        bar = "#" * filled + "-" * (_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {index}/{total} {label:<32.32}")
        if index >= total:
            self.stream.write("\n")
        self.stream.flush()

"""Progress of long work: a minimal bar on stderr, and a way for passes to say how far along they are.

The bar is hand-written instead of depending on tqdm: the pipeline reports a
handful of steps, and the bar must stay silent in logs and CI. Inside a step,
a pass calls :func:`report` (e.g. "output drift 12/36"); the pipeline routes
that to its progress callback as the step's label, at most every
:data:`MIN_INTERVAL_SECONDS`, so a pass that takes minutes shows it is alive.
Outside a pipeline, or with no callback, :func:`report` does nothing.
"""

from __future__ import annotations

__all__ = ["StepProgress", "report", "reporting_to", "MIN_INTERVAL_SECONDS"]

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

_WIDTH = 24
_LABEL = 48
MIN_INTERVAL_SECONDS = 0.2  # redraws closer together than this are dropped (the last one never is)

# Where report() goes: called as (done, total, what); set by the pipeline around each step.
_reporter: contextvars.ContextVar[Callable[[int, int, str], None] | None] = contextvars.ContextVar(
    "graphopt_progress_reporter", default=None
)


def report(done: int, total: int, what: str) -> None:
    """Tells the running pipeline's progress callback that ``done`` of ``total`` units of ``what`` are finished."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(done, total, what)


@contextlib.contextmanager
def reporting_to(step: Callable[[str], None], label: str) -> Iterator[None]:
    """Within the block, :func:`report` calls ``step("<label>: <what> <done>/<total>")``, throttled.

    A ``total`` of 0 means unknown: the label then shows ``done`` alone.
    """
    last = [float("-inf")]

    def forward(done: int, total: int, what: str) -> None:
        now = time.monotonic()
        finished = 0 < total <= done
        if not finished and now - last[0] < MIN_INTERVAL_SECONDS:
            return
        last[0] = now
        step(f"{label}: {what} {done}/{total}" if total > 0 else f"{label}: {what} {done}")

    token = _reporter.set(forward)
    try:
        yield
    finally:
        _reporter.reset(token)


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
        self.stream.write(f"\r[{bar}] {index}/{total} {label:<{_LABEL}.{_LABEL}}")
        if index >= total:
            self.stream.write("\n")
        self.stream.flush()

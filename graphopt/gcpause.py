"""Pause Python's cyclic garbage collector around bulk IR work.

Loading, rewriting and saving a 100k-node graph allocates millions of
long-lived objects; each allocation burst triggers full collections that scan
all of them, which made load and save grow faster than linearly (measured with
bench/scale.py: 80k nodes took 6.8 s with the collector on, 4.4 s paused).
The work creates no garbage cycles worth collecting midway, and reference
counting still frees everything else at once.
"""

from __future__ import annotations

__all__ = ["gc_paused"]

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disables the cyclic collector inside the block; restores its prior state after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

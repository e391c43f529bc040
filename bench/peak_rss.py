"""Peak resident memory of the current process, for benchmark workers."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB.

    ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: on Linux the latter
    survives ``exec``, so a worker started by a parent that once held a large
    model would report the parent's peak instead of its own. Elsewhere falls
    back to ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak

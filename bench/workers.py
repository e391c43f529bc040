"""Run one benchmark measurement in a fresh interpreter, so its time and peak RSS are its own.

Only the standard library here: scripts import this before numpy or
onnxruntime, whose thread pools read THREAD_ENV when first loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Thread pools of numpy/BLAS and onnxruntime would otherwise use every core
# for one tool and not the other.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(script: str | os.PathLike[str], tool: str, path: Path, out: Path, timeout: float) -> dict[str, Any]:
    """Runs ``script --worker TOOL --path PATH --out OUT`` with one thread and returns the JSON line it prints last.

    Raises:
        RuntimeError: The worker exited non-zero; the message holds its last stderr line.
        subprocess.TimeoutExpired: It ran past ``timeout`` seconds.
    """
    command = [sys.executable, str(Path(script).resolve()), "--worker", tool, "--path", str(path), "--out", str(out)]
    done = subprocess.run(command, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise RuntimeError(f"{tool} worker failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

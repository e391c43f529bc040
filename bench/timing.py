"""One CPU session, timing and fidelity measure for the bench scripts that compare rewritten models.

Sessions run onnxruntime's CPU provider at one intra- and one inter-op
thread (and numpy's BLAS at one thread), so two shared cores give stable medians; timings interleave the
sessions being compared (see :func:`latencies`).
"""

from __future__ import annotations

__all__ = ["fidelity", "latencies", "session"]

import os
import statistics
import time
from typing import Any

# Importing this module pins numpy's BLAS to one thread, as onnxruntime is,
# before any script imports numpy (they import it lazily).
os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
ROUNDS, MIN_ROUNDS, SLOW_ROUND_SECONDS, MIN_TIMED_SECONDS = 20, 5, 1.0, 0.005


def session(model: Any) -> Any:
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def fidelity(reference: Any, candidate: Any, feeds: list[dict]) -> tuple[float, float]:
    import numpy as np

    want = np.concatenate([np.concatenate([o.ravel() for o in reference.run(None, f)]) for f in feeds]).astype(np.float64)
    got = np.concatenate([np.concatenate([o.ravel() for o in candidate.run(None, f)]) for f in feeds]).astype(np.float64)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return rel, float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))


def latencies(sessions: list[Any], feeds: dict) -> list[float]:
    """Median seconds per run of each session, timed in interleaved rounds.

    Each timing covers enough back-to-back runs to last MIN_TIMED_SECONDS:
    a 0.1 ms model timed one run at a time is mostly timer and scheduler noise.
    """
    start = time.perf_counter()
    for session in sessions:
        session.run(None, feeds)
    first = time.perf_counter() - start
    rounds = ROUNDS if first <= SLOW_ROUND_SECONDS else MIN_ROUNDS
    repeats = max(1, int(MIN_TIMED_SECONDS * len(sessions) / max(first, 1e-6)))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, bucket in zip(sessions, times):
            begin = time.perf_counter()
            for _ in range(repeats):
                session.run(None, feeds)
            bucket.append((time.perf_counter() - begin) / repeats)
    return [statistics.median(bucket) for bucket in times]

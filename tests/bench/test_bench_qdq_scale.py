"""bench/qdq_scale.py's verdicts: speed against quantize_static, and growth of graphopt's own time."""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_REPO / "bench"))

from qdq_scale import Run, goal_lines, table  # noqa: E402


def _run(tool: str, size: int, total: float, session_s: float) -> Run:
    return Run(tool, size, {"total": total, "session_s": session_s, "sessions": 3, "maxrss_kib": 2048, "summary": ""})


def test_own_time_excludes_session_creation_and_growth_is_judged_on_it():
    runs = [
        _run("graphopt", 1000, 2.0, 0.5), _run("quantize_static", 1000, 10.0, 0.1),
        _run("graphopt", 4000, 12.0, 6.5), Run("quantize_static", 4000, error="not run: took 400 s > 300 s at 1,000 nodes"),
    ]

    lines = goal_lines(runs)

    assert "speed-up graphopt vs quantize_static at 1,000 nodes: 5.0x" in lines
    assert "PASS graphopt faster than quantize_static at every size both ran" in lines
    # own time 1.5 s -> 5.5 s: 3.7x for 4x the nodes (limit 5x), though the totals grow 6x
    assert any(line.startswith("PASS graphopt's own time grows near-linearly: 3.7x for 4x") and "6.0x" in line for line in lines)
    assert "not run: took 400 s" in table(runs, markdown=True)


def test_slower_than_quantize_static_and_super_linear_own_time_fail():
    runs = [_run("graphopt", 1000, 2.0, 0.0), _run("quantize_static", 1000, 1.0, 0.0), _run("graphopt", 2000, 6.0, 0.0)]
    runs.append(Run("quantize_static", 2000, error="failed"))

    lines = goal_lines(runs)

    assert "FAIL graphopt faster than quantize_static at every size both ran" in lines
    assert any(line.startswith("FAIL graphopt's own time grows near-linearly: 3.0x for 2x") for line in lines)

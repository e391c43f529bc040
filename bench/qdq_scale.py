"""How static int8 quantization scales with graph size: graphopt's qdq against onnxruntime's quantize_static.

Run from the repository root::

    .venv/bin/python bench/qdq_scale.py [--sizes 2500,5000,10000,20000] [--budget 300] [--markdown]

For every size, bench/scale.py's chain graph (blocks of MatMul by a 16x16
weight, Mul, Identity, Tanh; a Constant in every other block and a dead Relu
in every tenth) is written to a temporary folder, and each tool quantizes
the same file in a fresh subprocess, with the same 16 calibration samples
(seed 0), one onnxruntime thread:

- graphopt: ``load`` / ``run_pipeline(model, [QuantizePass(data=...)])``
  (every default: percentile calibration, bias correction, the speed guard)
  / ``save``;
- onnxruntime: ``quantize_static`` in QDQ format, per-channel weights, its
  default MinMax calibration (its documented pre-processing step is not run).

Each worker also sums the time spent creating onnxruntime sessions (the
``InferenceSession`` constructor), which onnxruntime 1.32 spends more than
linear time on for long graphs: a 25k-node chain takes 1.1 s to open at
``ORT_DISABLE_ALL`` and 3.5 s at the default level, 12.5k nodes 0.44 s and
1.2 s. "own s" is the total less that time: what the tool itself does.

A tool that takes longer than ``--budget`` seconds at one size is not run at
larger ones, and the report says so. No fidelity figure: the chain's float
signal fades along it (outputs around 1e-13 at 10,000 nodes), so a cosine
says nothing here; bench/qdq.py measures fidelity on real architectures.
Goals: graphopt is faster than quantize_static at every size both ran;
graphopt's own time grows at most 1.25x as fast as the size.

This is a benchmark, not a test: it exits 0 whatever the goals' outcome, and
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import workers
from cli_args import OneLineParser, positive_int  # bench/ is on sys.path when run as a script
from peak_rss import peak_rss_kib

_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (2500, 5000, 10000, 20000)
TOOLS = ("graphopt", "quantize_static")
SAMPLES = 16
DEFAULT_BUDGET_SECONDS = 200.0
WORKER_TIMEOUT_SECONDS = 1200
LINEAR_SLACK = 1.25


def _feeds(count: int, seed: int) -> list[dict[str, Any]]:
    import numpy as np
    from scale import HIDDEN

    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, HIDDEN), dtype=np.float32)} for _ in range(count)]


class _SessionClock:
    """Sums the seconds spent in onnxruntime's InferenceSession constructor, whoever calls it."""

    def __init__(self) -> None:
        import onnxruntime

        self.seconds, self.sessions = 0.0, 0
        original = onnxruntime.InferenceSession.__init__
        clock = self

        def timed_init(session, *args, **kwargs):
            start = time.perf_counter()
            try:
                original(session, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start
                clock.sessions += 1

        onnxruntime.InferenceSession.__init__ = timed_init


def _worker_graphopt(path: Path, out: Path) -> dict[str, Any]:
    sys.path.insert(0, str(_REPO_ROOT))  # the checkout this script lives in is what gets measured
    import graphopt
    from passes.qdq import QuantizePass

    clock = _SessionClock()
    start = time.perf_counter()
    model = graphopt.load(path)
    quantize = QuantizePass(data=_feeds(SAMPLES, seed=0), threads=1)
    graphopt.run_pipeline(model, [quantize])
    graphopt.save(model, out)
    return {"total": time.perf_counter() - start, "sessions": clock.sessions, "session_s": clock.seconds, "summary": quantize.summary.line()}


def _worker_quantize_static(path: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(_feeds(SAMPLES, seed=0))

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    clock = _SessionClock()
    start = time.perf_counter()
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return {"total": time.perf_counter() - start, "sessions": clock.sessions, "session_s": clock.seconds, "summary": ""}


_WORKERS = {"graphopt": _worker_graphopt, "quantize_static": _worker_quantize_static}


def run_worker(tool: str, path: Path, out: Path) -> None:
    """Measures one tool once and prints the result as JSON on stdout."""
    report = _WORKERS[tool](path, out)
    report["maxrss_kib"] = peak_rss_kib()
    print(json.dumps(report))


@dataclass
class Run:
    tool: str
    size: int
    report: dict[str, Any] | None = None
    error: str = ""

    @property
    def own(self) -> float:
        assert self.report is not None
        return self.report["total"] - self.report["session_s"]


def launch(tool: str, path: Path, out: Path) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter and returns its JSON report."""
    return workers.launch(__file__, tool, path, out, WORKER_TIMEOUT_SECONDS)


def measure(sizes: list[int], budget: float, folder: Path) -> list[Run]:
    from scale import build_chain

    runs: list[Run] = []
    over_budget: dict[str, str] = {}
    for size in sizes:
        source = folder / f"chain{size}.onnx"
        info = build_chain(size, source)
        _progress(f"built {info.nodes:,} nodes")
        for tool in TOOLS:
            run = Run(tool, size)
            runs.append(run)
            if tool in over_budget:
                run.error = over_budget[tool]
                continue
            out = folder / f"{tool}{size}.onnx"
            try:
                run.report = launch(tool, source, out)
            except subprocess.TimeoutExpired:
                run.error = f"timed out after {WORKER_TIMEOUT_SECONDS} s"
                over_budget[tool] = f"not run: timed out at {size:,} nodes"
                _progress(f"  {tool:<16} {run.error}")
                continue
            except (RuntimeError, ValueError) as exc:
                run.error = str(exc).splitlines()[0]
                over_budget[tool] = f"not run: failed at {size:,} nodes"
                _progress(f"  {tool:<16} FAILED ({run.error})")
                continue
            _progress(f"  {tool:<16} {run.report['total']:.1f} s ({run.report['sessions']} sessions, {run.report['session_s']:.1f} s)")
            if run.report["total"] > budget:
                over_budget[tool] = f"not run: took {run.report['total']:.0f} s > {budget:.0f} s at {size:,} nodes"
    return runs


_HEADERS = ("size (nodes)", "tool", "total s", "own s", "sessions", "session s", "peak RSS MiB")


def table(runs: list[Run], markdown: bool) -> str:
    rows = []
    for run in runs:
        if run.report is None:
            rows.append((f"{run.size:,}", run.tool, run.error, "", "", "", ""))
            continue
        r = run.report
        rows.append((
            f"{run.size:,}", run.tool, f"{r['total']:.1f}", f"{run.own:.1f}", str(r["sessions"]), f"{r['session_s']:.1f}",
            f"{r['maxrss_kib'] / 1024:.0f}",
        ))
    if markdown:
        lines = ["| " + " | ".join(_HEADERS) + " |", "|---|---|" + "---:|" * (len(_HEADERS) - 2)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(text) for text in column) for column in zip(_HEADERS, *rows)]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in [_HEADERS, *rows])


def goal_lines(runs: list[Run]) -> list[str]:
    by = {(run.tool, run.size): run for run in runs}
    sizes = sorted({run.size for run in runs})
    lines, faster = [], []
    for size in sizes:
        ours, theirs = by[("graphopt", size)], by[("quantize_static", size)]
        if ours.report and theirs.report:
            ratio = theirs.report["total"] / ours.report["total"]
            faster.append(ratio > 1)
            lines.append(f"speed-up graphopt vs quantize_static at {size:,} nodes: {ratio:.1f}x")
    if faster:
        lines.append(f"{'PASS' if all(faster) else 'FAIL'} graphopt faster than quantize_static at every size both ran")
    else:
        lines.append("FAIL graphopt vs quantize_static: no size where both ran")
    small, large = by[("graphopt", sizes[0])], by[("graphopt", sizes[-1])]
    if len(sizes) > 1 and small.report and large.report:
        growth, size_ratio = large.own / small.own, sizes[-1] / sizes[0]
        verdict = "PASS" if growth <= LINEAR_SLACK * size_ratio else "FAIL"
        total_growth = large.report["total"] / small.report["total"]
        lines.append(
            f"{verdict} graphopt's own time grows near-linearly: {growth:.1f}x for {size_ratio:.0f}x the nodes "
            f"(limit {LINEAR_SLACK * size_ratio:.1f}x; with onnxruntime's session creation: {total_growth:.1f}x)"
        )
    return lines


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated node counts")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS, help="seconds after which a tool skips larger sizes")
    parser.add_argument("--markdown", action="store_true", help="print Markdown")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.path, args.out)
        return 0
    try:
        sizes = sorted({positive_int(text) for text in args.sizes.split(",")})
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"--sizes: {exc}")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-qdq-scale-") as folder:
        runs = measure(sizes, args.budget, Path(folder))
    print(table(runs, args.markdown))
    print()
    bullet = "- " if args.markdown else ""
    graphopt_runs = [run for run in runs if run.tool == "graphopt" and run.report]
    if graphopt_runs:
        print(f"{bullet}graphopt at {graphopt_runs[-1].size:,} nodes: {graphopt_runs[-1].report['summary']}")
    print(f"{bullet}own s: total less the time in onnxruntime's InferenceSession constructor; {SAMPLES} calibration samples, 1 thread")
    for line in goal_lines(runs):
        print(f"{bullet}{line}")
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

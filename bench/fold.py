"""graphopt's ``fold`` pipeline against onnxsim, onnxslim and onnxoptimizer.

Run from the repository root (``make bench-fold`` makes ``.venv-bench`` with
the three anchor tools, which are never project dependencies)::

    .venv-bench/bin/python bench/fold.py [--models a,b|none] [--sizes 5000,20000,80000|none]
        [--tools onnxsim,onnxslim,onnxoptimizer] [--repeats 3] [--timeout 240] [--quick] [--markdown]

Models: every ``model_zoo`` model, plus the synthetic chains of
``bench/scale.py`` (``build_chain``) at each of ``--sizes`` nodes. ``--quick``
keeps the tiny zoo models and the 5,000-node chain (explicit ``--models`` /
``--sizes`` still win).

Each tool processes the same file in a fresh subprocess, so that its peak RSS
(``VmHWM``, imports included) is its own; a run longer than ``--timeout``
seconds is killed and shown as "timeout". ``--tools`` picks the anchors to run
(graphopt always runs):

- graphopt: ``graphopt.load`` / ``graphopt.run_pipeline(model, "fold")`` /
  ``graphopt.save``;
- onnxsim: ``onnx.load`` / ``onnxsim.simplify(model, check_n=0)`` (no
  output checks counted) / ``onnx.save``;
- onnxslim: ``onnx.load`` / ``onnxslim.slim(model)`` / ``onnx.save``;
- onnxoptimizer: ``onnx.load`` / ``onnxoptimizer.optimize(model,
  get_fuse_and_elimination_passes())`` / ``onnx.save``.

Time is load + optimize + save (interpreter start-up and imports excluded);
outputs over 1.8 GB are saved with external data. Nodes count the main graph
and every subgraph. Runs are interleaved over the tools, ``--repeats`` times
(default 3), and the table shows medians; chains of 80,000 nodes or more run
once unless ``--repeats`` is given, and a (tool, model) whose first run takes
over 60 s runs once. A tool that is not
importable in this interpreter is shown as "not installed".

Each result is then checked in onnxruntime (CPU, one thread, default graph
optimizations) in a separate subprocess against the original, on the zoo
model's feeds (a seeded random feed for chains): the max abs difference over
all outputs, and latency relative to the original, as the median of 20
interleaved rounds after a warm-up (fewer, at least 5, where one round of all
sessions takes over 1.5 s). An output that onnxruntime cannot load or run is
"invalid" and left out of the goals.

Goals (PASS/FAIL): graphopt's node count <= the best valid anchor's on every
model; graphopt's time <= onnxsim's on every model; on the largest chain
(80,000 nodes by default) graphopt's time <= 1/3 of onnxsim's. For each model
where graphopt has more nodes than the best anchor, the op types that differ
are listed.

This is a benchmark, not a test: it exits 0 whatever the goals' outcome, and
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workers
from cli_args import OneLineParser, positive_int, positive_seconds  # bench/ is on sys.path when run as a script
from machine import machine_line
from peak_rss import peak_rss_kib
from scale import build_chain

# Only the standard library (and scale's lazy-importing build_chain) at module
# level: each worker imports just what its tool needs.

_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (5000, 20000, 80000)
QUICK_SIZES = (5000,)
TOOLS = ("graphopt", "onnxsim", "onnxslim", "onnxoptimizer")
ANCHORS = TOOLS[1:]
DEFAULT_TIMEOUT = 240.0
SINGLE_RUN_NODES = 80000
SLOW_RUN_SECONDS = 60.0
EXTERNAL_DATA_BYTES = int(1.8e9)
LATENCY_ROUNDS = 20
MIN_LATENCY_ROUNDS = 5
SLOW_ROUND_SECONDS = 1.5
CHAIN_SPEEDUP_GOAL = 3.0
DEFAULT_REPEATS = 3
_THREAD_ENV = workers.THREAD_ENV  # one thread for numpy/BLAS and onnxruntime


# --------------------------------------------------------------------------
# Tool workers: each runs in its own process and prints one JSON line.


def _optimize_graphopt(path: Path, out: Path) -> dict[str, float]:
    # The checkout this script lives in is what gets measured, installed or not.
    sys.path.insert(0, str(_REPO_ROOT))
    import graphopt

    marks = [time.perf_counter()]
    model = graphopt.load(path)
    marks.append(time.perf_counter())
    result = graphopt.run_pipeline(model, "fold")
    marks.append(time.perf_counter())
    graphopt.save(result.model, out)
    marks.append(time.perf_counter())
    return _phases(marks)


def _optimize_onnx(tool: str, path: Path, out: Path) -> dict[str, float]:
    import onnx

    marks = [time.perf_counter()]
    model = onnx.load(str(path))
    marks.append(time.perf_counter())
    if tool == "onnxsim":
        import onnxsim

        model, ok = onnxsim.simplify(model, check_n=0)
        if not ok:
            raise RuntimeError("onnxsim.simplify reported failure")
    elif tool == "onnxslim":
        import onnxslim

        model = onnxslim.slim(model)
    else:
        import onnxoptimizer

        model = onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())
    marks.append(time.perf_counter())
    onnx.save(model, str(out), save_as_external_data=_too_large(model), location=f"{out.name}.data")
    marks.append(time.perf_counter())
    return _phases(marks)


def _too_large(model: Any) -> bool:
    try:
        return bool(model.ByteSize() > EXTERNAL_DATA_BYTES)
    except ValueError:  # protobuf refuses to size messages over 2 GB
        return True


def _phases(marks: list[float]) -> dict[str, float]:
    return dict(zip(("load", "optimize", "save"), (b - a for a, b in zip(marks, marks[1:]))))


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count over the main graph and all subgraphs (weights not read)."""
    import onnx

    counts: Counter[str] = Counter()
    pending = [onnx.load(str(path), load_external_data=False).graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            counts[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
            for attr in node.attribute:
                pending.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    return dict(counts)


def run_tool_worker(tool: str, path: Path, out: Path) -> None:
    phases = _optimize_graphopt(path, out) if tool == "graphopt" else _optimize_onnx(tool, path, out)
    rss = peak_rss_kib()  # before op_counts, which is not part of the run
    report = {"phases": phases, "total": sum(phases.values()), "maxrss_kib": rss}
    print(json.dumps({**report, "ops": op_counts(out), "out": str(out)}))


# --------------------------------------------------------------------------
# Check worker: outputs and latency of every result against the original.


def run_check_worker(source: Path, feeds_path: Path, candidates: list[str]) -> None:
    """Prints one JSON line per candidate ("tool=path"), then one with latencies."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    reference = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
    sessions = {"original": (reference, feeds)}
    for item in candidates:
        tool, path = item.split("=", 1)
        print(json.dumps({"tool": tool, "started": True}), flush=True)  # a crash below blames this tool
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            own = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
            got = session.run(None, own)
        except Exception as exc:  # onnxruntime raises several types
            print(json.dumps({"tool": tool, "invalid": str(exc).strip().splitlines()[0][:200]}), flush=True)
            continue
        names = [o.name for o in session.get_outputs()]
        pairs = [(expected.get(n), g) for n, g in zip(names, got)]
        if any(e is None for e, _ in pairs):  # output renamed: compare by position
            pairs = list(zip(expected.values(), got))
        diff = max((_max_diff(e, g) for e, g in pairs), default=0.0)
        sessions[tool] = (session, own)
        print(json.dumps({"tool": tool, "diff": diff}), flush=True)
    print(json.dumps({"latency": _latencies(sessions)}), flush=True)


def _max_diff(expected: Any, got: Any) -> float:
    import numpy as np

    if np.shape(expected) != np.shape(got):
        return float("inf")
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64))))


def _latencies(sessions: dict[str, tuple[Any, dict[str, Any]]]) -> dict[str, float]:
    """Median seconds per session over interleaved rounds, after one warm-up round."""
    start = time.perf_counter()
    for session, feeds in sessions.values():
        session.run(None, feeds)
    warm_up = time.perf_counter() - start
    rounds = LATENCY_ROUNDS if warm_up <= SLOW_ROUND_SECONDS else MIN_LATENCY_ROUNDS
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, (session, feeds) in sessions.items():
            begin = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------
# Parent: prepare models, launch workers, collect.


@dataclass
class Cell:
    """All runs of one tool on one model."""

    tool: str
    status: str = ""  # "" (ran), "not installed", "timeout", "error: ..."
    runs: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    out: str = ""
    check: str = ""  # "" (not checked yet), "ok", "invalid: ...", "crashed"
    diff: float | None = None
    latency_ratio: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.runs) and self.check == "ok"

    def median(self, key: str = "total") -> float:
        return statistics.median(r["total"] if key == "total" else r["phases"][key] for r in self.runs)

    def nodes(self) -> int:
        return sum(self.ops.values())


@dataclass
class ModelResult:
    name: str
    ops: dict[str, int]
    mib: float
    cells: dict[str, Cell]
    chain_size: int = 0


def _launch(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.run(command, env={**os.environ, **_THREAD_ENV}, capture_output=True, text=True, timeout=timeout)


def _last_line(text: str, fallback: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else fallback


def _run_tool(cell: Cell, source: Path, folder: Path, timeout: float) -> float | None:
    """One run of cell.tool on source into a fresh folder; returns its time or None."""
    out_dir = folder / cell.tool
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    out = out_dir / f"{source.stem}.{cell.tool}.onnx"
    try:
        done = _launch(["--worker", cell.tool, "--path", str(source), "--out", str(out)], timeout)
    except subprocess.TimeoutExpired:
        cell.status = "timeout"
        return None
    if done.returncode != 0:
        cell.status = "error: " + _last_line(done.stderr, f"exit code {done.returncode}")
        return None
    report = json.loads(done.stdout.strip().splitlines()[-1])
    cell.runs.append(report)
    cell.ops, cell.out = report["ops"], report["out"]
    return float(report["total"])


def measure(source: Path, folder: Path, cells: dict[str, Cell], repeats: int, timeout: float) -> None:
    """Interleaved repeats over the tools; a failed or slow first run is not repeated."""
    for repeat in range(repeats):
        for tool, cell in cells.items():
            if cell.status or (repeat and cell.runs[0]["total"] > SLOW_RUN_SECONDS):
                continue
            seconds = _run_tool(cell, source, folder, timeout)
            shown = f"{seconds:.2f} s" if seconds is not None else cell.status
            _progress(f"  {tool:<13} run {repeat + 1}/{repeats}: {shown}")


def check(source: Path, feeds: Path, cells: dict[str, Cell], timeout: float) -> dict[str, float]:
    """Fills diff/validity of every produced output; returns median latencies (seconds)."""
    pending = [c for c in cells.values() if c.runs]
    latency: dict[str, float] = {}
    while pending:
        items = [f"{c.tool}={c.out}" for c in pending]
        try:
            done = _launch(["--check", "--path", str(source), "--feeds", str(feeds), *items], timeout)
            stdout, crashed = done.stdout, done.returncode != 0
        except subprocess.TimeoutExpired as exc:
            stdout, crashed = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or "", True
        started = None
        for line in stdout.strip().splitlines():
            record = json.loads(line)
            if "latency" in record:
                latency = record["latency"]
                continue
            cell = cells[record["tool"]]
            started = cell if record.get("started") else None
            if "invalid" in record:
                cell.check = f"invalid: {record['invalid']}"
            elif "diff" in record:
                cell.check, cell.diff = "ok", record["diff"]
        if started is not None:  # the worker died inside this tool's session
            started.check = "invalid: onnxruntime crashed or hung"
        pending = [c for c in pending if not c.check] if crashed and started is not None else []
    for cell in cells.values():
        if cell.runs and not cell.check:
            cell.check = "invalid: the check worker failed before reaching it"
    return latency


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cell_status(tool: str, selected: list[str]) -> str:
    if tool != "graphopt" and tool not in selected:
        return "not selected"
    return "" if _installed(tool) else "not installed"


def _installed(tool: str) -> bool:
    return tool == "graphopt" or importlib.util.find_spec(tool) is not None


def _prepare_zoo(name: str, folder: Path) -> Path:
    import numpy as np

    import model_zoo

    zoo_model = model_zoo.build(name)
    source = zoo_model.save(folder)
    np.savez(folder / "feeds.npz", **zoo_model.feeds)
    return source


def _prepare_chain(size: int, folder: Path) -> Path:
    import numpy as np
    from scale import HIDDEN

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"chain{size}.onnx"
    build_chain(size, source)
    np.savez(folder / "feeds.npz", x=np.random.default_rng(1).standard_normal((1, HIDDEN), dtype=np.float32))
    return source


def run_model(name: str, size: int, folder: Path, args: argparse.Namespace) -> ModelResult:
    start = time.perf_counter()
    source = _prepare_chain(size, folder) if size else _prepare_zoo(name, folder)
    mib = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix != ".npz") / 2**20
    ops = op_counts(source)
    _progress(f"{name}: {sum(ops.values()):,} nodes, {mib:.1f} MiB, built in {time.perf_counter() - start:.1f} s")
    cells = {tool: Cell(tool, status=_cell_status(tool, args.tools)) for tool in TOOLS}
    repeats = args.repeats or (1 if size >= SINGLE_RUN_NODES else DEFAULT_REPEATS)
    measure(source, folder, cells, repeats, args.timeout)
    latency = check(source, folder / "feeds.npz", cells, max(args.timeout, 600.0))
    for cell in cells.values():
        if cell.ok and cell.tool in latency and latency.get("original"):
            cell.latency_ratio = latency[cell.tool] / latency["original"]
    shutil.rmtree(folder, ignore_errors=True)
    return ModelResult(name, ops, mib, cells, size)


# --------------------------------------------------------------------------
# Report

_HEADERS = ("tool", "nodes", "time s", "peak RSS MiB", "max |diff|", "latency ratio", "runs")


def model_rows(result: ModelResult) -> list[tuple[str, ...]]:
    rows = [("original", f"{sum(result.ops.values()):,}", "", "", "", "1.00", "")]
    for cell in result.cells.values():
        if not cell.runs:
            rows.append((cell.tool, cell.status, "", "", "", "", "0"))
            continue
        rss = max(r["maxrss_kib"] for r in cell.runs) / 1024
        diff = f"{cell.diff:.2e}" if cell.diff is not None else ("invalid" if cell.check else "")
        ratio = f"{cell.latency_ratio:.2f}" if cell.latency_ratio is not None else ""
        rows.append((cell.tool, f"{cell.nodes():,}", f"{cell.median():.3f}", f"{rss:.0f}", diff, ratio, str(len(cell.runs))))
    return rows


def format_table(rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(_HEADERS) + " |", "|---|" + "---:|" * (len(_HEADERS) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(text) for text in column) for column in zip(_HEADERS, *rows)]
    body = [_HEADERS, tuple("-" * w for w in widths), *rows]
    return "\n".join("  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(r, widths))).rstrip() for r in body)


def _best_anchor(result: ModelResult) -> Cell | None:
    valid = [result.cells[t] for t in ANCHORS if result.cells[t].ok]
    return min(valid, key=lambda c: c.nodes()) if valid else None


def goal_lines(results: list[ModelResult]) -> list[str]:
    """PASS/FAIL per goal, each followed by the models that miss it."""
    node_misses, time_misses, lines = [], [], []
    for result in results:
        ours, best, sim = result.cells["graphopt"], _best_anchor(result), result.cells["onnxsim"]
        if not ours.ok:
            node_misses.append(f"{result.name} (graphopt: {ours.status or ours.check})")
            time_misses.append(f"{result.name} (graphopt: {ours.status or ours.check})")
            continue
        if best is not None and ours.nodes() > best.nodes():
            node_misses.append(f"{result.name} ({ours.nodes():,} vs {best.tool} {best.nodes():,})")
        if sim.runs and ours.median() > sim.median():
            time_misses.append(f"{result.name} ({ours.median():.2f} s vs {sim.median():.2f} s)")
    for label, misses in (("graphopt nodes <= best anchor's on every model", node_misses),
                          ("graphopt time <= onnxsim's on every model", time_misses)):
        lines.append(f"{'FAIL' if misses else 'PASS'} {label}" + (f": misses {'; '.join(misses)}" if misses else ""))
    chains = [r for r in results if r.chain_size]
    if not chains:
        return lines + ["SKIP chain speed-up goal: no chain was run"]
    largest = max(chains, key=lambda r: r.chain_size)
    ours, sim = largest.cells["graphopt"], largest.cells["onnxsim"]
    label = f"graphopt time <= onnxsim's / {CHAIN_SPEEDUP_GOAL:.0f} on the {largest.chain_size:,}-node chain"
    if not ours.runs:
        lines.append(f"FAIL {label}: graphopt {ours.status}")
    elif sim.status == "timeout":
        lines.append(f"PASS {label}: onnxsim timed out (> {_TIMEOUT[0]:.0f} s), graphopt {ours.median():.2f} s")
    elif not sim.runs:
        lines.append(f"SKIP {label}: onnxsim {sim.status}")
    else:
        speedup = sim.median() / ours.median()
        verdict = "PASS" if speedup >= CHAIN_SPEEDUP_GOAL else "FAIL"
        lines.append(f"{verdict} {label}: {ours.median():.2f} s vs {sim.median():.2f} s ({speedup:.2f}x)")
    return lines


_TIMEOUT = [DEFAULT_TIMEOUT]  # for messages only; set by main


def diagnosis_lines(results: list[ModelResult]) -> list[str]:
    """Where graphopt loses: op-type differences and phase times."""
    lines = []
    for result in results:
        ours, best, sim = result.cells["graphopt"], _best_anchor(result), result.cells["onnxsim"]
        if ours.ok and best is not None and ours.nodes() > best.nodes():
            ops = sorted(set(ours.ops) | set(best.ops))
            kept = [f"{op} {ours.ops.get(op, 0)} vs {best.ops.get(op, 0)}" for op in ops if ours.ops.get(op, 0) > best.ops.get(op, 0)]
            added = [f"{op} {ours.ops.get(op, 0)} vs {best.ops.get(op, 0)}" for op in ops if ours.ops.get(op, 0) < best.ops.get(op, 0)]
            lines.append(f"{result.name}: graphopt keeps more than {best.tool} (graphopt vs {best.tool}): {', '.join(kept)}"
                         + (f"; {best.tool} has more: {', '.join(added)}" if added else ""))
        if ours.runs and sim.runs and ours.median() > sim.median():
            phases = ", ".join(f"{k} {ours.median(k):.2f}/{sim.median(k):.2f}" for k in ("load", "optimize", "save"))
            lines.append(f"{result.name}: phases graphopt/onnxsim s: {phases}")
        for cell in result.cells.values():
            if cell.runs and cell.check.startswith("invalid"):
                lines.append(f"{result.name}: {cell.tool} output is {cell.check}")
            if cell.status.startswith("error"):
                lines.append(f"{result.name}: {cell.tool} {cell.status}")
    return lines


def print_report(results: list[ModelResult], markdown: bool) -> None:
    bullet = "- " if markdown else ""
    for result in results:
        title = f"{result.name} ({sum(result.ops.values()):,} nodes, {result.mib:.1f} MiB)"
        print(f"### {title}\n" if markdown else f"{title}")
        print(format_table(model_rows(result), markdown))
        print()
    legend = ("time: median of runs, load+optimize+save, one thread; peak RSS: largest VmHWM; max |diff|: "
              "vs the original in onnxruntime; latency ratio: median onnxruntime CPU latency (1 thread) / original's")
    for line in [machine_line(("graphopt", "onnx", "onnx-ir", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer")), legend, *goal_lines(results), *diagnosis_lines(results)]:
        print(f"{bullet}{line}")


# --------------------------------------------------------------------------
# Command line


def _list_arg(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [part.strip() for part in text.split(",") if part.strip()]


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in _list_arg(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'none', got {text!r}") from None
    if sizes and sizes[0] < 10:
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 10, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_list_arg, help="comma-separated zoo models, or 'none' (default: all)")
    parser.add_argument("--sizes", type=_sizes, help="comma-separated chain node counts, or 'none' (default 5000,20000,80000)")
    parser.add_argument("--tools", type=_list_arg, default=list(ANCHORS), help="comma-separated anchors to run (default: all three)")
    parser.add_argument("--repeats", type=positive_int, help="runs per tool and model (default 3; 1 at 80k+ nodes)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, help="seconds per tool run (default 240)")
    parser.add_argument("--quick", action="store_true", help="tiny zoo models and the 5,000-node chain only")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--feeds", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("candidates", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.check:
        return args
    if args.candidates:
        parser.error(f"unexpected arguments: {' '.join(args.candidates)}")
    unknown_tools = [tool for tool in args.tools if tool not in ANCHORS]
    if unknown_tools:
        parser.error(f"unknown tool(s) {', '.join(unknown_tools)}; valid: {', '.join(ANCHORS)}")
    sys.path.insert(0, str(_REPO_ROOT))
    import model_zoo

    if args.models is None:
        args.models = list(model_zoo.TINY if args.quick else model_zoo.names())
    unknown = [name for name in args.models if name not in model_zoo.names()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(model_zoo.names())}")
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if not args.models and not args.sizes:
        parser.error("nothing to run: --models none and --sizes none")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_tool_worker(args.worker, args.path, args.out)
        return 0
    if args.check:
        run_check_worker(args.path, args.feeds, args.candidates)
        return 0
    _TIMEOUT[0] = args.timeout
    started = time.perf_counter()
    missing = [tool for tool in args.tools if not _installed(tool)]
    if missing:
        _progress(f"not installed (reported as such): {', '.join(missing)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="graphopt-fold-") as tmp:
        jobs = [(name, 0) for name in args.models] + [(f"chain {size:,}", size) for size in args.sizes]
        for index, (name, size) in enumerate(jobs):
            results.append(run_model(name if not size else f"chain{size}", size, Path(tmp) / str(index), args))
            results[-1].name = name
    print_report(results, args.markdown)
    bullet = "- " if args.markdown else ""
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How graphopt's load -> "dce,lift-constants" -> save scales with graph size.

Run from the repository root::

    .venv/bin/python bench/scale.py [--sizes 5000,20000,80000] [--repeats 3] [--markdown]

For every size a synthetic chain graph is written to a temporary folder, then
two tools process the same file, each run in a fresh subprocess so that its
peak RSS is its own:

- graphopt: ``graphopt.load`` / ``graphopt.run_pipeline(model,
  "dce,lift-constants")`` / ``graphopt.save``;
- onnx-graphsurgeon: ``onnx.load`` + ``gs.import_onnx`` / ``graph.cleanup()`` +
  ``graph.toposort()`` / ``gs.export_onnx`` + ``onnx.save``.

graphsurgeon's cleanup removes the same dead nodes as graphopt's dce; it has
no counterpart to lift-constants, so its Constant nodes stay.

The graph is a chain of blocks fed by ``x`` (float32, [1, 16])::

    h -> MatMul(W_i) -> Mul(s_i) -> Identity -> Tanh -> h'
                                                  \\-> Relu (dead, every 10th block)

``W_i`` is a 16x16 float32 initializer. ``s_i`` (16 floats) is the output of a
``Constant`` node in even blocks, so lift-constants has work, and an
initializer in odd blocks. Node count: every block has 4 nodes, plus 1 for
its Constant (even blocks) plus 1 for its dead Relu (every 10th block), about
4.6 on average. Blocks are added while the next one still fits in the
requested size, and the rest (at most 5) is filled with Identity nodes at the
end of the chain, so the graph has exactly the requested number of nodes.

Timings exclude interpreter start-up and imports. Each (tool, size) runs
``--repeats`` times, interleaving the tools; the table shows the median of
each phase and the median total (so the phases need not add up exactly to the
total), and the largest peak RSS seen. A tool whose first run at a size takes
over 120 s runs only once at that size, and the output says so.

This is a benchmark, not a test: it exits 0 whatever the goals' outcome, and
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workers
from cli_args import OneLineParser, positive_int  # bench/ is on sys.path when run as a script
from peak_rss import peak_rss_kib

# Only the standard library at module level: each worker imports just what its
# tool needs, so its peak RSS holds no other tool's modules.

_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (5000, 20000, 80000)
TOOLS = ("graphopt", "graphsurgeon")
PIPELINE = "dce,lift-constants"
HIDDEN = 16
DEAD_EVERY = 10
# A tool slower than this on its first run at a size is run only once there,
# to keep the default run near 6 minutes on a 2-core machine.
SLOW_RUN_SECONDS = 120.0
# A hung worker must not hang the benchmark.
WORKER_TIMEOUT_SECONDS = 900
# graphopt's goal is near-linear scaling: 80k/5k is a 16x size ratio, and the
# goal allows 20x time, i.e. 1.25 times the size ratio for custom sizes.
LINEAR_SLACK = 20 / 16


# --------------------------------------------------------------------------
# Synthetic graph


@dataclass(frozen=True)
class ChainInfo:
    """What a built chain graph holds, to check the rewritten model against."""

    nodes: int
    constants: int
    dead: int


def build_chain(size: int, path: Path) -> ChainInfo:
    """Writes a chain graph of exactly ``size`` nodes to ``path`` (see module docstring)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    constants = dead = 0
    current = "x"
    block = 0
    while len(nodes) + _block_size(block) <= size:
        block_nodes, block_inits, current = _block(block, current, rng)
        nodes.extend(block_nodes)
        initializers.extend(block_inits)
        constants += _uses_constant(block)
        dead += _has_dead_branch(block)
        block += 1
    while len(nodes) < size:
        padded = f"pad{len(nodes)}"
        nodes.append(helper.make_node("Identity", [current], [padded]))
        current = padded
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, HIDDEN])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # IR 8 / opset 17: recent enough that initializers need not be graph
    # inputs (lift-constants then has nothing extra to do), old enough for any
    # onnxruntime the project supports.
    model.ir_version = 8
    onnx.save(model, str(path))
    return ChainInfo(nodes=len(nodes), constants=constants, dead=dead)


def _block_size(block: int) -> int:
    return 4 + _uses_constant(block) + _has_dead_branch(block)


def _uses_constant(block: int) -> bool:
    return block % 2 == 0


def _has_dead_branch(block: int) -> bool:
    return block % DEAD_EVERY == DEAD_EVERY - 1


def _block(block: int, source: str, rng: Any) -> tuple[list[Any], list[Any], str]:
    """One block's nodes and initializers, and the name of the value it ends with."""
    import numpy as np
    from onnx import helper, numpy_helper

    weight = f"W{block}"
    scale = f"s{block}"
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * 0.25, weight)]
    scale_value = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
    nodes = []
    if _uses_constant(block):
        nodes.append(helper.make_node("Constant", [], [scale], value=numpy_helper.from_array(scale_value)))
    else:
        inits.append(numpy_helper.from_array(scale_value, scale))
    out = f"h{block}"
    nodes += [
        helper.make_node("MatMul", [source, weight], [f"m{block}"]),
        helper.make_node("Mul", [f"m{block}", scale], [f"u{block}"]),
        helper.make_node("Identity", [f"u{block}"], [f"d{block}"]),
        helper.make_node("Tanh", [f"d{block}"], [out]),
    ]
    if _has_dead_branch(block):
        nodes.append(helper.make_node("Relu", [out], [f"dead{block}"]))
    return nodes, inits, out


# --------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.


def _worker_graphopt(path: Path, out: Path) -> dict[str, Any]:
    # The checkout this script lives in is what gets measured, installed or not.
    sys.path.insert(0, str(_REPO_ROOT))
    import graphopt

    start = time.perf_counter()
    model = graphopt.load(path)
    loaded = time.perf_counter()
    result = graphopt.run_pipeline(model, PIPELINE)
    rewritten = time.perf_counter()
    graphopt.save(result.model, out)
    saved = time.perf_counter()
    phases = {"load": loaded - start, "pipeline": rewritten - loaded, "save": saved - rewritten}
    detail = {row.name: row.seconds for row in result.ledger.rows}
    # What run_pipeline spends around the passes (ledger statistics, wrappers).
    detail["outside passes"] = phases["pipeline"] - sum(detail.values())
    return {"phases": phases, "detail": detail}


def _worker_graphsurgeon(path: Path, out: Path) -> dict[str, Any]:
    import onnx
    import onnx_graphsurgeon as gs

    marks = [time.perf_counter()]
    proto = onnx.load(str(path))
    marks.append(time.perf_counter())
    graph = gs.import_onnx(proto)
    marks.append(time.perf_counter())
    graph.cleanup()
    marks.append(time.perf_counter())
    graph.toposort()
    marks.append(time.perf_counter())
    exported = gs.export_onnx(graph)
    marks.append(time.perf_counter())
    onnx.save(exported, str(out))
    marks.append(time.perf_counter())
    steps = [b - a for a, b in zip(marks, marks[1:])]
    detail = dict(zip(("onnx.load", "import_onnx", "cleanup", "toposort", "export_onnx", "onnx.save"), steps))
    phases = {"load": steps[0] + steps[1], "pipeline": steps[2] + steps[3], "save": steps[4] + steps[5]}
    return {"phases": phases, "detail": detail}


_WORKERS = {"graphopt": _worker_graphopt, "graphsurgeon": _worker_graphsurgeon}


def run_worker(tool: str, path: Path, out: Path) -> None:
    """Measures one tool once and prints the result as JSON on stdout."""
    report = _WORKERS[tool](path, out)
    report["total"] = sum(report["phases"].values())
    report["maxrss_kib"] = peak_rss_kib()
    print(json.dumps(report))


# --------------------------------------------------------------------------
# Parent: launch workers, collect, summarise.


@dataclass
class Cell:
    """All runs of one tool at one size."""

    tool: str
    size: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def median(self, key: str) -> float:
        if key == "total":
            return statistics.median(run["total"] for run in self.runs)
        return statistics.median(run["phases"][key] for run in self.runs)

    def detail(self) -> str:
        """Median seconds of each sub-step, in run order."""
        steps = self.runs[0]["detail"]
        return ", ".join(f"{name} {statistics.median(run['detail'][name] for run in self.runs):.3f}" for name in steps)

    def peak_mib(self) -> float:
        return max(run["maxrss_kib"] for run in self.runs) / 1024


def launch(tool: str, path: Path, out: Path) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter and returns its JSON report."""
    return workers.launch(__file__, tool, path, out, WORKER_TIMEOUT_SECONDS)


def measure_size(size: int, folder: Path, repeats: int) -> tuple[dict[str, Cell], ChainInfo, Path]:
    """Builds the graph for ``size`` and measures every tool on it, interleaved."""
    source = folder / f"chain{size}.onnx"
    start = time.perf_counter()
    info = build_chain(size, source)
    mib = source.stat().st_size / 2**20
    _progress(f"built {info.nodes} nodes in {time.perf_counter() - start:.1f} s ({mib:.1f} MiB)")
    cells = {tool: Cell(tool, size) for tool in TOOLS}
    for repeat in range(repeats):
        for tool in TOOLS:
            cell = cells[tool]
            if repeat > 0 and (cell.note or not cell.runs):
                continue  # slow or failed on its first run: one run is enough
            _run_into(cell, source, folder / f"{tool}{size}.out.onnx", repeat, repeats)
    return cells, info, folder / f"graphopt{size}.out.onnx"


def _run_into(cell: Cell, source: Path, out: Path, repeat: int, repeats: int) -> None:
    out.unlink(missing_ok=True)  # a failed run must not leave an earlier output to be checked
    try:
        report = launch(cell.tool, source, out)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        cell.errors.append(str(exc).splitlines()[0])
        _progress(f"  {cell.tool:<12} run {repeat + 1}/{repeats}: FAILED ({cell.errors[-1]})")
        return
    cell.runs.append(report)
    _progress(f"  {cell.tool:<12} run {repeat + 1}/{repeats}: {report['total']:.2f} s")
    if repeat == 0 and repeats > 1 and report["total"] > SLOW_RUN_SECONDS:
        cell.note = f"first run took {report['total']:.1f} s > {SLOW_RUN_SECONDS:.0f} s: repeats reduced to 1"
        _progress(f"  {cell.tool} at {cell.size} nodes: {cell.note}")


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds only the report.
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Report

_HEADERS = (
    "size (nodes)",
    "tool",
    "load/import s",
    "pipeline/cleanup+toposort s",
    "save/export s",
    "total s",
    "peak RSS MiB",
    "runs",
)


def table_rows(cells: list[Cell]) -> list[tuple[str, ...]]:
    rows = []
    for cell in cells:
        if not cell.runs:
            rows.append((f"{cell.size:,}", cell.tool, "failed", "", "", "", "", "0"))
            continue
        timings = [f"{cell.median(key):.3f}" for key in ("load", "pipeline", "save", "total")]
        rows.append((f"{cell.size:,}", cell.tool, *timings, f"{cell.peak_mib():.0f}", str(len(cell.runs))))
    return rows


def format_table(rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 6) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(text) for text in column) for column in zip(_HEADERS, *rows)]
    rule = tuple("-" * width for width in widths)
    return "\n".join(_fixed_width(row, widths) for row in [_HEADERS, rule, *rows])


def _fixed_width(row: tuple[str, ...], widths: list[int]) -> str:
    # Labels (size, tool) read left to right; numbers line up on the right.
    cells = (
        text.ljust(width) if index < 2 else text.rjust(width) for index, (text, width) in enumerate(zip(row, widths))
    )
    return "  ".join(cells).rstrip()


def goal_lines(by_size: dict[int, dict[str, Cell]]) -> list[str]:
    """Scaling ratio, per-size speedups, and PASS/FAIL for the two goals."""
    sizes = sorted(by_size)
    lines = []
    for size in sizes:
        ours, theirs = by_size[size]["graphopt"], by_size[size]["graphsurgeon"]
        if ours.runs and theirs.runs:
            speedup = theirs.median("total") / ours.median("total")
            lines.append(f"speedup graphopt vs graphsurgeon at {size:,} nodes: {speedup:.2f}x")
    small, large = by_size[sizes[0]]["graphopt"], by_size[sizes[-1]]["graphopt"]
    if len(sizes) < 2 or not (small.runs and large.runs):
        lines.append("SKIP scaling goal: needs graphopt timings at two sizes")
    else:
        ratio = large.median("total") / small.median("total")
        limit = LINEAR_SLACK * sizes[-1] / sizes[0]
        verdict = "PASS" if ratio <= limit else "FAIL"
        size_ratio = sizes[-1] / sizes[0]
        lines.append(f"graphopt time({sizes[-1]:,}) / time({sizes[0]:,}) = {ratio:.1f} (size ratio {size_ratio:.0f})")
        lines.append(f"{verdict} scaling: {ratio:.1f} <= {limit:.0f}")
    theirs = by_size[sizes[-1]]["graphsurgeon"]
    if large.runs and theirs.runs:
        speedup = theirs.median("total") / large.median("total")
        verdict = "PASS" if speedup > 1 else "FAIL"
        lines.append(f"{verdict} graphopt faster than graphsurgeon at {sizes[-1]:,} nodes: {speedup:.2f}x")
    else:
        lines.append(f"FAIL graphopt vs graphsurgeon at {sizes[-1]:,} nodes: a tool has no successful run")
    return lines


def verify_output(source: Path, out: Path, info: ChainInfo) -> list[str]:
    """Checks graphopt's output: valid ONNX, the expected nodes gone, same numbers."""
    import onnx

    if not out.exists():
        return [f"FAIL output check: {out.name} was not written"]
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as exc:  # the checker raises several types
        return [f"FAIL output check: onnx.checker rejects {out.name}: {str(exc).splitlines()[0]}"]
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    expected = info.nodes - info.dead - info.constants
    counts_ok = len(ops) == expected and "Relu" not in ops and "Constant" not in ops
    verdict = "PASS" if counts_ok else "FAIL"
    lines = [
        f"{verdict} output check at {info.nodes:,} nodes: onnx.checker (full_check) accepts it; "
        f"{info.nodes:,} -> {len(ops):,} nodes (expected {expected:,}: "
        f"{info.dead} dead Relu and {info.constants} Constant nodes removed)"
    ]
    lines.append(_compare_outputs(source, out))
    return lines


def _compare_outputs(source: Path, out: Path) -> str:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    feed = {"x": np.random.default_rng(1).standard_normal((1, HIDDEN), dtype=np.float32)}
    results = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for path in (source, out)
    ]
    worst = float(np.max(np.abs(results[0] - results[1])))
    verdict = "PASS" if np.allclose(results[0], results[1], rtol=1e-5, atol=1e-6) else "FAIL"
    return f"{verdict} onnxruntime outputs of input and output models agree (max abs diff {worst:.2e})"


# --------------------------------------------------------------------------
# Command line


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 10:
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 10, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="comma-separated node counts")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per tool and size (default 3)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and not (args.path and args.out):
        parser.error("--worker needs --path and --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.path, args.out)
        return 0
    started = time.perf_counter()
    by_size: dict[int, dict[str, Cell]] = {}
    checks = ["FAIL output check: graphopt had no successful run at the smallest size"]
    with tempfile.TemporaryDirectory(prefix="graphopt-scale-") as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            _progress(f"size {size:,}:")
            by_size[size], info, out = measure_size(size, folder, args.repeats)
            if size == args.sizes[0] and by_size[size]["graphopt"].runs:
                # Only the smallest output is checked: full_check and onnxruntime stay quick there.
                checks = verify_output(folder / f"chain{size}.onnx", out, info)
    print_report(by_size, checks, args.markdown)
    bullet = "- " if args.markdown else ""
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


def print_report(by_size: dict[int, dict[str, Cell]], checks: list[str], markdown: bool) -> None:
    """The table, then notes, sub-step timings, goals and output checks, one per line."""
    cells = [cell for size in sorted(by_size) for cell in by_size[size].values()]
    print(format_table(table_rows(cells), markdown))
    print()
    notes = [f"{c.tool} at {c.size:,} nodes: {c.note}" for c in cells if c.note]
    notes += [f"{c.tool} at {c.size:,} nodes: {len(c.errors)} failed run(s): {c.errors[0]}" for c in cells if c.errors]
    details = [f"{c.tool} at {c.size:,} nodes, sub-steps (median s): {c.detail()}" for c in cells if c.runs]
    legend = "timings: median of runs in seconds; peak RSS: largest VmHWM of the runs; workers use OMP_NUM_THREADS=1"
    bullet = "- " if markdown else ""
    for line in [legend, *notes, *details, *goal_lines(by_size), *checks]:
        print(f"{bullet}{line}")


if __name__ == "__main__":
    sys.exit(main())

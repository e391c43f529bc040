"""Is fidelity validation of a MiniLM-sized model cheaper than 20 plain inference runs of both models?

Run from the repository root::

    .venv/bin/python bench/validate.py [--repeats 3] [--markdown] [--profile]

The goal measured: "The validation of one MiniLM-sized model (90 MB, about
250 nodes) at 16 samples, with per-layer localization, takes less time than 20
plain inference runs of both models."

Set-up, in a temporary folder:

- reference: ``model_zoo.encoder.build_encoder()`` with its defaults
  (MiniLM-L6-H384, random weights), saved as one ``.onnx`` file;
- candidate: the same model with one FFN weight (the middle layer's
  ``ffn/up_weight``) scaled by 1.001, so the outputs differ a little and
  validation and localization have real work.

Measured in one process, after one warm-up of each, ``--repeats`` times with
the order of the two alternating between repeats; the table shows medians:

- (a) ``graphopt.validate(reference, candidate, samples=16, per_layer=True,
  threads=1, shapes=...)`` on file paths, so it includes loading both models
  and creating its sessions, as a user's call would;
- (b) 20 runs of the reference plus 20 runs of the candidate, alternating,
  through two onnxruntime sessions created beforehand (CPU, full graph
  optimization, 1 thread), on feeds like the ones validate synthesizes:
  random ``input_ids`` below the vocabulary size and an all-ones mask.

Both sides use batch 1, sequence 128. validate synthesizes 16 for a dim named
``sequence`` unless told otherwise, so it is passed ``shapes`` explicitly; at
16 tokens each run would be several times cheaper and the comparison unfair
to (b). ``validate`` without ``per_layer`` is timed too, as a breakdown, and
``--profile`` prints where one more validate call spends its time.

Every onnxruntime session here runs with 1 intra-op and 1 inter-op thread,
and numpy's BLAS is pinned to 1 thread too, so the ratio does not depend on
the core count.

This is a benchmark, not a test: it exits 0 whatever the goal's outcome, and
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workers
from cli_args import OneLineParser, positive_int  # bench/ is on sys.path when run as a script

# Only the standard library at module level: the thread variables below must
# be set before numpy and onnxruntime are first imported.

_REPO_ROOT = Path(__file__).resolve().parent.parent
_THREAD_ENV = workers.THREAD_ENV  # one thread for numpy/BLAS and onnxruntime
SAMPLES = 16
PLAIN_RUNS = 20
BATCH, SEQUENCE = 1, 128
PERTURBATION = 1.001
WARMUP_RUNS = 3
PROFILE_LINES = 25


# --------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class Setup:
    """The two model files and what the table says about them."""

    reference: Path
    candidate: Path
    perturbed: str
    params: int
    weight_bytes: int
    file_bytes: int
    nodes: int
    vocab: int


def prepare(folder: Path) -> Setup:
    """Builds the default encoder and writes the reference and the perturbed candidate."""
    sys.path.insert(0, str(_REPO_ROOT))  # the checkout this script lives in, installed or not
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from model_zoo.encoder import build_encoder

    zoo = build_encoder()
    model = zoo.model
    reference = zoo.save(folder / "reference")
    layers = sum(1 for node in model.graph.node if node.op_type == "Softmax")
    perturbed = f"layer{layers // 2}/ffn/up_weight"
    candidate_model = onnx.ModelProto()
    candidate_model.CopyFrom(model)
    (tensor,) = [t for t in candidate_model.graph.initializer if t.name == perturbed]
    scaled = numpy_helper.to_array(tensor) * np.float32(PERTURBATION)
    tensor.CopyFrom(numpy_helper.from_array(scaled, perturbed))
    candidate = folder / "candidate" / "encoder.onnx"
    candidate.parent.mkdir()
    onnx.save_model(candidate_model, candidate)
    (word_table,) = [t for t in model.graph.initializer if t.name == "embeddings/word_table"]
    return Setup(
        reference=reference,
        candidate=candidate,
        perturbed=perturbed,
        params=sum(_numel(t.dims) for t in model.graph.initializer),
        weight_bytes=sum(len(t.raw_data) for t in model.graph.initializer),
        file_bytes=reference.stat().st_size,
        nodes=len(model.graph.node),
        vocab=int(word_table.dims[0]),
    )


def _numel(dims: Any) -> int:
    count = 1
    for dim in dims:
        count *= int(dim)
    return count


# --------------------------------------------------------------------------
# The two measured workloads


def open_sessions(setup: Setup) -> list[Any]:
    """Reference and candidate sessions for the plain runs: CPU, full optimization, 1 thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    paths = (setup.reference, setup.candidate)
    return [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]


def plain_feeds(vocab: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(1)
    return {
        "input_ids": rng.integers(0, vocab, size=(BATCH, SEQUENCE), dtype=np.int64),
        "attention_mask": np.ones((BATCH, SEQUENCE), dtype=np.int64),
    }


def plain_runs(sessions: list[Any], feeds: dict[str, Any], runs: int = PLAIN_RUNS) -> tuple[float, list[float]]:
    """``runs`` runs of each session, alternating; the total and each session's per-run times."""
    per_session: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for _ in range(runs):
        for index, session in enumerate(sessions):
            began = time.perf_counter()
            session.run(None, feeds)
            per_session[index].append(time.perf_counter() - began)
    total = time.perf_counter() - start
    return total, [statistics.median(times) for times in per_session]


def validate_call(setup: Setup, per_layer: bool) -> Callable[[], Any]:
    """The validate call being measured, on file paths, as a user would make it."""
    shapes = {"input_ids": (BATCH, SEQUENCE), "attention_mask": (BATCH, SEQUENCE)}

    def call() -> Any:
        # Imported here so that a graphopt without validate is a reported failure, not a crash.
        from graphopt.validate import validate

        return validate(
            str(setup.reference), str(setup.candidate), samples=SAMPLES, per_layer=per_layer, threads=1, shapes=shapes
        )

    return call


# --------------------------------------------------------------------------
# Measurement


@dataclass
class Series:
    """The timings of one workload over the repeats, or why it failed."""

    label: str
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


@dataclass
class Measurements:
    validate: Series
    validate_no_layers: Series
    plain: Series
    per_run_ms: list[list[float]] = field(default_factory=list)
    report: Any = None
    # Fixed costs validate pays inside its time and the plain runs pay before theirs.
    sessions_seconds: float = 0.0


def measure(setup: Setup, repeats: int) -> Measurements:
    """Warm-up, then ``repeats`` interleaved rounds; a failing validate is recorded, not raised."""
    result = Measurements(
        Series(f"validate (samples={SAMPLES}, per_layer=True)"),
        Series(f"validate (samples={SAMPLES}, per_layer=False)"),
        Series(f"{PLAIN_RUNS} runs reference + {PLAIN_RUNS} runs candidate"),
    )
    start = time.perf_counter()
    sessions = open_sessions(setup)
    result.sessions_seconds = time.perf_counter() - start
    feeds = plain_feeds(setup.vocab)
    calls = {"full": validate_call(setup, True), "no_layers": validate_call(setup, False)}
    _progress("warm-up")
    plain_runs(sessions, feeds, WARMUP_RUNS)
    result.report = _timed(calls["full"], Series("warm-up"))
    _timed(calls["no_layers"], Series("warm-up"))
    for repeat in range(repeats):
        steps: list[Callable[[], None]] = [
            lambda: _plain_into(result, sessions, feeds),
            lambda: _validate_into(result.validate, calls["full"]),
            lambda: _validate_into(result.validate_no_layers, calls["no_layers"]),
        ]
        # Alternating the order cancels slow drifts (thermal, page cache) between the workloads.
        for step in steps if repeat % 2 == 0 else reversed(steps):
            step()
        _progress(f"repeat {repeat + 1}/{repeats}: " + ", ".join(_last(s) for s in _series(result)))
    return result


def _plain_into(result: Measurements, sessions: list[Any], feeds: dict[str, Any]) -> None:
    total, per_run = plain_runs(sessions, feeds)
    result.plain.seconds.append(total)
    result.per_run_ms.append([seconds * 1000 for seconds in per_run])


def _validate_into(series: Series, call: Callable[[], Any]) -> None:
    if not series.error:  # one failure is enough to know
        _timed(call, series)


def _timed(call: Callable[[], Any], series: Series) -> Any:
    start = time.perf_counter()
    try:
        report = call()
    except Exception as exc:  # the benchmark reports any failure of the code it measures
        series.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _progress(f"{series.label} failed: {series.error}")
        return None
    series.seconds.append(time.perf_counter() - start)
    return report


def _series(result: Measurements) -> list[Series]:
    return [result.validate, result.validate_no_layers, result.plain]


def _last(series: Series) -> str:
    return f"{series.label.split(' (')[0]} {series.seconds[-1]:.2f} s" if series.seconds else f"{series.label} failed"


def profile_validate(setup: Setup) -> list[str]:
    """cProfile of one more validate call (per_layer=True): the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        validate_call(setup, True)()
    except Exception as exc:  # reported like the measured calls
        return [f"profile: validate failed: {type(exc).__name__}: {exc}"]
    finally:
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(PROFILE_LINES)
    return text.getvalue().rstrip().splitlines()


# --------------------------------------------------------------------------
# Report


def table_rows(setup: Setup, result: Measurements) -> list[tuple[str, str]]:
    rows = [
        ("model", f"encoder (MiniLM-L6-H384 shape, random weights), batch {BATCH}, sequence {SEQUENCE}"),
        ("parameters", f"{setup.params:,}"),
        ("weights / file", f"{setup.weight_bytes / 1e6:.1f} MB / {setup.file_bytes / 1e6:.1f} MB"),
        ("nodes", str(setup.nodes)),
        ("candidate", f"{setup.perturbed} x {PERTURBATION}"),
    ]
    for series in _series(result):
        rows.append((f"{series.label}, median s", _seconds(series)))
    if result.per_run_ms:
        ref_ms = statistics.median(times[0] for times in result.per_run_ms)
        cand_ms = statistics.median(times[1] for times in result.per_run_ms)
        rows.append(("one plain run, reference / candidate, median ms", f"{ref_ms:.1f} / {cand_ms:.1f}"))
    rows.append(("creating the plain runs' two sessions (not counted), s", f"{result.sessions_seconds:.2f}"))
    ratio = _ratio(result)
    rows.append(("ratio validate / plain runs", "n/a" if ratio is None else f"{ratio:.2f}"))
    if result.report is not None:
        rows.append(("validation verdict on the candidate", "passed" if result.report.passed else "failed"))
    return rows


def _seconds(series: Series) -> str:
    median = series.median()
    if median is None:
        return f"failed: {series.error}"
    spread = f" (min {min(series.seconds):.2f}, max {max(series.seconds):.2f})" if len(series.seconds) > 1 else ""
    return f"{median:.2f}{spread}"


def _ratio(result: Measurements) -> float | None:
    validate, plain = result.validate.median(), result.plain.median()
    return None if validate is None or not plain else validate / plain


def format_table(rows: list[tuple[str, str]], markdown: bool) -> str:
    headers = ("quantity", "value")
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    width = max(len(text) for text, _ in [headers, *rows])
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in [headers, ("-" * width, "-----"), *rows])


def goal_line(result: Measurements) -> str:
    ratio = _ratio(result)
    if ratio is None:
        reason = result.validate.error or result.plain.error or "no timings"
        return f"FAIL goal (validate < {PLAIN_RUNS}+{PLAIN_RUNS} plain runs): not measured ({reason})"
    verdict = "PASS" if ratio < 1 else "FAIL"
    plain = f"{PLAIN_RUNS}+{PLAIN_RUNS} plain runs"
    return f"{verdict} goal: validate with per-layer localization takes {ratio:.2f}x the time of {plain} (< 1 required)"


def print_report(setup: Setup, result: Measurements, repeats: int, markdown: bool, profile: list[str]) -> None:
    print(format_table(table_rows(setup, result), markdown))
    print()
    notes = [
        f"timings: median of {repeats} repeat(s) after one warm-up, workloads interleaved; "
        "onnxruntime 1 intra-op + 1 inter-op thread, validate(threads=1), BLAS 1 thread",
        f"validate is given shapes={{'input_ids': ({BATCH}, {SEQUENCE}), 'attention_mask': ({BATCH}, {SEQUENCE})}}: "
        f"its default for a dim named 'sequence' is 16, which would make its runs cheaper than the plain runs",
        "validate's time includes loading both models from disk and creating its sessions; "
        "the plain runs' sessions are created beforehand",
        goal_line(result),
    ]
    bullet = "- " if markdown else ""
    for line in notes:
        print(f"{bullet}{line}")
    if profile:
        print()
        print("```" if markdown else "profile of one validate call (per_layer=True):")
        print("\n".join(profile))
        if markdown:
            print("```")


# --------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="measured rounds (default 3); medians are shown")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--profile", action="store_true", help="also cProfile one more validate call")
    return parser.parse_args(argv)


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds only the report.
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(_THREAD_ENV)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-validate-") as tmp:
        setup = prepare(Path(tmp))
        _progress(f"built and saved the encoder: {setup.params:,} parameters, {setup.nodes} nodes")
        result = measure(setup, args.repeats)
        profile = profile_validate(setup) if args.profile else []
    print_report(setup, result, args.repeats, args.markdown, profile)
    bullet = "- " if args.markdown else ""
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""graphopt's ``qdq`` pass against onnxruntime.quantization: size, fidelity and latency.

Run from the repository root::

    .venv/bin/python bench/qdq.py [--models a,b] [--quick] [--calibration-samples 16]
        [--eval-samples 16] [--rounds 20] [--timeout 600] [--markdown]

Models: ``model_zoo.build(name)`` for cnn_bn, mlp, attention, resnet50 and
squeezenet, plus ``encoder`` (``model_zoo.encoder.build_encoder()``,
MiniLM-L6-H384 with random weights, batch 1, sequence 128). ``--quick`` keeps
cnn_bn, mlp, attention and squeezenet; ``--models`` picks any zoo names and
``encoder`` (explicit ``--models`` wins).

Feeds: ``graphopt.data.synthesize_feeds`` on the float model, with the zoo
sample feeds' shapes (so the encoder sees 128 tokens): calibration feeds
(``--calibration-samples``, seed 0) and separate evaluation feeds
(``--eval-samples``, seed 1). Every tool calibrates on the same calibration
feeds; everything is measured on the evaluation feeds.

Each tool quantizes the same float ``.onnx`` file in a fresh subprocess (so a
crash or a hang is one failed cell, not a failed benchmark; ``--timeout``
seconds each):

- graphopt: ``graphopt.load`` / ``run_pipeline(model, [QuantizePass(data=
  calibration feeds, threads=1)])`` / ``graphopt.save``, with the pass's
  defaults (percentile calibration, u8 activations, bias correction,
  check_speed=True, which keeps the model float if int8 is slower). Where its
  evaluation cosine is below 0.99 a second row runs ``target_cosine=0.99``
  (which holds back every fourth calibration sample to judge itself);
- ort-static: ``quantize_static(QuantFormat.QDQ, per_channel=True,
  CalibrationMethod.MinMax)`` with onnxruntime's default types (QInt8
  activations and weights) and a CalibrationDataReader over the calibration
  feeds;
- ort-dynamic: ``quantize_dynamic`` with its defaults (QInt8 weights, per
  tensor).

onnxruntime's tools first get the float file as is. If they raise, or write a
model onnxruntime cannot load, they get it again converted to opset 13 by
``onnx.version_converter`` (below 13 only: for opset 9 files onnxruntime
relabels the opset as 11 and writes per-channel DequantizeLinear nodes,
which need 13), then also through ``quant_pre_process``; the row names the
steps it needed, and the error of each earlier try is listed under the table.
A tool that fails every try shows "failed: <error>" in its row.

Measured:

- size: float file bytes / quantized file bytes (external data included);
- fidelity, on the evaluation feeds against the float model's outputs, per
  output over all samples flattened, worst output shown: cosine, relative L2
  (||q - f|| / ||f||) and top-1 agreement for outputs that look like class
  scores ([batch, classes >= 2] once trailing 1-dims are dropped);
- latency: onnxruntime CPU sessions with default graph optimization and 1
  inter-op thread, at 1 intra-op thread and at all cores (intra-op spinning
  off, so that one session's idle workers do not spin on the cores the next
  session in the round needs); after two warm-up rounds, the float and
  quantized sessions run interleaved (float, graphopt, ort-static,
  ort-dynamic, float, ...) on the first evaluation feed for ``--rounds``
  rounds: proportionally fewer (at least 5) where one round takes over
  0.5 s, more (up to 2,000, about 1 s in all) where they are that fast. Speed-up is the
  float median / the quantized median, so above 1 is faster than float;
- quantize s: each tool's wall time (load, calibrate, quantize, save), not a goal.

Goals (PASS/FAIL, on graphopt's default row): size ratio >= 3.5x on every
weight-dominated model (initializers >= 99% of the float file, where a perfect
4x weight shrink still leaves 3.88x, so 3.5x leaves room for scales and Q/DQ
nodes); speed-up at 1 thread >= max(1.0, ort-static's) on every model (a
model the speed guard kept float runs the float kernels: it counts as the
float model's speed, its one reading shown); cosine >= 0.99 on every model.
Where graphopt misses the cosine goal, the float model's own sensitivity is
measured: its cosine under int8 weights alone, under graphopt's int8
activations alone (weights float), and under 0.1% weight noise.

numpy's BLAS is pinned to 1 thread. This is a benchmark, not a test: it exits
0 whatever the goals' outcome, and 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workers
from cli_args import OneLineParser, positive_int, positive_seconds  # bench/ is on sys.path when run as a script
from machine import machine_line

# Only the standard library at module level: the thread variables below must
# be set before numpy and onnxruntime are first imported.

_REPO_ROOT = Path(__file__).resolve().parent.parent
_THREAD_ENV = workers.THREAD_ENV  # one thread for numpy/BLAS and onnxruntime
DEFAULT_MODELS = ("cnn_bn", "mlp", "attention", "resnet50", "squeezenet", "encoder")
QUICK_MODELS = ("cnn_bn", "mlp", "attention", "squeezenet")
TOOLS = ("graphopt", "graphopt-cos", "ort-static", "ort-dynamic")
LABELS = {"graphopt": "graphopt", "graphopt-cos": "graphopt target_cosine=0.99",
          "ort-static": "ort-static", "ort-dynamic": "ort-dynamic"}
CALIBRATION_SEED, EVAL_SEED = 0, 1
SIZE_GOAL, COSINE_GOAL, WEIGHT_SHARE = 3.5, 0.99, 0.99
_ORT_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
ERROR_CHARS = 90  # of an error in a table cell; the whole one is listed below the goals
MIN_ROUNDS, SLOW_ROUND_SECONDS = 5, 0.5
MAX_ROUNDS, FAST_SECONDS = 2000, 1.0
DEFAULT_TIMEOUT = 600.0


# --------------------------------------------------------------------------
# Quantization workers: each runs in its own process and prints one JSON line.


def _read_feeds(folder: Path) -> list[dict[str, Any]]:
    import numpy as np

    feeds = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as data:
            feeds.append({name: data[name] for name in data.files})
    return feeds


def _quantize_graphopt(source: Path, feeds: list[dict[str, Any]], out: Path, target_cosine: float | None) -> dict[str, Any]:
    sys.path.insert(0, str(_REPO_ROOT))  # the checkout this script lives in, installed or not
    import graphopt
    from passes.qdq import QuantizePass

    start = time.perf_counter()
    model = graphopt.load(source)
    pass_ = QuantizePass(data=feeds, threads=1, target_cosine=target_cosine)
    graphopt.run_pipeline(model, [pass_])
    graphopt.save(model, out)
    return {"seconds": time.perf_counter() - start, "applied": [], "note": pass_.summary.line()}


def _quantize_ort(tool: str, source: Path, feeds: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):
        """The calibration feeds, in order, as many times as onnxruntime rewinds."""

        def __init__(self) -> None:
            self._iter = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._iter, None)

        def rewind(self) -> None:
            self._iter = iter(feeds)

    def quantize(path: Path) -> None:
        if tool == "ort-dynamic":
            q.quantize_dynamic(path, out)
        else:
            q.quantize_static(path, out, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              calibrate_method=q.CalibrationMethod.MinMax)
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # an unloadable output is a failure too

    start = time.perf_counter()
    path, applied, errors = source, [], []
    for step in ("as is", f"opset {_ORT_OPSET}", "pre-processed"):
        try:
            if step.startswith("opset"):
                if _opset(source) >= _ORT_OPSET:
                    continue
                path = _convert(source, out.with_name(f"{source.stem}.opset{_ORT_OPSET}.onnx"))
            elif step == "pre-processed":
                prepared = out.with_name(f"{source.stem}.pre.onnx")
                quant_pre_process(path, prepared)
                path = prepared
            applied += [] if step == "as is" else [step]
            quantize(path)
            return {"seconds": time.perf_counter() - start, "applied": applied, "note": "; ".join(errors)}
        except Exception as exc:  # onnxruntime.quantization raises many types
            errors.append(f"{step}: {_one_line(exc)}")
    raise RuntimeError(" / ".join(errors))


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _convert(source: Path, target: Path) -> Path:
    """The float model at opset 13, which per-channel QDQ needs; onnxruntime only relabels 9 as 11."""
    import onnx
    from onnx import version_converter

    onnx.save_model(version_converter.convert_version(onnx.load(str(source)), _ORT_OPSET), target)
    return target


def run_worker(tool: str, source: Path, data: Path, out: Path) -> None:
    feeds = _read_feeds(data)
    try:
        if tool.startswith("graphopt"):
            report = _quantize_graphopt(source, feeds, out, COSINE_GOAL if tool == "graphopt-cos" else None)
        else:
            report = _quantize_ort(tool, source, feeds, out)
    except Exception as exc:  # the benchmark reports any failure of the tools it measures
        import traceback

        traceback.print_exc()
        report = {"error": _one_line(exc)}
    print(json.dumps(report), flush=True)


def _one_line(exc: BaseException) -> str:
    """The error's first line; a long one keeps its start and its end, where onnxruntime says what is wrong."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 320:
        text = f"{text[:160]} ... {text[-150:]}"
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------
# Set-up


@dataclass
class Setup:
    name: str
    source: Path
    file_bytes: int
    weight_share: float
    nodes: int
    calibration: Path
    eval_feeds: list[dict[str, Any]]


def prepare(name: str, folder: Path, calibration_count: int, eval_count: int) -> Setup:
    sys.path.insert(0, str(_REPO_ROOT))
    import numpy as np

    import graphopt
    import model_zoo
    from graphopt.data import synthesize_feeds

    if name == "encoder":
        from model_zoo.encoder import build_encoder

        zoo = build_encoder()
    else:
        zoo = model_zoo.build(name)
    source = zoo.save(folder / "float")
    model_ir = graphopt.load(zoo.model)
    shapes = {key: value.shape for key, value in zoo.feeds.items()}
    calibration = folder / "calibration"
    calibration.mkdir()
    for index, feeds in enumerate(synthesize_feeds(model_ir, count=calibration_count, seed=CALIBRATION_SEED, shapes=shapes)):
        np.savez(calibration / f"{index:04d}.npz", **feeds)
    eval_feeds = list(synthesize_feeds(model_ir, count=eval_count, seed=EVAL_SEED, shapes=shapes))
    file_bytes = _model_bytes(source)
    weights = sum(_tensor_bytes(t) for t in zoo.model.graph.initializer)
    return Setup(name, source, file_bytes, weights / file_bytes, len(zoo.model.graph.node), calibration, eval_feeds)


def _tensor_bytes(tensor: Any) -> int:
    from onnx import numpy_helper

    return len(tensor.raw_data) if tensor.raw_data else int(numpy_helper.to_array(tensor).nbytes)


def _model_bytes(path: Path) -> int:
    """The .onnx file plus every external data file it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in _all_tensors(model) for entry in tensor.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def _all_tensors(model: Any) -> list[Any]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    return tensors


# --------------------------------------------------------------------------
# Quantization (parent side)


@dataclass
class Cell:
    """One tool's result on one model."""

    tool: str
    path: Path | None = None
    error: str = ""
    note: str = ""  # graphopt's summary line, or the errors of the steps onnxruntime needed first
    applied: list[str] = field(default_factory=list)  # what was done to the float model before onnxruntime quantized it
    trace: str = ""
    seconds: float | None = None
    size_ratio: float | None = None
    cosine: float | None = None
    rel_l2: float | None = None
    top1: float | None = None
    speedup: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.path is not None and not self.error

    @property
    def label(self) -> str:
        return LABELS[self.tool] + (f" ({', '.join(self.applied)})" if self.applied else "")


def _short(text: str, folder: Path) -> str:
    """Without the temporary folder's path, which onnxruntime's messages repeat."""
    return text.replace(f"{folder}/", "")


def quantize(tool: str, setup: Setup, folder: Path, timeout: float) -> Cell:
    cell = Cell(tool)
    out_dir = folder / tool
    out_dir.mkdir()
    out = out_dir / f"{setup.name}.{tool}.onnx"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--path", str(setup.source),
               "--data", str(setup.calibration), "--out", str(out)]
    try:
        # cwd: onnxruntime's tools leave temporary models in the working folder.
        done = subprocess.run(command, env={**os.environ, **_THREAD_ENV}, capture_output=True, text=True,
                              timeout=timeout, cwd=out_dir)
    except subprocess.TimeoutExpired:
        cell.error = f"timeout after {timeout:.0f} s"
        return cell
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        cell.error = _short(tail[-1].strip() if tail else f"exit code {done.returncode}", folder)
        return cell
    report = json.loads(lines[-1])
    if "error" in report:
        cell.error, cell.trace = _short(report["error"], folder), done.stderr.strip()
        return cell
    cell.path, cell.seconds, cell.applied = out, report["seconds"], report["applied"]
    cell.note = _short(report["note"], folder)
    cell.size_ratio = setup.file_bytes / _model_bytes(out)
    return cell


# --------------------------------------------------------------------------
# Measurement: fidelity and latency in onnxruntime


def open_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: resnet50's unused-initializer warning would flood stderr
    # Interleaved sessions: one session's spinning idle workers must not slow the next one down.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _own(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    return {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}


def run_all(session: Any, feeds_list: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = [o.name for o in session.get_outputs()]
    outputs: dict[str, list[Any]] = {name: [] for name in names}
    for feeds in feeds_list:
        for name, value in zip(names, session.run(None, _own(session, feeds))):
            outputs[name].append(value)
    return outputs


def fidelity(expected: dict[str, list[Any]], got: dict[str, list[Any]]) -> tuple[float, float, float | None]:
    """Worst cosine, worst relative L2 and worst top-1 agreement over the outputs."""
    import numpy as np

    pairs = [(expected[name], got[name]) for name in expected if name in got]
    if len(pairs) != len(expected):  # outputs renamed: compare by position
        pairs = list(zip(expected.values(), got.values()))
    cosines, rel_l2s, top1s = [], [], []
    for reference, candidate in pairs:
        f = np.concatenate([a.astype(np.float64).ravel() for a in reference])
        g = np.concatenate([a.astype(np.float64).ravel() for a in candidate])
        if f.shape != g.shape:
            return -1.0, float("inf"), None
        norms = np.linalg.norm(f) * np.linalg.norm(g)
        cosines.append(float(f @ g / norms) if norms else float(np.array_equal(f, g)))
        rel_l2s.append(float(np.linalg.norm(g - f) / max(np.linalg.norm(f), 1e-30)))
        scores = [(_class_scores(a), _class_scores(b)) for a, b in zip(reference, candidate)]
        if all(a is not None and b is not None for a, b in scores):
            hits = [np.argmax(a, axis=1) == np.argmax(b, axis=1) for a, b in scores]
            top1s.append(float(np.mean(np.concatenate(hits))))
    return min(cosines), max(rel_l2s), (min(top1s) if top1s else None)


def _class_scores(array: Any) -> Any:
    """[batch, classes] when the array looks like class scores (trailing 1-dims dropped), else None."""
    shape = list(array.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return array.reshape(shape) if len(shape) == 2 and shape[1] >= 2 else None


def latencies(sessions: dict[str, Any], feeds: dict[str, Any], rounds: int) -> tuple[dict[str, float], int]:
    """Median seconds per session over interleaved rounds, after two warm-up rounds; and the rounds run."""
    own = {name: _own(session, feeds) for name, session in sessions.items()}
    start = time.perf_counter()
    for _ in range(2):
        for name, session in sessions.items():
            session.run(None, own[name])
    round_seconds = (time.perf_counter() - start) / 2
    if round_seconds > SLOW_ROUND_SECONDS:
        rounds = max(MIN_ROUNDS, min(rounds, int(rounds * SLOW_ROUND_SECONDS / round_seconds)))
    elif round_seconds * rounds < FAST_SECONDS:  # sub-millisecond models: more rounds, steadier medians
        rounds = min(MAX_ROUNDS, max(rounds, int(FAST_SECONDS / max(round_seconds, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, own[name])
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}, rounds


@dataclass
class ModelResult:
    setup: Setup
    cells: dict[str, Cell]
    float_ms: dict[int, float] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)  # perturbation -> output cosine (graphopt misses only)


# Perturbations of the float model that show how much fidelity it can keep at all: a
# model whose cosine falls below the goal under int8 weight rounding alone, or under
# int8 activations alone, cannot meet it with both.
PERTURBATIONS = {
    "int8 weights alone": "every weight of rank >= 2 rounded to 255 levels per slice along axis 0, activations float",
    "int8 activations alone": "graphopt's activation Q/DQ (same placement and calibrated ranges, per tensor as onnxruntime's "
    "int8 kernels take them) with every weight and bias left float",
    "0.1% weight noise": "every weight of rank >= 2 times (1 + 0.001 N(0, 1)), seed 0",
}


def _activations_alone(setup: Setup, out: Path) -> None:
    """graphopt's qdq with its weight step switched off: the same activation Q/DQ, weights and biases float."""
    import graphopt
    from passes.qdq import QuantizePass

    class ActivationsOnly(QuantizePass):
        def _quantize_target(self, maker: Any, target: Any, scales: Any) -> bool:  # the weight and bias step
            return False

    model = graphopt.load(setup.source)
    graphopt.run_pipeline(model, [ActivationsOnly(data=_read_feeds(setup.calibration), threads=1, check_speed=False)])
    graphopt.save(model, out)


def weight_sensitivity(setup: Setup, folder: Path, expected: dict[str, list[Any]]) -> dict[str, float]:
    """Output cosine of the float model under each of PERTURBATIONS, on the evaluation feeds."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    result = {}
    for label in PERTURBATIONS:
        path = folder / f"{setup.name}.{label.split()[1] if label.startswith('int8') else label.split()[0]}.onnx"
        if label == "int8 activations alone":
            _activations_alone(setup, path)
            result[label] = fidelity(expected, run_all(open_session(path, os.cpu_count() or 1), setup.eval_feeds))[0]
            continue
        model = onnx.load(str(setup.source))
        rng = np.random.default_rng(0)
        for tensor in model.graph.initializer:
            weight = numpy_helper.to_array(tensor)
            if weight.dtype != np.float32 or weight.ndim < 2:
                continue
            if label.startswith("int8"):
                scale = np.abs(weight).max(axis=tuple(range(1, weight.ndim)), keepdims=True) / 127
                scale[scale == 0] = 1
                changed = np.round(weight / scale) * scale
            else:
                changed = weight * (1 + 1e-3 * rng.standard_normal(weight.shape))
            tensor.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), tensor.name))
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
        got = run_all(open_session(path, os.cpu_count() or 1), setup.eval_feeds)
        result[label] = fidelity(expected, got)[0]
    return result


def measure(setup: Setup, folder: Path, args: argparse.Namespace) -> ModelResult:
    cells: dict[str, Cell] = {}
    all_cores = os.cpu_count() or 1
    expected = run_all(open_session(setup.source, all_cores), setup.eval_feeds)
    for tool in TOOLS:
        if tool == "graphopt-cos":
            default = cells["graphopt"]
            if not default.ok or default.cosine is None or default.cosine >= COSINE_GOAL:
                continue
        cell = quantize(tool, setup, folder, args.timeout)
        cells[tool] = cell
        if cell.ok:
            try:
                assert cell.path is not None
                got = run_all(open_session(cell.path, all_cores), setup.eval_feeds)
                cell.cosine, cell.rel_l2, cell.top1 = fidelity(expected, got)
            except Exception as exc:  # onnxruntime refuses or fails the quantized model
                cell.error, cell.path = _short(f"onnxruntime: {_one_line(exc)}", folder), None
        shown = cell.error or f"{cell.seconds:.1f} s, {cell.size_ratio:.2f}x smaller, cosine {cell.cosine:.5f}"
        _progress(f"  {cell.label}: {shown}")
    result = ModelResult(setup, cells)
    default = cells.get("graphopt")
    if default is not None and default.ok and default.cosine is not None and default.cosine < COSINE_GOAL:
        result.sensitivity = weight_sensitivity(setup, folder, expected)
        _progress("  sensitivity: " + ", ".join(f"{k} cosine {v:.5f}" for k, v in result.sensitivity.items()))
    for threads in sorted({1, all_cores}):
        sessions = {"float": open_session(setup.source, threads)}
        sessions.update({tool: open_session(c.path, threads) for tool, c in cells.items() if c.ok and c.path})
        medians, result.rounds[threads] = latencies(sessions, setup.eval_feeds[0], args.rounds)
        result.float_ms[threads] = medians["float"] * 1000
        for tool, seconds in medians.items():
            if tool != "float":
                cells[tool].speedup[threads] = medians["float"] / seconds
        _progress(f"  latency at {threads} thread(s), {result.rounds[threads]} rounds: float {medians['float'] * 1000:.2f} ms, "
                  + ", ".join(f"{LABELS[t]} {cells[t].speedup[threads]:.2f}x" for t in medians if t != "float"))
    return result


# --------------------------------------------------------------------------
# Report


def _headers(threads: list[int]) -> tuple[str, ...]:
    return ("tool", "size x", "cosine", "rel L2", "top-1", *(f"speed-up @{t} thr" for t in threads), "quantize s")


def model_rows(result: ModelResult, threads: list[int]) -> list[tuple[str, ...]]:
    rows = [("float", "1.00x", "1", "0", "", *(f"{result.float_ms[t]:.2f} ms" for t in threads), "")]
    for cell in result.cells.values():
        label = cell.label
        if not cell.ok:
            error = cell.error if len(cell.error) <= ERROR_CHARS else cell.error[: ERROR_CHARS - 3] + "..."
            rows.append((label, f"failed: {error}", *[""] * (len(threads) + 4)))
            continue
        top1 = f"{cell.top1:.1%}" if cell.top1 is not None else "n/a"
        speed = [f"{cell.speedup[t]:.2f}x" if t in cell.speedup else "" for t in threads]
        rows.append((label, f"{cell.size_ratio:.2f}x", f"{cell.cosine:.5f}", f"{cell.rel_l2:.4f}", top1, *speed,
                     f"{cell.seconds:.1f}"))
    return rows


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(text) for text in column) for column in zip(headers, *rows)]
    body = [headers, tuple("-" * w for w in widths), *rows]
    return "\n".join("  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(r, widths))).rstrip()
                     for r in body)


def _ceiling(share: float) -> float:
    """File size ratio if the weights shrank exactly 4x and nothing else changed."""
    return 1 / (share / 4 + (1 - share))


def goal_lines(results: list[ModelResult], tool: str = "graphopt") -> list[str]:
    size_miss, speed_miss, cos_miss, counted = [], [], [], []
    for result in results:
        name, cell = result.setup.name, result.cells.get(tool)
        if cell is None:
            continue
        weight_dominated = result.setup.weight_share >= WEIGHT_SHARE
        if weight_dominated:
            counted.append(name)
        if not cell.ok:
            for misses in ((size_miss,) if weight_dominated else ()) + (speed_miss, cos_miss):
                misses.append(f"{name} (failed)")
            continue
        if weight_dominated and cell.size_ratio is not None and cell.size_ratio < SIZE_GOAL:
            kept = " (check_speed kept the model float)" if "stays float" in cell.note else ""
            if "stored as int8" in cell.note:
                kept = " (int8 kernels slower: float kernels with int8-stored weights; biases, scales and graph stay)"
            size_miss.append(f"{name} {cell.size_ratio:.2f}x{kept}")
        static = result.cells.get("ort-static")
        bar = max(1.0, static.speedup.get(1, 0.0) if static is not None and static.ok else 0.0)
        # A model the speed guard kept float runs float kernels (its weights at most stored as int8 and
        # widened once at load): the float model's speed, whatever the noise of one reading.
        if cell.speedup.get(1, 0.0) < bar and "stays float" not in cell.note:
            speed_miss.append(f"{name} {cell.speedup.get(1, 0.0):.3f}x < {bar:.3f}x")
        if cell.cosine is not None and cell.cosine < COSINE_GOAL:
            floor = ", ".join(f"{k}: {v:.5f}" for k, v in result.sensitivity.items())
            cos_miss.append(f"{name} {cell.cosine:.5f}" + (f" (float model's own cosine under {floor})" if floor else ""))
    label = LABELS[tool]
    goals = [
        (f"{label} size ratio >= {SIZE_GOAL}x on weight-dominated models ({', '.join(counted) or 'none run'})", size_miss),
        (f"{label} speed-up at 1 thread >= max(1.0, ort-static's) on every model (or kept float by its speed guard)", speed_miss),
        (f"{label} cosine >= {COSINE_GOAL} on every model", cos_miss),
    ]
    return [f"{'FAIL' if misses else 'PASS'} {text}" + (f": misses {'; '.join(misses)}" if misses else "")
            for text, misses in goals]


def print_report(results: list[ModelResult], args: argparse.Namespace) -> None:
    bullet = "- " if args.markdown else ""
    threads = sorted({1, os.cpu_count() or 1})
    for result in results:
        s = result.setup
        title = (f"{s.name} ({s.nodes} nodes, {s.file_bytes / 2**20:.2f} MiB, weights {s.weight_share:.1%} of the file, "
                 f"4x-weights ceiling {_ceiling(s.weight_share):.2f}x; latency rounds "
                 + "/".join(str(result.rounds[t]) for t in threads) + ")")
        print(f"### {title}\n" if args.markdown else title)
        print(format_table(_headers(threads), model_rows(result, threads), args.markdown))
        print()
        for cell in result.cells.values():
            if cell.ok and cell.note:
                print(f"{bullet}{cell.label}: " + (cell.note if cell.tool.startswith("graphopt") else f"failed first: {cell.note}"))
        print()
    legend = (
        f"size x: float file bytes / quantized file bytes; cosine, rel L2 (||q-f||/||f||), top-1: vs the float model on "
        f"{args.eval_samples} evaluation feeds (seed {EVAL_SEED}), worst output, top-1 only for [batch, classes] outputs; "
        f"calibration: the same {args.calibration_samples} feeds (seed {CALIBRATION_SEED}) for every tool; speed-up: "
        f"float median latency / quantized median latency (above 1 = faster than float; the float row shows its median), "
        f"onnxruntime CPU, default graph optimization, spinning off, interleaved rounds after a warm-up (rounds in each "
        f"title, 1 thread/all cores); quantize s: wall time, not a goal"
    )
    tools = ("ort-static: quantize_static QDQ, per_channel=True, MinMax, default QInt8 activations and weights; "
             "ort-dynamic: quantize_dynamic defaults; graphopt: QuantizePass defaults (percentile, u8 activations, "
             f"check_speed), plus a target_cosine={COSINE_GOAL} row where the default misses the cosine goal")
    sensitivity = "sensitivity, where graphopt misses the cosine goal: " + "; ".join(
        f"{label} = {text}" for label, text in PERTURBATIONS.items())
    weights = (f"weight-dominated: initializers >= {WEIGHT_SHARE:.0%} of the float file; below that a perfect 4x weight "
               f"shrink cannot leave room for the {SIZE_GOAL}x goal (see each model's ceiling)")
    lines = [machine_line(("graphopt", "onnx", "onnx-ir", "onnxruntime", "numpy")), legend, tools, weights, sensitivity,
             *goal_lines(results)]
    if any("graphopt-cos" in r.cells for r in results):
        lines += [f"(info) {line}" for line in goal_lines(results, "graphopt-cos")]
    lines += diagnosis_lines(results)
    for line in lines:
        print(f"{bullet}{line}")


def diagnosis_lines(results: list[ModelResult]) -> list[str]:
    lines = []
    for result in results:
        for cell in result.cells.values():
            if cell.error:
                lines.append(f"{result.setup.name}: {cell.label} failed: {cell.error}")
            if cell.error and cell.tool.startswith("graphopt") and cell.trace:
                trace = " | ".join(line.strip() for line in cell.trace.splitlines()[-8:])
                lines.append(f"{result.setup.name}: {cell.label} traceback tail: {trace}")
    return lines


# --------------------------------------------------------------------------
# Command line


def _list_arg(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_list_arg, help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--quick", action="store_true", help=f"only {','.join(QUICK_MODELS)}")
    parser.add_argument("--calibration-samples", type=positive_int, default=16, help="calibration feeds (default 16)")
    parser.add_argument("--eval-samples", type=positive_int, default=16, help="evaluation feeds (default 16)")
    parser.add_argument("--rounds", type=positive_int, default=20, help="interleaved latency rounds (default 20)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, help="seconds per quantization (default 600)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    sys.path.insert(0, str(_REPO_ROOT))
    import model_zoo

    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    valid = (*model_zoo.names(), "encoder")
    unknown = [name for name in args.models if name not in valid]
    if unknown or not args.models:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}")
    return args


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds only the report.
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.update(_THREAD_ENV)  # before parse_args, whose model_zoo import loads numpy
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.path, args.data, args.out)
        return 0
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-qdq-") as tmp:
        for index, name in enumerate(args.models):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            begin = time.perf_counter()
            setup = prepare(name, folder, args.calibration_samples, args.eval_samples)
            _progress(f"{name}: {setup.nodes} nodes, {setup.file_bytes / 2**20:.2f} MiB, "
                      f"built in {time.perf_counter() - begin:.1f} s")
            results.append(measure(setup, folder, args))
    print_report(results, args)
    bullet = "- " if args.markdown else ""
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

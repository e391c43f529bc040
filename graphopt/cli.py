"""The ``graphopt`` command line: optimize, validate, inspect, passes.

Exit codes: 0 ok; 1 a check failed (fidelity outside tolerance, or a pass
produced an invalid model); 2 bad input or usage, reported as one line on
stderr (argparse's usage errors too: ``--help`` shows the usage). Options
are checked before any model is read or pass runs: values out of range,
pass options of the wrong type, report paths that cannot be written, and
validation options given to ``optimize`` without ``--validate``.
``--debug`` adds tracebacks and debug logging. Ctrl-C exits 130, SIGTERM 143,
both after the same clean-up.

``optimize`` never loses data: the output appears only once complete (see
graphopt.io.save), so a failure or Ctrl-C leaves no partial output and a
previous output intact; it refuses to write over its input (exit 2) unless
``--in-place`` is given.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import onnx_ir as ir

from graphopt import io
from graphopt.bisect import bisect_pipeline
from graphopt.cli_args import (
    DEFAULT_PIPELINE,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    validation_options,
)
from graphopt.cli_checks import (
    check_fits_one_file,
    check_report_paths,
    check_result,
    check_synthesis_options,
    check_validation_only,
    output_path,
)
from graphopt.data import LABELS_KEY, check_shape_overrides, load_feeds, parse_shape_overrides, without_labels
from graphopt.errors import DataError, GraphoptError, ModelRunError, PassCheckError, first_line
from graphopt.ledger import LedgerRow, format_bytes
from graphopt.metrics import class_score_shape
from graphopt.pipeline import PassFailedError, PipelineResult, run_pipeline
from graphopt.progress import StepProgress
from graphopt.quick_check import hint_for_step, quick_check
from graphopt.registry import (
    available_passes,
    checked_pipeline,
    is_builtin,
    pass_options,
    resolved_options,
    with_calibration_data,
    with_input_shapes,
    without_timing,
)
from graphopt.report import FidelityReport
from graphopt.spec import PassSpec, load_recipe, parse_spec
from graphopt.summary import summarize
from graphopt.validate import validate

# Output types graphopt.task reads class scores from (numpy kind "f").
_SCORE_TYPES = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)


# optimize's options that only validation reads (--shape and --threads also serve the quick check).
def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns its exit code."""
    parser = build_parser({"optimize": _optimize, "validate": _validate, "inspect": _inspect, "passes": _list_passes})
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _terminate_as_interrupt(), _summarized_warnings_hidden(not args.debug):
            return args.handler(args)
    except PassCheckError as exc:
        return _fail(args, exc, EXIT_CHECK_FAILED)
    except PassFailedError as exc:
        # Exit 1 means a failed check; a pass that crashed is not that, whoever wrote it.
        return _fail(args, exc, EXIT_USAGE, _crash_advice(exc.pass_name))
    except (GraphoptError, ir.passes.PreconditionError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except _Terminated:
        print("graphopt: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (``graphopt inspect --json | head``): stop quietly, as a tool
        # killed by SIGPIPE would, and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


@contextlib.contextmanager
def _summarized_warnings_hidden(hide: bool) -> Iterator[None]:
    """Within the block, log handlers drop the warnings that a pass's printed summary line repeats (ledger.IN_SUMMARY)."""
    handlers = list(logging.getLogger().handlers) if hide else []
    for handler in handlers:
        handler.addFilter(_not_in_summary)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_not_in_summary)


def _not_in_summary(record: logging.LogRecord) -> bool:
    return not getattr(record, "graphopt_in_summary", False)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path runs for it too."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    # Without this, SIGTERM kills the process outright and leaves the save's
    # temporary folder behind. Handlers can only be set from the main thread.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        del signum, frame
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(args: argparse.Namespace, exc: BaseException, code: int, advice: str = "") -> int:
    if args.debug:
        raise exc
    print(f"graphopt: error: {first_line(exc)}{advice}", file=sys.stderr)
    return code


def _crash_advice(name: str) -> str:
    if is_builtin(name):
        return " (a bug in graphopt: please report it with the traceback that --debug prints)"
    module = getattr(available_passes().get(name), "__module__", None)
    origin = f"plug-in module {module}" if module else "a plug-in"
    return f" (the pass comes from {origin}; --debug prints the traceback)"


def _validate(args: argparse.Namespace) -> int:
    check_synthesis_options(args, args.data, "--data")
    options = validation_options(args, args.providers)
    check_report_paths(args, [args.reference, args.candidate])
    report = validate(args.reference, args.candidate, args.data, per_layer=args.per_layer, latency=args.latency, **options)
    return _finish_report(args, report)


def _finish_report(args: argparse.Namespace, report: FidelityReport) -> int:
    print(report.to_text())
    for path, render in ((args.report, report.to_json), (args.report_md, report.to_markdown), (args.report_html, report.to_html)):
        if path is not None:
            io.write_text_atomically(path, render() + ("\n" if path.suffix == ".json" else ""))
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


def _pipeline_steps(args: argparse.Namespace) -> list[PassSpec]:
    if args.recipe is not None:
        return load_recipe(args.recipe)
    return parse_spec(args.passes or DEFAULT_PIPELINE)


def _optimize(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is, before it is read.
    steps = checked_pipeline(_pipeline_steps(args))
    pipeline = with_calibration_data(steps, args.calib_data)
    calibrated_on_data = pipeline != steps  # some pass was handed --calib-data
    pipeline = with_input_shapes(pipeline, args.shape)
    if args.deterministic:
        pipeline = without_timing(pipeline)
    shapes = parse_shape_overrides(args.shape)
    output = output_path(args)
    check_validation_only(args)
    if args.validate:
        check_synthesis_options(args, args.calib_data, "--calib-data")
    options = validation_options(args, args.validate) if args.validate else None
    check_report_paths(args, [args.input, output])
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    progress = StepProgress()
    start = time.perf_counter()
    model = io.load(args.input)
    if shapes:  # the passes that would read them may not run, or may run on --calib-data: a typo still stops here
        check_shape_overrides(model, shapes)
    validation_data, unscored = _validation_data(args.calib_data, model) if options is not None else (None, None)
    io.check_target(model, output, in_place=args.in_place, external_data=external)  # fail before a long pipeline, not after
    if external is False and not _lossy_steps(pipeline):  # lossy passes may shrink the weights: checked again after
        check_fits_one_file(model)
    before = io.stored_bytes(model) or 0
    result = _run_pipeline(args, model, pipeline, progress)
    check_result(result)
    lossy = _lossy_changes(pipeline, result.ledger.rows)
    if external is False:
        check_fits_one_file(result.model)
    # Before the save: with --in-place the input is still there to compare with.
    checked = None
    if lossy and options is None and not args.no_quick_check:
        checked = quick_check(
            args.input, result.model, lossy, shapes=args.shape, threads=args.threads, data=args.calib_data,
            output=None if args.in_place else output, original_bytes=before,
        )
    written = io.save(result.model, output, external_data=external, in_place=args.in_place)
    seconds = time.perf_counter() - start
    print(result.ledger.to_table())
    for row in result.ledger.rows:
        if row.details.get("summary"):
            print(f"{row.name}: {row.details['summary']}")
    after = io.stored_bytes(io.load(written)) or 0
    print(
        f"\nwrote {written} ({format_bytes(after)}, was {format_bytes(before)}) "
        f"in {seconds:.2f} s; {'changed' if result.modified else 'unchanged'}"
    )
    if args.ledger is not None:
        io.write_text_atomically(args.ledger, json.dumps(result.ledger.to_dicts(), indent=2, allow_nan=False) + "\n")
    if options is None:
        if checked is not None:
            print(checked)
        return EXIT_OK
    print()
    report = validate(args.input, written, validation_data, per_layer=args.per_layer, latency=args.latency, **options)
    report.ledger = result.ledger.to_dicts()
    if unscored is not None:
        report.data_source = str(args.calib_data)  # not the wrapper's type name
        report.warnings.append(unscored)
    if calibrated_on_data:
        report.warnings.append(_calibration_overlap(args))
    if not report.passed and args.bisect:
        report.bisection = bisect_pipeline(args.input, pipeline, lambda model: validate(args.input, model, validation_data, **options))
    return _finish_report(args, report)


class _Unlabelled:
    """The samples of a data path without their ``labels``; a fresh pass over the files each time it is iterated."""

    def __init__(self, path: os.PathLike[str]) -> None:
        self.path = path

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (without_labels(sample) for sample in load_feeds(self.path))


def _validation_data(path: os.PathLike[str] | None, model: ir.Model) -> tuple[Any, dict[str, Any] | None]:
    """What ``--validate`` reads, and a report warning when it leaves out the labels.

    validate refuses labels that no output of the model can score (class
    scores, [N, C] or [N, C, 1, 1] floats); optimize would then fail after
    writing its output, for labels the passes ignore. So they are dropped,
    with a warning, when the model's declared outputs rule class scores out.
    """
    if path is None or any(_may_hold_class_scores(value) for value in model.graph.outputs):
        return path, None
    first = next(load_feeds(path), {})
    if LABELS_KEY not in first:
        return path, None
    message = f"the labels in {path} are ignored: no output of the model holds class scores ([N, C] or [N, C, 1, 1]) to score them"
    return _Unlabelled(path), {"model": "reference", "kind": "labels_ignored", "items": [str(path)], "message": message}


def _may_hold_class_scores(value: ir.Value) -> bool:
    """Whether the output's declared type allows class scores as graphopt.task reads them; unknown dims allow them."""
    if value.type is None:
        return True
    if not isinstance(value.type, ir.TensorType) or value.dtype not in _SCORE_TYPES:
        return False
    if value.shape is None:
        return True
    return class_score_shape([dim if isinstance(dim, int) else None for dim in value.shape])


def _run_pipeline(args: argparse.Namespace, model: ir.Model, pipeline: list[PassSpec], progress: StepProgress) -> PipelineResult:
    """run_pipeline, with a failure of a pass that ran the model on inputs it synthesized told as such."""
    running = [0]

    def track(index: int, total: int, name: str) -> None:
        # run_pipeline may run steps of its own first (upgrade-ir on IR 3 models).
        running[0] = index - (total - len(pipeline))
        progress(index, total, name)

    try:
        return run_pipeline(model, pipeline, check_each_pass=args.check_each_pass, progress=track)
    except GraphoptError as exc:
        step = pipeline[running[0]] if 0 <= running[0] < len(pipeline) else None
        if step is None or isinstance(exc, PassCheckError) or not _synthesizes_inputs(step) or not _failed_on_feeds(exc):
            raise
        # A pass without a ``shapes`` option draws its inputs at default dims, whatever --shape says.
        if "shapes" in step.options:
            dims = "at the given --shape dims"
        elif "shapes" in pass_options(available_passes()[step.name]):
            dims = "at default dims; --shape NAME:DIMS sets them"
        else:
            dims = "at default dims; --shape does not reach this pass"
        raise GraphoptError(
            f"pass {step.name!r} could not run the model on the inputs it synthesized for itself ({dims}): "
            f"give it real inputs with --calib-data PATH ({first_line(exc)})"
        ) from exc


def _synthesizes_inputs(spec: PassSpec) -> bool:
    factory = available_passes().get(spec.name)
    return factory is not None and "data" in pass_options(factory) and spec.options.get("data") is None


def _failed_on_feeds(exc: GraphoptError) -> bool:
    return isinstance(exc, (DataError, ModelRunError))


def _lossy_steps(pipeline: list[PassSpec]) -> list[str]:
    factories = available_passes()
    return [spec.name for spec in pipeline if getattr(factories.get(spec.name), "lossy", False)]


def _lossy_changes(pipeline: list[PassSpec], rows: list[LedgerRow]) -> dict[str, str]:
    """The steps that changed the model with a pass whose class says ``lossy = True``, each with its ``fidelity_hint``.

    The hint is adapted to the options the step ran with (quick_check.hint_for_step).
    ``rows`` may start with steps run_pipeline added before the user's (upgrade-ir).
    """
    factories = available_passes()
    changed = [
        spec
        for spec, row in zip(pipeline, rows[len(rows) - len(pipeline) :])
        if row.modified and getattr(factories.get(spec.name), "lossy", False)
    ]
    return {
        spec.name: hint_for_step(
            getattr(factories[spec.name], "fidelity_hint", ""), resolved_options(factories[spec.name], spec.options)
        )
        for spec in changed
    }


def _calibration_overlap(args: argparse.Namespace) -> dict[str, object]:
    message = (
        f"validated on {args.calib_data}, the data the passes calibrated on: fitted passes look better on it than on new "
        f"inputs; for an unbiased figure run graphopt validate {args.input} {args.output or args.input} --data HELD_OUT"
    )
    return {"model": "candidate", "kind": "calibration_overlap", "items": [str(args.calib_data)], "message": message}


def _inspect(args: argparse.Namespace) -> int:
    summary = summarize(io.load(args.input))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return EXIT_OK


def _list_passes(args: argparse.Namespace) -> int:
    del args
    for name, factory in sorted(available_passes().items()):
        # The docstring's first paragraph: a summary wrapped over two lines was cut mid-list.
        summary = " ".join(line.strip() for line in (factory.__doc__ or "").strip().split("\n\n")[0].splitlines())
        scope = "subgraphs too" if getattr(factory, "visits_subgraphs", False) else "main graph only"
        print(f"{name:<20} {summary} [{scope}]")
        for option in pass_options(factory).values():
            kind = f": {option.annotation}" if option.annotation else ""
            print(f"{'':<22}{option.name}{kind} = {option.default!r}")
    return EXIT_OK

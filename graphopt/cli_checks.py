"""What ``graphopt optimize`` and ``validate`` check before reading a model: nothing is read, run or written for a command that would fail later.

Each check raises GraphoptError (one line, CLI exit code 2): an output that
is the input, validation options given to optimize without ``--validate``,
report paths that cannot be written, weights too large for one file, and,
before the save, a rewritten model that would not load back.
"""

from __future__ import annotations

__all__ = ["check_validation_only", "check_report_paths", "check_synthesis_options", "check_fits_one_file", "check_result", "output_path"]

import argparse
from pathlib import Path

import onnx_ir as ir

from graphopt import io, untrusted
from graphopt.errors import GraphoptError, first_line
from graphopt.pipeline import PipelineResult

# optimize options that only mean something with --validate.
_VALIDATION_ONLY = (
    "report", "report_md", "report_html", "per_layer", "latency", "atol", "rtol", "min_cosine", "min_snr",
    "samples", "seed", "exact", "tf32", "require_providers", "bisect",
)


def check_validation_only(args: argparse.Namespace) -> None:
    """optimize's validation options are refused without --validate rather than silently ignored."""
    if args.validate:
        return
    given = [f"--{name.replace('_', '-')}" for name in _VALIDATION_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise GraphoptError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --validate PROVIDERS (e.g. --validate cpu); "
            "without it optimize does not validate"
        )


def check_synthesis_options(args: argparse.Namespace, data: Path | None, flag: str) -> None:
    """--samples and --seed shape synthesized feeds: with real data they would be silently ignored, so they are refused."""
    given = [f"--{name}" for name in ("samples", "seed") if getattr(args, name, None) is not None]
    if data is not None and given:
        raise GraphoptError(
            f"{' and '.join(given)} {'shapes' if len(given) == 1 else 'shape'} synthesized samples; with {flag} every sample "
            f"in {data} is used (drop {' and '.join(given)}, or give data with fewer samples)"
        )


def check_report_paths(args: argparse.Namespace, models: list[Path]) -> None:
    """Report and ledger paths must be writable files, and none of the models: checked before any work."""
    for option in ("report", "report_md", "report_html", "ledger"):
        path = getattr(args, option, None)
        if path is None:
            continue
        flag = f"--{option.replace('_', '-')}"
        try:
            io.check_writable(path)
        except GraphoptError as exc:
            raise GraphoptError(f"{flag}: {exc}") from exc
        if any(io.same_file(path, model) for model in models):
            raise GraphoptError(f"{flag} {path} is one of the models; choose another file")


def check_fits_one_file(model: ir.Model) -> None:
    """io.check_fits_one_file, worded for ``--external-data no``."""
    try:
        io.check_fits_one_file(model, advice="use --external-data auto or yes")
    except GraphoptError as exc:
        raise GraphoptError(f"--external-data no: {exc}") from exc


def check_result(result: PipelineResult) -> None:
    """The rewritten model passes the structure checks io.load applies, so that a broken model is never written.

    Otherwise the saved file fails when read back, naming neither the pass
    nor the file, and replaces a previous output. untrusted.check_model also
    refuses a read of a value whose producing node a pass removed (in
    memory it still names that node). External data the result still reads
    lies in the input's folder.
    """
    source = io.source_path(result.model)
    try:
        untrusted.check_model(result.model, source.parent if source is not None else None)
    except GraphoptError as exc:
        changed = [row.name for row in result.ledger.rows if row.modified]
        after = f"pass {changed[-1]!r}, the last that changed it" if changed else "the pipeline"
        raise GraphoptError(
            f"the model is invalid after {after}, so nothing was written: {first_line(exc)} "
            "(--check-each-pass names the pass that broke it)"
        ) from exc


def output_path(args: argparse.Namespace) -> Path:
    """Where optimize writes: ``-o``, or the input itself with ``--in-place``.

    Files are compared by identity (another spelling, a symbolic or a hard
    link to the input all count as the input). In place, the real file behind
    a symbolic link is replaced, not the link.
    """
    same = args.output is not None and io.same_file(args.output, args.input)
    if not args.in_place:
        if args.output is None:
            raise GraphoptError("no output: give -o OUTPUT, or --in-place to replace the input")
        if same:
            raise GraphoptError(f"output {args.output} is the input file; choose another output path or pass --in-place")
        return args.output
    if args.output is not None and not same:
        raise GraphoptError("--in-place replaces the input; drop -o or give the input's path")
    if args.validate:
        raise GraphoptError("--in-place cannot be combined with --validate: the reference would be replaced; write to -o OUTPUT instead")
    return args.input.resolve()

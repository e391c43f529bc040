"""The ``graphopt`` command line: optimize, inspect, passes.

Exit codes: 0 ok; 1 a check failed (a pass produced an invalid model); 2 bad
input or usage, reported as one line on stderr. ``--debug`` adds tracebacks
and debug logging.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from graphopt import io
from graphopt.errors import GraphoptError, PassCheckError, first_line
from graphopt.ledger import format_bytes
from graphopt.pipeline import run_pipeline
from graphopt.progress import StepProgress
from graphopt.registry import available_passes, pass_options
from graphopt.summary import summarize

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PIPELINE = "lift-constants,dce,toposort"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns its exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except PassCheckError as exc:
        return _fail(args, exc, EXIT_CHECK_FAILED)
    except (GraphoptError, ir.passes.PreconditionError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    if args.debug:
        raise exc
    print(f"graphopt: error: {first_line(exc)}", file=sys.stderr)
    return code


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Rewrite and compress ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    optimize = commands.add_parser("optimize", help="run a pass pipeline and save the result")
    optimize.add_argument("input", type=Path, help="model to read (never modified)")
    optimize.add_argument("-o", "--output", type=Path, required=True, help="where to write the result")
    which = optimize.add_mutually_exclusive_group()
    which.add_argument("--passes", default=None, metavar="SPEC", help=f"pipeline spec (default: {DEFAULT_PIPELINE})")
    which.add_argument("--recipe", type=Path, metavar="FILE", help="YAML or JSON recipe file")
    optimize.add_argument("--check-each-pass", action="store_true", help="run onnx.checker and onnxruntime after every pass")
    optimize.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto", help="store weights in OUTPUT.data (default: as the input did, or when over 2 GB)")
    optimize.add_argument("--ledger", type=Path, metavar="FILE", help="also write the pass ledger as JSON")
    optimize.set_defaults(handler=_optimize)

    inspect = commands.add_parser("inspect", help="describe a model: ops, sizes, opsets, inputs, bad weights")
    inspect.add_argument("input", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=_inspect)

    listing = commands.add_parser("passes", help="list the available passes and their options")
    listing.set_defaults(handler=_list_passes)
    return parser


def _optimize(args: argparse.Namespace) -> int:
    pipeline: str | Path = args.recipe if args.recipe is not None else (args.passes or DEFAULT_PIPELINE)
    _refuse_same_file(args.input, args.output)
    progress = StepProgress()
    start = time.perf_counter()
    model = io.load(args.input)
    before = io.stored_bytes(model) or 0
    result = run_pipeline(model, pipeline, check_each_pass=args.check_each_pass, progress=progress)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    written = io.save(result.model, args.output, external_data=external)
    seconds = time.perf_counter() - start
    print(result.ledger.to_table())
    after = io.stored_bytes(io.load(written)) or 0
    print(
        f"\nwrote {written} ({format_bytes(after)}, was {format_bytes(before)}) "
        f"in {seconds:.2f} s; {'changed' if result.modified else 'unchanged'}"
    )
    if args.ledger is not None:
        args.ledger.write_text(json.dumps(result.ledger.to_dicts(), indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    summary = summarize(io.load(args.input))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return EXIT_OK


def _list_passes(args: argparse.Namespace) -> int:
    del args
    for name, factory in sorted(available_passes().items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        scope = "subgraphs too" if getattr(factory, "visits_subgraphs", False) else "main graph only"
        print(f"{name:<16} {doc[0] if doc else ''} [{scope}]")
        for option in pass_options(factory).values():
            kind = f": {option.annotation}" if option.annotation else ""
            print(f"{'':<18}{option.name}{kind} = {option.default!r}")
    return EXIT_OK


def _refuse_same_file(source: Path, target: Path) -> None:
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise GraphoptError(f"output {target} is the input file; choose another output path")


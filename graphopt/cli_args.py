"""The command line's arguments: one parser for every subcommand, and what the fidelity options mean.

Usage errors are one line, ``graphopt: error: ...`` with exit code 2, like
every other bad input (argparse's own are a usage block and a message).
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_CHECK_FAILED",
    "EXIT_USAGE",
    "DEFAULT_PIPELINE",
    "DEFAULT_SAMPLES",
    "Handler",
    "build_parser",
    "tolerance_of",
    "validation_options",
]

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from graphopt.errors import GraphoptError
from graphopt.metrics import Tolerance

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PIPELINE = "fold"
DEFAULT_SAMPLES = 8

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``graphopt: error: ...``, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"graphopt: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The parser of every subcommand; ``handlers`` maps each command name to the function that runs it."""
    parser = _Parser(prog="graphopt", description="Rewrite and compress ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    optimize = commands.add_parser("optimize", help="run a pass pipeline and save the result")
    optimize.add_argument("input", type=Path, help="model to read (not modified unless --in-place)")
    optimize.add_argument("-o", "--output", type=Path, help="where to write the result; never the input unless --in-place")
    optimize.add_argument("--in-place", action="store_true", help="replace the input (and its data file) atomically once the result is complete")
    which = optimize.add_mutually_exclusive_group()
    which.add_argument("--passes", default=None, metavar="SPEC", help=f"pipeline spec (default: {DEFAULT_PIPELINE})")
    which.add_argument("--recipe", type=Path, metavar="FILE", help="YAML or JSON recipe file")
    optimize.add_argument("--check-each-pass", action="store_true", help="run onnx.checker and onnxruntime after every pass")
    optimize.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto", help="store weights in OUTPUT.data (default: as the input did, or when over 2 GB)")
    optimize.add_argument("--ledger", type=Path, metavar="FILE", help="also write the pass ledger as JSON")
    optimize.add_argument("--calib-data", type=Path, metavar="PATH", help=".npz file or folder of .npz feed dicts (also used by --validate)")
    optimize.add_argument(
        "--deterministic", action="store_true",
        help="no decision from timings (check_speed=false in every pass): the same input, pipeline and data give the same bytes",
    )
    optimize.add_argument("--validate", metavar="PROVIDERS", help="validate the result against the input on these providers, e.g. cpu,cuda")
    optimize.add_argument("--bisect", action="store_true", help="with --validate: on failure, name the first pass that breaks the tolerance")
    optimize.add_argument(
        "--no-quick-check", action="store_true",
        help="without --validate, skip the output comparison on synthesized samples after lossy passes changed the model",
    )
    _add_fidelity_arguments(optimize)
    optimize.set_defaults(handler=handlers["optimize"])

    check = commands.add_parser("validate", help="compare a rewritten model against its original through onnxruntime")
    check.add_argument("reference", type=Path, help="the original model")
    check.add_argument("candidate", type=Path, help="the rewritten model")
    check.add_argument("--data", type=Path, metavar="PATH", help=".npz file or folder of .npz feed dicts (default: synthesized feeds)")
    check.add_argument("--providers", default="cpu", metavar="LIST", help="comma-separated: cpu, cuda (default: cpu)")
    _add_fidelity_arguments(check)
    check.set_defaults(handler=handlers["validate"])

    inspect = commands.add_parser("inspect", help="describe a model: ops, sizes, opsets, inputs, bad weights")
    inspect.add_argument("input", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=handlers["inspect"])

    listing = commands.add_parser("passes", help="list the available passes and their options")
    listing.set_defaults(handler=handlers["passes"])
    return parser


def _add_fidelity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fidelity")
    group.add_argument("--atol", type=float, help="absolute tolerance (default with --rtol: 1e-4 / 1e-3)")
    group.add_argument("--rtol", type=float, help="relative tolerance")
    group.add_argument("--min-cosine", type=float, help="pass when each output's cosine similarity is at least this")
    group.add_argument("--min-snr", type=float, metavar="DB", help="pass when each output's SNR is at least this many dB")
    group.add_argument("--samples", type=_int_at_least(1), help=f"synthesized samples when no data is given (default {DEFAULT_SAMPLES})")
    group.add_argument("--seed", type=_int_at_least(0), help="seed of synthesized samples (default 0)")
    group.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS", help="dynamic input shape, e.g. x:1x3x224x224 (repeatable)")
    group.add_argument("--per-layer", action="store_true", help="localize the first drifting intermediate tensors")
    group.add_argument("--latency", action="store_true", help="compare median CPU latency (interleaved runs)")
    group.add_argument("--exact", action="store_true", help="disable onnxruntime graph optimizations")
    group.add_argument("--tf32", action="store_true", help="let CUDA run float32 MatMul/Conv in TF32 (onnxruntime's default)")
    group.add_argument("--threads", type=_int_at_least(1), help="onnxruntime intra-op threads")
    group.add_argument("--require-providers", action="store_true", help="fail (exit 2) if a requested provider is unavailable")
    group.add_argument("--report", type=Path, metavar="FILE", help="write the fidelity report as JSON")
    group.add_argument("--report-md", type=Path, metavar="FILE", help="write the report as Markdown (plots with the plots extra)")
    group.add_argument("--report-html", type=Path, metavar="FILE", help="write the report as HTML (plots with the plots extra)")


def tolerance_of(args: argparse.Namespace) -> Tolerance:
    """The fidelity options as a Tolerance; impossible values are a one-line GraphoptError."""
    try:
        return Tolerance(atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine, min_snr_db=args.min_snr)
    except ValueError as exc:
        raise GraphoptError(str(exc)) from exc


def validation_options(args: argparse.Namespace, providers: str) -> dict[str, object]:
    """graphopt.validate's keyword arguments from the fidelity options."""
    return {
        "providers": [name.strip() for name in providers.split(",") if name.strip()],
        "tolerance": tolerance_of(args),
        "samples": DEFAULT_SAMPLES if args.samples is None else args.samples,
        "seed": 0 if args.seed is None else args.seed,
        "shapes": args.shape,
        "optimization": "none" if args.exact else "full",
        "tf32": args.tf32,
        "threads": args.threads,
        "require_providers": args.require_providers,
    }

"""Command line: ``python -m model_zoo list`` and ``python -m model_zoo save NAME DIR``."""

from __future__ import annotations

__all__ = ["main"]

import argparse
import sys
from collections.abc import Sequence

import model_zoo

_USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_zoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print every model name, one a line")
    save = commands.add_parser("save", help="build a model and write it to DIR/NAME.onnx")
    save.add_argument("name", metavar="NAME")
    save.add_argument("directory", metavar="DIR")
    save.add_argument("--seed", type=int, default=0, help="weight and feed seed (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(model_zoo.names()))
        return 0
    try:
        zoo_model = model_zoo.build(args.name, seed=args.seed)
    except ValueError as error:
        print(f"model_zoo: error: {error}", file=sys.stderr)
        return _USAGE_ERROR
    print(zoo_model.save(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

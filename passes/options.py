"""Checks of pass option values (prune, lowrank, qdq), so that a bad value fails when the pass is built.

Pipeline specs hand values over as parsed (bool, int, float, string or
list), and Python callers may pass anything. Unchecked, the string ``"no"``
is truthy and silently turned ``reconstruct`` on, ``ratio="abc"`` failed
with Python's "'<=' not supported between instances of 'int' and 'str'",
and ``threads=0`` failed deep in onnxruntime with a traceback. Each check
raises ValueError naming the option and returns the value to store.
"""

from __future__ import annotations

__all__ = [
    "check_bool", "check_int", "check_names", "check_number", "check_shapes", "check_threads", "is_int", "is_number", "unmatched_names",
]

import logging
import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

import onnx_ir as ir

from graphopt.data import parse_shape_overrides
from graphopt.errors import DataError, first_line
from graphopt.graphs import iter_graphs

logger = logging.getLogger(__name__)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False (never a string such as ``"no"``, which is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` if it is an integer of at least ``low``."""
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, interval: str) -> float:
    """``value`` if it is a finite number in ``interval``, written as in the message: ``[0, 1)``, ``(0, 1]``, ``(-inf, 1)``."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    if not is_number(value) or not (low <= value if interval[0] == "[" else low < value) or not (value <= high if interval[-1] == "]" else value < high):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_threads(value: Any) -> int | None:
    """``threads``: a positive integer, or None for onnxruntime's default."""
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"threads must be a positive integer or None (onnxruntime's default), got {value!r}")
    return None if value is None else int(value)


def check_shapes(value: Any) -> dict[str, tuple[int, ...]] | None:
    """``shapes``: ``NAME:DIMS`` strings (``["ids:2x9"]``, as ``--shape`` takes them) or a dict; None keeps default dims."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    try:
        return dict(value) if isinstance(value, dict) else parse_shape_overrides(list(value))
    except (DataError, TypeError, ValueError) as exc:
        raise ValueError(f"shapes must be NAME:DIMS items such as ids:2x9, got {value!r} ({first_line(exc)})") from exc


def check_names(name: str, value: Any) -> frozenset[str]:
    """Node names or op types: a comma-separated string, a list of strings, or None (none)."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(part, str) for part in value):
        parts = list(value)
    else:
        raise ValueError(f"{name} must be comma-separated node names or op types, got {value!r}")
    return frozenset(part.strip() for part in parts if part.strip())


def unmatched_names(pass_name: str, option: str, names: Collection[str], model: ir.Model, keywords: Collection[str] = ()) -> list[str]:
    """The entries of ``names`` that match no node name or op type in ``model``, logged as a warning.

    A typo in a skip or exclude list otherwise changes the result without a
    word. ``keywords`` (such as prune's ``default``) are not names.
    """
    present = {part for graph in iter_graphs(model) for node in graph for part in (node.name, node.op_type)}
    missing = sorted(name for name in names if name not in present and name not in keywords)
    if missing:
        logger.warning("%s: %s entries match no node name or op type: %s", pass_name, option, ", ".join(missing))
    return missing


def is_int(value: Any) -> bool:
    """An integer, bool excluded."""
    # bool is an int subclass: True must not pass for 1 (threads=true, samples=true).
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number, bool excluded."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)

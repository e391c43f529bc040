"""The pass ledger: one row per pass run, for the CLI table and the reports."""

from __future__ import annotations

__all__ = ["IN_SUMMARY", "LedgerRow", "Ledger", "format_bytes"]

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graphopt.metrics import json_float

# ``extra=`` for a pass's log warning that its ledger summary line also carries: the
# CLI prints that line, so it drops such records instead of saying the same twice;
# library callers, who may never print the summary, still get the warning.
IN_SUMMARY = {"graphopt_in_summary": True}


@dataclass(frozen=True)
class LedgerRow:
    """What one pass did to the model."""

    name: str
    options: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    modified: bool
    # What a lossy pass reports about its work (layers touched, float layers and why, ...).
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the schema is the field list above.

        Non-finite floats in the details (an SNR of an exact layer is inf)
        become the strings ``"inf"``, ``"-inf"``, ``"nan"`` (metrics.json_float), as in the
        fidelity report: strict JSON has no such numbers.
        """
        return _json_safe(asdict(self))


@dataclass
class Ledger:
    """Rows in run order."""

    rows: list[LedgerRow] = field(default_factory=list)

    def append(self, row: LedgerRow) -> None:
        self.rows.append(row)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.rows]

    def to_table(self) -> str:
        """A fixed-width table a person can read in a terminal."""
        header = ("pass", "changed", "nodes", "params", "time")
        lines = [header]
        for row in self.rows:
            lines.append(
                (
                    row.name,
                    "yes" if row.modified else "no",
                    f"{row.nodes_before} -> {row.nodes_after}",
                    f"{format_bytes(row.param_bytes_before)} -> {format_bytes(row.param_bytes_after)}",
                    f"{row.seconds * 1000:.1f} ms",
                )
            )
        widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
        rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        rendered.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(rendered)


def format_bytes(count: int) -> str:
    """Human-readable byte count with binary units: ``1.5 MiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, as a string.

    numpy scalars become Python numbers first: json cannot write them.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return json_float(value)

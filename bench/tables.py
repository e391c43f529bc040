"""One table printer for the bench scripts: Markdown (``--markdown``) or aligned plain text."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """The rows under the headers; numbers right-aligned in Markdown (all columns but the first)."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(text) for text in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [headers, *rows])

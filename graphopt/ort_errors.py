"""onnxruntime's error messages as one readable line, for reports and ``graphopt: error:`` lines."""

from __future__ import annotations

__all__ = ["ort_message", "one_line", "strip_prefix"]

import re

_ORT_ERROR_PREFIX = re.compile(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ")
# Session-creation errors can dump whole nodes; a report line stays readable.
_MESSAGE_LIMIT = 400


def ort_message(exc: BaseException) -> str:
    """The exception's message without onnxruntime's error-code prefix, on one line of at most 400 characters."""
    # All lines are kept, joined: onnxruntime often puts the useful part (which
    # dimension is wrong) on the second line.
    return one_line(strip_prefix(str(exc).strip()) or type(exc).__name__)


def strip_prefix(text: str) -> str:
    """``text`` without a leading ``[ONNXRuntimeError] : 10 : INVALID_GRAPH :``-style prefix."""
    return _ORT_ERROR_PREFIX.sub("", text)


def one_line(text: str) -> str:
    """The non-blank lines of ``text`` joined by spaces, cut to 400 characters."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return joined if len(joined) <= _MESSAGE_LIMIT else joined[: _MESSAGE_LIMIT - 3] + "..."

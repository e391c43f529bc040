"""Which onnxruntime execution providers can really run models in this process, and if not, why.

Asking onnxruntime for a provider that is missing or cannot start does not
fail: it warns and silently runs on CPU. :func:`resolve_providers`
therefore checks which provider a tiny session really got, and reports the
native loader's message (written to file descriptor 2, never raised) as the
reason.
"""

from __future__ import annotations

__all__ = ["PROVIDERS", "ProviderStatus", "resolve_providers"]

import contextlib
import dataclasses
import functools
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.errors import GraphoptError
from graphopt.ort_errors import one_line, ort_message, strip_prefix
from graphopt.support import probe_model

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_NOT_IN_BUILD = "{ort_name} is not in this onnxruntime build (install graphopt[cuda], i.e. onnxruntime-gpu)"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_NATIVE_LOG_LINE = re.compile(r"\[([EW]):onnxruntime:[^\]]*\]\s*(.*)")


@dataclasses.dataclass(frozen=True)
class ProviderStatus:
    """Whether one execution provider can run models in this process.

    Attributes:
        name: graphopt's name for it, a key of :data:`PROVIDERS`.
        ort_name: onnxruntime's name, e.g. ``CUDAExecutionProvider``.
        available: True when a session really runs on it.
        reason: Empty when available; otherwise one line saying why not.
    """

    name: str
    ort_name: str
    available: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_providers(names: Sequence[str]) -> list[ProviderStatus]:
    """Checks each named provider, in order; the probe runs once per process.

    Raises:
        GraphoptError: A name is not a key of :data:`PROVIDERS`.
    """
    for name in names:
        if name not in PROVIDERS:
            raise GraphoptError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}")
    return [_probe(name) for name in names]


@functools.cache
def _probe(name: str) -> ProviderStatus:
    ort_name = PROVIDERS[name]
    if ort_name not in ort.get_available_providers():
        return ProviderStatus(name, ort_name, False, _NOT_IN_BUILD.format(ort_name=ort_name))
    if name == "cpu":
        return ProviderStatus(name, ort_name, True)
    reason = _probe_session(ort_name)
    logger.debug("provider %s: %s", name, reason or "available")
    return ProviderStatus(name, ort_name, not reason, reason)


def _probe_session(ort_name: str) -> str:
    """Runs an Identity model on the provider alone; returns why it failed, or ''."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    with _native_stderr() as native, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            session = ort.InferenceSession(probe_model(), options, providers=[ort_name])
            used = session.get_providers()
            if ort_name in used:
                session.run(None, {"x": np.zeros(1, np.float32)})
        except Exception as exc:  # onnxruntime raises its own unrelated types
            return f"cannot start {ort_name}: {ort_message(exc)}"
    if ort_name in used:
        return ""
    detail = _native_reason("".join(native)) or next((one_line(str(w.message)) for w in caught), "")
    return f"{ort_name} could not start, so onnxruntime fell back to {', '.join(used)}" + (
        f": {detail}" if detail else " (no CUDA device, driver or CUDA/cuDNN libraries)"
    )


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collects what native code writes to fd 2 in the block (appended on exit).

    Only onnxruntime's C++ logger says why a provider library failed to load.
    """
    captured: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to borrow: run without capturing
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            captured.append(text)
            if text.strip():
                logger.debug("onnxruntime native log during provider probe:\n%s", text)


def _native_reason(text: str) -> str:
    """The first error (else warning) message of onnxruntime's native log, plus its requirement hint."""
    entries = [m.groups() for m in map(_NATIVE_LOG_LINE.search, _ANSI_ESCAPE.sub("", text).splitlines()) if m]
    messages = [msg for level, msg in entries if level == "E"] or [msg for _, msg in entries]
    if not messages:
        return ""
    reason = strip_prefix(messages[0]).strip()
    hints = [msg[msg.index("Require ") :].split(". ")[0] for _, msg in entries if "Require " in msg]
    return one_line(f"{reason} ({hints[0]})" if hints and hints[0] not in reason else reason)

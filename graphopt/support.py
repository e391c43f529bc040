"""What the installed onnxruntime cannot run, said in one line before or when a session fails.

onnxruntime has no API for the newest opset or IR version it accepts, but its
refusal of a too-new model names the limit: :func:`runtime_limits` reads it
once from tiny probe models (a few milliseconds, cached), :func:`check_supported`
refuses a model above it before any session opens, and
:func:`unsupported_reason` turns onnxruntime's session errors about unknown
ops, custom ops without kernels and too-new versions into one clear line.
"""

from __future__ import annotations

__all__ = ["RuntimeLimits", "runtime_limits", "check_supported", "unsupported_reason", "probe_model", "model_label"]

import dataclasses
import functools
import re

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt import io
from graphopt.errors import UnsupportedModelError

# What onnxruntime 1.20-1.32 says when a model needs more than it has (session creation).
_UNKNOWN_OP = re.compile(r'In Node, \("[^"]*", ([\w.]+), "([^"]*)".*No Op registered for \S+ with domain_version of (\d+)')
_UNREGISTERED_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_OPSET_TOO_NEW = re.compile(r"Opset (\d+) is under development.*official support for domain (\S+) is till opset (\d+)", re.S)
_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


@dataclasses.dataclass(frozen=True)
class RuntimeLimits:
    """The newest IR version and opsets (by domain, ``ai.onnx`` for the default) onnxruntime accepts.

    None or a missing domain: onnxruntime did not say, so nothing is checked up front.
    """

    version: str
    ir_version: int | None
    opsets: dict[str, int]


@functools.cache
def runtime_limits() -> RuntimeLimits:
    """Asks the installed onnxruntime for its limits: it refuses absurd versions naming the newest it supports."""
    absurd = 1 << 20
    ir_version = _refusal(probe_model(ir_version=absurd), _IR_TOO_NEW)
    opsets = {}
    for domain, imports in (("ai.onnx", f'"" : {absurd}'), ("ai.onnx.ml", f'"" : 13, "ai.onnx.ml" : {absurd}')):
        top = _refusal(probe_model(opsets=imports), _OPSET_TOO_NEW, group=3)
        if top is not None:
            opsets[domain] = top
    return RuntimeLimits(ort.__version__, ir_version, opsets)


def _refusal(model: bytes, pattern: re.Pattern[str], group: int = 2) -> int | None:
    try:
        ort.InferenceSession(model, _quiet_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unrelated types
        found = pattern.search(str(exc))
        return int(found.group(group)) if found else None
    return None


def check_supported(model: ir.Model, label: str | None = None) -> None:
    """Refuses, before any session opens, a model whose IR version or opset is newer than onnxruntime's.

    Raises:
        UnsupportedModelError: One line naming the version, the limit and onnxruntime's version.
    """
    limits, label = runtime_limits(), label or model_label(model)
    if limits.ir_version is not None and model.ir_version > limits.ir_version:
        reason = f"IR version {model.ir_version} is newer than onnxruntime {limits.version} supports (up to {limits.ir_version})"
        raise UnsupportedModelError(f"onnxruntime cannot open {label}: {reason}")
    for domain, version in model.opset_imports.items():
        name = "ai.onnx" if domain in ("", "ai.onnx") else domain
        top = limits.opsets.get(name)
        if top is not None and version > top:
            reason = f"opset {version} of domain {name} is newer than onnxruntime {limits.version} supports (up to opset {top})"
            raise UnsupportedModelError(f"onnxruntime cannot open {label}: {reason}")


def unsupported_reason(message: str) -> str | None:
    """One clear line when onnxruntime refused a model for an op or version it lacks, else None."""
    version = ort.__version__
    if found := _UNKNOWN_OP.search(message):
        op, domain, opset = found.groups()
        return f"op {op} (domain {domain or 'ai.onnx'}, opset {opset}) is unknown to onnxruntime {version}"
    if found := _UNREGISTERED_OP.search(message):
        domain, op = found.groups()
        return (
            f"custom op {op} of domain {domain or 'ai.onnx'} has no kernel in onnxruntime {version} "
            "(register the custom-op library that implements it)"
        )
    if found := _NO_KERNEL.search(message):
        op, opset, node = found.groups()
        return f"onnxruntime {version} has no kernel for {op} at opset {opset} with the input types of node {node!r}"
    if found := _OPSET_TOO_NEW.search(message):
        opset, domain, top = found.groups()
        return f"opset {opset} of domain {domain} is newer than onnxruntime {version} supports (up to opset {top})"
    if found := _IR_TOO_NEW.search(message):
        ir_version, top = found.groups()
        return f"IR version {ir_version} is newer than onnxruntime {version} supports (up to {top})"
    return None


def probe_model(ir_version: int = 8, opsets: str = '"" : 13') -> bytes:
    """A one-Identity model for probing what onnxruntime (or one of its providers) accepts."""
    text = f"<ir_version: {ir_version}, opset_import: [{opsets}]> probe (float[1] x) => (float[1] y) {{ y = Identity(x) }}"
    return onnx.parser.parse_model(text).SerializeToString()


def _quiet_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the refusal is expected; keep it off stderr
    return options


def model_label(model: ir.Model) -> str:
    """How messages name a model: its file name, else its graph's name."""
    source = io.source_path(model)
    return source.name if source else (f"model {model.graph.name!r}" if model.graph.name else "the in-memory model")

"""Looks up passes by name and describes their options.

The built-in table lives in ``passes/__init__.py``; third-party packages add
passes through the entry-point group ``graphopt.passes`` (name -> class or
factory). The core imports the ``passes`` package only here, lazily, so that
``graphopt`` never depends on a specific pass.
"""

from __future__ import annotations

__all__ = ["PassFactory", "OptionInfo", "available_passes", "pass_options", "resolved_options", "create_pass", "with_calibration_data", "without_timing"]

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.errors import PipelineSpecError
from graphopt.spec import PassSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt.passes"

# A pass class, or a function returning a pass (used for groups such as fold).
PassFactory = Callable[..., ir.passes.PassBase]


@dataclass(frozen=True)
class OptionInfo:
    """One keyword option of a pass."""

    name: str
    default: Any
    annotation: str


def available_passes() -> dict[str, PassFactory]:
    """Built-in passes plus those registered through entry points, by name."""
    from passes import BUILTIN_PASSES

    found: dict[str, PassFactory] = dict(BUILTIN_PASSES)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            logger.warning("entry point %s ignored: a pass named %r exists", entry.value, entry.name)
            continue
        try:
            found[entry.name] = entry.load()
        except Exception as exc:  # a broken plug-in must not break the built-ins
            logger.warning("cannot load pass %r from %s: %s", entry.name, entry.value, exc)
    return found


def pass_options(factory: PassFactory) -> dict[str, OptionInfo]:
    """The keyword options a pass accepts, with their defaults, in declared order."""
    signature = inspect.signature(factory)
    options = {}
    for param in signature.parameters.values():
        if param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            continue
        default = None if param.default is param.empty else param.default
        annotation = "" if param.annotation is param.empty else str(param.annotation)
        options[param.name] = OptionInfo(param.name, default, annotation.replace("typing.", ""))
    return options


def resolved_options(factory: PassFactory, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the given options: what the pass actually runs with."""
    resolved = {name: info.default for name, info in pass_options(factory).items()}
    resolved.update(given)
    return resolved


def create_pass(spec: PassSpec, passes: Mapping[str, PassFactory] | None = None) -> ir.passes.PassBase:
    """Instantiates the pass a spec names.

    Raises:
        PipelineSpecError: Unknown pass or option, or an option value the pass
            rejects; the message lists what is valid.
    """
    passes = available_passes() if passes is None else passes
    factory = passes.get(spec.name)
    if factory is None:
        raise PipelineSpecError(f"unknown pass {spec.name!r}; valid passes: {', '.join(sorted(passes))}")
    known = pass_options(factory)
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        valid = ", ".join(known) or "(none)"
        raise PipelineSpecError(f"pass {spec.name!r} has no option {unknown[0]!r}; valid options: {valid}")
    try:
        return factory(**spec.options)
    except (TypeError, ValueError) as exc:
        raise PipelineSpecError(f"pass {spec.name!r}: {exc}") from exc


def with_calibration_data(pipeline: list[PassSpec], data: Any) -> list[PassSpec]:
    """Hands ``data`` (a path, or feeds for the Python API) to every pass that takes a ``data`` option not set in the spec."""
    if data is None:
        return pipeline
    passes = available_passes()
    value = str(data) if isinstance(data, Path) else data
    return [
        PassSpec(spec.name, {**spec.options, "data": value})
        if spec.name in passes and "data" in pass_options(passes[spec.name]) and "data" not in spec.options
        else spec
        for spec in pipeline
    ]


def without_timing(pipeline: list[PassSpec]) -> list[PassSpec]:
    """Turns off ``check_speed`` in every pass that takes it, so no decision follows a measured timing.

    With timings out, the same input, pipeline, data and seed give
    byte-identical output (tests/graphopt/test_determinism.py).

    Raises:
        PipelineSpecError: A pass asks for ``check_speed=true`` explicitly.
    """
    passes = available_passes()
    steps = []
    for spec in pipeline:
        takes = spec.name in passes and "check_speed" in pass_options(passes[spec.name])
        if takes and spec.options.get("check_speed", False) is not False:
            raise PipelineSpecError(f"pass {spec.name!r}: check_speed=true times onnxruntime, which --deterministic rules out")
        steps.append(PassSpec(spec.name, {**spec.options, "check_speed": False}) if takes else spec)
    return steps

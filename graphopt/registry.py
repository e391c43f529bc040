"""Looks up passes by name and describes their options.

The built-in table lives in ``passes/__init__.py``; third-party packages add
passes through the entry-point group ``graphopt.passes`` (name -> class or
factory). The core imports the ``passes`` package only here, lazily, so that
``graphopt`` never depends on a specific pass.

Option values from spec strings and recipes are typed here, by each option's
annotation (or, without one, a bool default): a bool option takes true/false
or a synonym (:data:`BOOL_WORDS`), an int option an integer, a float option a
number; anything else is a :class:`PipelineSpecError` naming the pass, the
option and what it takes. Options annotated otherwise (str, Any, unions with
str) go to the pass as given, and the pass checks them.
"""

from __future__ import annotations

__all__ = [
    "PassFactory",
    "OptionInfo",
    "BOOL_WORDS",
    "available_passes",
    "is_builtin",
    "pass_options",
    "typed_options",
    "resolved_options",
    "create_pass",
    "checked_pipeline",
    "with_calibration_data",
    "with_input_shapes",
    "without_timing",
]

import inspect
import logging
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
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

# What a bool option accepts (case-insensitive), and what each word means.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_BOOL_HELP = "true or false (also yes/no, on/off, 1/0)"
_SCALARS = frozenset({"bool", "int", "float", "None"})


@dataclass(frozen=True)
class OptionInfo:
    """One keyword option of a pass."""

    name: str
    default: Any
    annotation: str


def available_passes() -> dict[str, PassFactory]:
    """Built-in passes plus those registered through entry points, by name.

    A fresh dict on every call (callers may change it). Entry points are read
    each time, but a broken or clashing one is warned about once per process:
    one command calls this from several places.
    """
    from passes import BUILTIN_PASSES

    found: dict[str, PassFactory] = dict(BUILTIN_PASSES)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            _warn_once(entry, "entry point %s ignored: a pass named %r exists", entry.value, entry.name)
            continue
        try:
            loaded = entry.load()
        except Exception as exc:  # a broken plug-in must not break the built-ins
            _warn_once(entry, "cannot load pass %r from %s: %s", entry.name, entry.value, exc)
            continue
        problem = _not_a_pass_factory(loaded)
        if problem:
            _warn_once(entry, "entry point %s = %s ignored: %s", entry.name, entry.value, problem)
            continue
        found[entry.name] = loaded
    return found


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of graphopt's own passes (not a plug-in's)."""
    from passes import BUILTIN_PASSES

    return name in BUILTIN_PASSES


# Entry points (name, value) already warned about, so each warning shows once per process.
_warned: set[tuple[str, str]] = set()


def _warn_once(entry: metadata.EntryPoint, message: str, *args: Any) -> None:
    key = (entry.name, entry.value)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def _not_a_pass_factory(loaded: Any) -> str:
    """Why an entry point's object cannot make passes, or "" when it can.

    A class must be an onnx_ir pass; a function is a factory, whose result
    create_pass checks.
    """
    if isinstance(loaded, type):
        is_pass = issubclass(loaded, ir.passes.PassBase)
        return "" if is_pass else f"class {loaded.__name__} is not an onnx_ir pass (PassBase)"
    return "" if callable(loaded) else f"{loaded!r:.40} ({type(loaded).__name__}) is neither a pass class nor a factory function"


def pass_options(factory: PassFactory) -> dict[str, OptionInfo]:
    """The keyword options a pass accepts, with their defaults, in declared order."""
    signature = inspect.signature(factory)
    options = {}
    for param in signature.parameters.values():
        if param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            continue
        default = None if param.default is param.empty else param.default
        options[param.name] = OptionInfo(param.name, default, _annotation_text(param.annotation, param.empty))
    return options


def typed_options(name: str, factory: PassFactory, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with each bool, int and float option checked and converted (``"no"`` -> False, ``"3"`` -> 3).

    Options the pass does not declare, and those of other types, are left as
    given.

    Raises:
        PipelineSpecError: A value does not fit its option's type; the message
            names the pass, the option and the values it takes.
    """
    known = pass_options(factory)
    return {key: _typed(name, known[key], value) if key in known else value for key, value in given.items()}


def resolved_options(factory: PassFactory, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the given options, typed: what the pass actually runs with."""
    resolved = {name: info.default for name, info in pass_options(factory).items()}
    resolved.update(typed_options(getattr(factory, "__name__", "pass"), factory, given))
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
    options = typed_options(spec.name, factory, spec.options)
    try:
        pass_ = factory(**options)
    except (TypeError, ValueError) as exc:
        raise PipelineSpecError(f"pass {spec.name!r}: {exc}") from exc
    if not isinstance(pass_, ir.passes.PassBase):  # a plug-in's factory returned something else
        kind = type(pass_).__name__
        raise PipelineSpecError(f"pass {spec.name!r}: its factory returned a {kind}, not an onnx_ir pass")
    return pass_


def checked_pipeline(pipeline: list[PassSpec], passes: Mapping[str, PassFactory] | None = None) -> list[PassSpec]:
    """The pipeline with typed option values, once every step was checked by building its pass.

    Cheap (a pass's options are checked in its ``__init__``), so the command
    line calls it before loading the model: a bad option fails first.

    Raises:
        PipelineSpecError: As :func:`create_pass`.
    """
    passes = available_passes() if passes is None else passes
    for spec in pipeline:
        create_pass(spec, passes)
    return [PassSpec(spec.name, typed_options(spec.name, passes[spec.name], spec.options)) for spec in pipeline]


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


def with_input_shapes(pipeline: list[PassSpec], shapes: Sequence[str]) -> list[PassSpec]:
    """Hands ``shapes`` (``--shape``'s ``NAME:DIMS`` strings) to every pass that takes a ``shapes`` option not set in the spec.

    A pass that synthesizes its own inputs draws them at these dims, as
    validation does; one without the option draws them at default dims.
    """
    if not shapes:
        return pipeline
    passes = available_passes()
    return [
        PassSpec(spec.name, {**spec.options, "shapes": list(shapes)})
        if spec.name in passes and "shapes" in pass_options(passes[spec.name]) and "shapes" not in spec.options
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
        given = typed_options(spec.name, passes[spec.name], spec.options) if takes else spec.options
        if takes and given.get("check_speed", False) is not False:
            raise PipelineSpecError(f"pass {spec.name!r}: check_speed=true times onnxruntime, which --deterministic rules out")
        steps.append(PassSpec(spec.name, {**spec.options, "check_speed": False}) if takes else spec)
    return steps


def _annotation_text(annotation: Any, empty: Any) -> str:
    if annotation is empty:
        return ""
    if isinstance(annotation, type):  # a module without ``from __future__ import annotations``
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _scalar_kinds(info: OptionInfo) -> frozenset[str] | None:
    """The scalar types an option takes (``{"int", "None"}`` for ``int | None``), or None when it is not purely scalar."""
    if not info.annotation:
        return frozenset({"bool"}) if isinstance(info.default, bool) else None
    text = info.annotation.replace(" ", "")
    optional = re.fullmatch(r"Optional\[(.*)\]", text)
    if optional:
        text = f"{optional.group(1)}|None"
    union = re.fullmatch(r"Union\[(.*)\]", text)
    if union:
        text = union.group(1).replace(",", "|")
    kinds = frozenset(text.split("|"))
    return kinds if kinds <= _SCALARS else None


def _typed(name: str, info: OptionInfo, value: Any) -> Any:
    kinds = _scalar_kinds(info)
    if kinds is None:
        return value
    if value is None and "None" in kinds:
        return None
    numeric = kinds & {"int", "float"}
    if "bool" in kinds:
        if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool too
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        if not numeric and isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
    if numeric and not isinstance(value, bool):
        if isinstance(value, numbers.Integral) or ("float" in kinds and isinstance(value, numbers.Real)):
            return value
        if isinstance(value, str):  # a quoted number, or a recipe's string
            for convert in [convert for kind, convert in (("int", int), ("float", float)) if kind in kinds]:
                try:
                    return convert(value)
                except ValueError:
                    continue
    raise PipelineSpecError(f"pass {name!r}: option {info.name} got {value!r}; it takes {_takes(kinds)}")


def _takes(kinds: frozenset[str]) -> str:
    parts = []
    if "bool" in kinds:
        parts.append(_BOOL_HELP)
    if "float" in kinds:
        parts.append("a number")
    elif "int" in kinds:
        parts.append("an integer")
    if "None" in kinds:
        parts.append("none")
    return ", or ".join(parts)

"""Pipeline specs: ``fold,qdq(calibration=entropy)`` strings and recipe files.

Grammar of a spec string::

    pipeline := step ("," step)*
    step     := NAME [ "(" [ option ("," option)* ] ")" ]
    option   := KEY "=" value
    value    := "'" text "'" | '"' text '"' | "[" [value ("," value)*] "]" | bare

A bare value parses as bool (``true``/``false``), int, float, ``none``, or
else a string. The pass's option then decides (graphopt.registry, before the
pass is built): a bool option takes ``true``/``false`` and, meaning the same,
``yes``/``no``, ``on``/``off``, ``1``/``0`` (any case, as YAML reads them);
an int option an integer, a float option a number (a quoted number too).
Any other value is a usage error naming the pass, the option and what it
takes: ``prune(reconstruct=maybe)`` or ``prune(ratio=abc)`` never reach the
pass. A recipe file (YAML or JSON) holds the same list::

    - pass: prune
      options: {pattern: channel, ratio: 0.3}
    - dce
"""

from __future__ import annotations

__all__ = ["PassSpec", "parse_spec", "load_recipe", "parse_value"]

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import PipelineSpecError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True)
class PassSpec:
    """One step of a pipeline: a registered pass name and the options given to it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{key}={_format_value(value)}" for key, value in self.options.items())
        return f"{self.name}({inner})"


def parse_spec(text: str) -> list[PassSpec]:
    """Parses a comma-separated spec string into pass specs.

    Raises:
        PipelineSpecError: The text is empty or malformed.
    """
    steps = [part.strip() for part in _split_top_level(text, ",")]
    if not any(steps):
        raise PipelineSpecError("empty pipeline spec: name at least one pass, e.g. 'dce'")
    return [_parse_step(step) for step in steps]


def load_recipe(path: str | Path) -> list[PassSpec]:
    """Reads a YAML or JSON recipe file into pass specs.

    The file holds a list of steps, or a mapping whose ``pipeline`` key (its
    only key) holds one. A step is a pass name or ``{pass: NAME, options: {...}}``.

    Raises:
        PipelineSpecError: The file is missing, unparsable or malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineSpecError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    data = _parse_recipe_text(text, path)
    if isinstance(data, dict):
        # As in a step: a misspelt or unsupported key is refused, not ignored.
        unknown = sorted(set(data) - {"pipeline"}, key=str)
        if unknown:
            raise PipelineSpecError(f"recipe {path}: unknown top-level keys {unknown}; allowed: pipeline")
        data = data.get("pipeline")
    if not isinstance(data, list) or not data:
        raise PipelineSpecError(f"recipe {path}: expected a non-empty list of passes")
    return [_recipe_step(item, path, index) for index, item in enumerate(data, start=1)]


def parse_value(text: str) -> Any:
    """Parses one option value: quoted string, list, bool, int, float, none or string."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item) for item in _split_top_level(inner, ",")] if inner else []
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_step(step: str) -> PassSpec:
    if not step:
        raise PipelineSpecError("empty step in pipeline spec (two commas in a row?)")
    name, paren, rest = step.partition("(")
    name = name.strip()
    if not _NAME.match(name):
        raise PipelineSpecError(f"bad pass name {name!r} in step {step!r}")
    if not paren:
        return PassSpec(name)
    if not rest.endswith(")"):
        raise PipelineSpecError(f"missing ')' in step {step!r}")
    options: dict[str, Any] = {}
    body = rest[:-1].strip()
    for item in _split_top_level(body, ",") if body else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _NAME.match(key):
            raise PipelineSpecError(f"option {item.strip()!r} in step {step!r} is not key=value")
        if key in options:
            raise PipelineSpecError(f"option {key!r} given twice in step {step!r}")
        options[key] = parse_value(value)
    return PassSpec(name, options)


def _split_top_level(text: str, separator: str) -> list[str]:
    """Splits at ``separator`` outside parentheses, brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                raise PipelineSpecError(f"unbalanced {char!r} in {text!r}")
        elif char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth or quote:
        raise PipelineSpecError(f"unclosed bracket or quote in {text!r}")
    parts.append(text[start:])
    return parts


def _parse_recipe_text(text: str, path: Path) -> Any:
    # Both parsers keep the last of two equal keys; the spec string refuses them
    # ("given twice"), and so do recipes, so that sparsity: 0.5 then 0.9 is not a guess.
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        import yaml  # JSON is valid YAML, so YAML parses both

        return yaml.load(text, Loader=_unique_key_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except PipelineSpecError as exc:
        raise PipelineSpecError(f"cannot parse recipe {path}: {exc}") from exc
    except Exception as exc:  # json and yaml raise different types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineSpecError(f"cannot parse recipe {path}: {first}") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise PipelineSpecError(f"key {twice!r} given twice")
    return dict(pairs)


def _unique_key_loader(yaml: Any) -> type:
    """yaml's SafeLoader, refusing a mapping that names a key twice."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            twice = next((key for key in keys if keys.count(key) > 1), None)
            if twice is not None:
                raise PipelineSpecError(f"key {twice!r} given twice (line {node.start_mark.line + 1})")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _recipe_step(item: Any, path: Path, index: int) -> PassSpec:
    where = f"recipe {path}, step {index}"
    if isinstance(item, str):
        return _parse_step(item.strip())
    if not isinstance(item, dict) or "pass" not in item:
        raise PipelineSpecError(f"{where}: expected a pass name or a mapping with 'pass'")
    unknown = sorted(set(item) - {"pass", "options"}, key=str)
    if unknown:
        raise PipelineSpecError(f"{where}: unknown keys {unknown}; allowed: pass, options")
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise PipelineSpecError(f"{where}: 'options' must be a mapping")
    if not isinstance(item["pass"], str):  # YAML reads "pass:" alone as null, and str(None) named a pass 'None'
        raise PipelineSpecError(f"{where}: 'pass' must be a pass name, got {item['pass']!r}")
    name = item["pass"]
    if not _NAME.match(name):
        raise PipelineSpecError(f"{where}: bad pass name {name!r}")
    return PassSpec(name, {str(key): value for key, value in options.items()})


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(item) for item in value) + "]"
    if isinstance(value, str) and (parse_value(value) != value or any(c in value for c in ",()[]")):
        return repr(value)
    return str(value)

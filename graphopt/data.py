"""Feeds for validation and calibration: synthesized from the input signature, or read from files.

Everything streams: feeds come out of generators one sample at a time and
``.npz`` files are opened one at a time, so memory does not grow with the
number of samples.

Synthesized feeds (no ``--data``):

- Shapes: a ``--shape name:1x3x224x224`` override wins. Otherwise a dynamic
  dim whose symbolic name contains ``seq``, ``len``, ``time`` or ``token``
  (any case) becomes :data:`DEFAULT_SEQUENCE_DIM` (16); every other dynamic
  dim (batch, unnamed) becomes :data:`DEFAULT_DIM` (1).
- Floats (float16, bfloat16 and float8 included): standard normal draws cast
  to the input's dtype. Bools: fair coin flips. Strings: unsupported.
- Integers: uniform in ``[low, high)`` from :func:`integer_input_ranges`, so
  token ids stay below the size of the embedding table they index.
- One ``np.random.default_rng(seed)`` draws the samples in order (inputs in
  graph order), so sample ``i`` does not depend on how many are asked for.

Real data: a folder of ``.npz`` files read in file name order (zero-pad
numbers so ``2.npz`` comes before ``10.npz``), one ``.npz`` file, any iterable
of feed dicts, or an onnxruntime ``CalibrationDataReader``. Error messages
count samples from 0.
"""

from __future__ import annotations

__all__ = [
    "Feeds", "InputSpec", "DEFAULT_DIM", "DEFAULT_SEQUENCE_DIM", "DEFAULT_INTEGER_RANGE", "LABELS_KEY", "input_specs",
    "parse_shape_overrides", "check_shape_overrides", "resolve_shape", "integer_input_ranges", "synthesize_feeds",
    "load_feeds", "feed_stream", "without_labels",
]

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError, first_line

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Dim = int | str | None

# Documented defaults for dynamic dimensions of synthesized feeds.
DEFAULT_DIM = 1
DEFAULT_SEQUENCE_DIM = 16
_SEQUENCE_HINTS = ("seq", "len", "time", "token")
# [low, high) for integer inputs that index no table: valid for masks and token types.
DEFAULT_INTEGER_RANGE = (0, 2)
# A key that data files may carry beside the inputs; it is dropped before feeding.
LABELS_KEY = "labels"

# Ops that carry index values unchanged (input 0 -> output 0) on their way to a Gather.
_INDEX_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class InputSpec:
    """One real graph input.

    Attributes:
        name: The input's name.
        dtype: numpy dtype of its ONNX element type (ml_dtypes types for bfloat16, float8, int4).
        shape: None when the rank is unknown; otherwise one entry per dimension:
            an int (static), a str (symbolic) or None (unknown).
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs a caller must feed, in graph order.

    Inputs that are also initializers are skipped: they have a default value.

    Raises:
        DataError: An input has no element type.
    """
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.dtype is None:
            raise DataError(f"input '{value.name}' has no element type in the model")
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else d.value for d in value.shape)
        specs.append(InputSpec(value.name or "", np.dtype(value.dtype.numpy()), shape))
    return specs


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parses ``name:1x3x224x224`` items into ``{"name": (1, 3, 224, 224)}``.

    The name ends at the last colon, so names such as ``input:0`` work.

    Raises:
        DataError: An item is malformed or names an input twice.
    """
    overrides: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.strip().rpartition(":")
        parts = dims.lower().split("x")
        if not sep or not name or not all(re.fullmatch(r"\s*[0-9]+\s*", p) for p in parts):
            raise DataError(f"bad shape {item!r}: expected name:DIMxDIM..., e.g. x:1x3x224x224")
        if name in overrides:
            raise DataError(f"shape for input '{name}' is given twice")
        overrides[name] = tuple(int(p) for p in parts)
    return overrides


def resolve_shape(spec: InputSpec, overrides: Mapping[str, Sequence[int]] | None = None) -> tuple[int, ...]:
    """The concrete shape to synthesize for one input.

    Raises:
        DataError: The override disagrees with the model's rank or static
            dims, or the rank is unknown and there is no override.
    """
    override = (overrides or {}).get(spec.name)
    if override is not None:
        return _checked_override(spec, tuple(int(d) for d in override))
    if spec.shape is None:
        raise DataError(f"input '{spec.name}' has unknown rank; pass --shape {spec.name}:...")
    return tuple(d if isinstance(d, int) else _default_dim(d) for d in spec.shape)


def check_shape_overrides(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuses shape overrides that name no input of ``model`` or disagree with its rank or static dims.

    Raises:
        DataError: The first override that does not fit, as synthesize_feeds would refuse it.
    """
    specs = input_specs(model)
    _refuse_unknown_overrides(specs, shapes)
    for spec in specs:
        if spec.name in shapes:
            resolve_shape(spec, shapes)


def integer_input_ranges(model: ir.Model) -> dict[str, tuple[int, int]]:
    """``[low, high)`` for every integer graph input.

    An input that reaches the indices (input 1) of a ``Gather`` on a constant
    table, directly or through Cast/Reshape/Unsqueeze/Squeeze/Flatten/Identity,
    gets ``[0, rows)`` where ``rows`` is the table's size along the Gather's
    ``axis``; the smallest table wins when there are several. Any other
    integer input gets :data:`DEFAULT_INTEGER_RANGE`.
    """
    ranges = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.dtype is None or not value.dtype.is_integer():
            continue
        rows = _smallest_gathered_table(value)
        ranges[value.name or ""] = DEFAULT_INTEGER_RANGE if rows is None else (0, rows)
    return ranges


def synthesize_feeds(
    model: ir.Model, *, count: int, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None
) -> Iterator[Feeds]:
    """Yields ``count`` random feed dicts that fit the model's inputs.

    Shapes, dtypes and errors are checked before the first sample is drawn.

    Raises:
        ValueError: ``count`` or ``seed`` is negative.
        DataError: A shape override names no input or disagrees with the
            model, a rank is unknown, or an input is a string tensor.
    """
    if count < 0 or seed < 0:
        raise ValueError(f"count and seed must be non-negative, got count={count}, seed={seed}")
    specs = input_specs(model)
    _refuse_unknown_overrides(specs, shapes or {})
    for value in model.graph.inputs:
        # A sequence or optional input has its element's dtype and a shape, so it
        # was drawn as a plain tensor that onnxruntime then refused with a cryptic type code.
        if not value.is_initializer() and value.type is not None and not isinstance(value.type, ir.TensorType):
            raise DataError(f"input '{value.name}' is a {value.type}, not a tensor: graphopt can only feed tensors")
    for spec in specs:
        if _element_type(spec.dtype) in (ir.DataType.STRING, None):
            raise DataError(f"input '{spec.name}' has dtype {spec.dtype}: cannot synthesize it; pass --data")
    ranges = integer_input_ranges(model)
    return _draw([(spec, resolve_shape(spec, shapes), ranges.get(spec.name)) for spec in specs], count, seed)


def load_feeds(source: Any, *, model: ir.Model | None = None, keep_labels: bool = False) -> Iterator[Feeds]:
    """Yields the feed dicts held by ``source``, one at a time.

    Args:
        source: A folder of ``.npz`` files (each one feed dict, read in file
            name order), a single ``.npz`` file, one feed dict, any iterable
            of feed dicts, or an object with ``get_next()`` that returns a
            dict or None (onnxruntime's ``CalibrationDataReader``).
        model: When given, each sample is checked against its inputs: the
            ``labels`` key is dropped, dtypes of the same kind are cast when
            every value survives (floats may round, not overflow), and
            static dims must match. Without it the
            dicts pass through as they are (values as numpy arrays).
        keep_labels: Keep a ``labels`` array in the samples (for task
            metrics); the caller removes it before feeding.

    Raises:
        DataError: The path is missing or neither a regular file nor a
            folder (a FIFO would block), the folder holds no ``.npz`` file, a
            file cannot be read, or (with ``model``) a sample does not fit.
            Path errors are raised at the call, sample errors as they are read.
    """
    samples = _raw_samples(source)
    if model is None:
        return ({k: np.asarray(v) for k, v in sample.items()} for _, sample in samples)
    specs = {spec.name: spec for spec in input_specs(model)}
    accepted = [value.name or "" for value in model.graph.inputs]
    return (_fit_sample(sample, label, specs, accepted, keep_labels) for label, sample in samples)


def feed_stream(
    model: ir.Model,
    data: Any = None,
    *,
    count: int = 8,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    keep_labels: bool = False,
) -> Iterator[Feeds]:
    """Real feeds from ``data`` when given (``count``, ``seed``, ``shapes`` unused), else synthesized ones."""
    if data is None:
        return synthesize_feeds(model, count=count, seed=seed, shapes=shapes)
    return load_feeds(data, model=model, keep_labels=keep_labels)


def _default_dim(dim: str | None) -> int:
    name = (dim or "").lower()
    return DEFAULT_SEQUENCE_DIM if any(hint in name for hint in _SEQUENCE_HINTS) else DEFAULT_DIM


def _format_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    text = ", ".join("?" if d is None else str(d) for d in shape)
    return f"({text},)" if len(shape) == 1 else f"({text})"


def _fits(shape: tuple[int, ...], declared: tuple[Dim, ...] | None) -> bool:
    """Whether a concrete shape has the declared rank and static dims (anything fits an unknown rank)."""
    if declared is None:
        return True
    return len(shape) == len(declared) and all(not isinstance(d, int) or d == n for d, n in zip(declared, shape))


def without_labels(sample: Mapping[str, Any]) -> Feeds:
    """``sample`` without its ``labels`` array: the inputs alone, for a caller that scores no task."""
    return {name: array for name, array in sample.items() if name != LABELS_KEY}


def _refuse_unknown_overrides(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> None:
    unknown = sorted(set(shapes) - {spec.name for spec in specs})
    if unknown:
        names = ", ".join(spec.name for spec in specs)
        raise DataError(f"shape given for unknown input '{unknown[0]}'; the model's inputs are: {names}")


def _checked_override(spec: InputSpec, override: tuple[int, ...]) -> tuple[int, ...]:
    if any(d < 0 for d in override) or not _fits(override, spec.shape):
        raise DataError(
            f"shape {_format_shape(override)} given for input '{spec.name}' does not fit "
            f"the model's {_format_shape(spec.shape)} (rank and static dims must match)"
        )
    return override


def _smallest_gathered_table(value: ir.Value) -> int | None:
    """Rows of the smallest constant table that ``value`` indexes, following pass-through ops."""
    rows: list[int] = []
    seen: set[ir.Value] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for usage in current.uses():
            node = usage.node
            if node.domain not in _ONNX_DOMAINS:
                continue
            if node.op_type in _INDEX_PASS_THROUGH and usage.idx == 0 and node.outputs:
                pending.append(node.outputs[0])
            elif node.op_type == "Gather" and usage.idx == 1:
                size = _gather_table_rows(node)
                if size is not None:
                    rows.append(size)
    return min(rows) if rows else None


def _gather_table_rows(node: ir.Node) -> int | None:
    shape = _constant_shape(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if not shape:
        logger.debug("Gather %r: table is not a constant with known shape; no index range from it", node.name)
        return None
    axis = node.attributes.get_int("axis", 0)
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape) or shape[axis] < 1:
        return None
    return int(shape[axis])


def _constant_shape(value: ir.Value) -> tuple[int, ...] | None:
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and producer.domain in _ONNX_DOMAINS:
        tensor = producer.attributes.get_tensor("value", None)
    return None if tensor is None else tuple(tensor.shape.numpy())


def _element_type(dtype: np.dtype) -> ir.DataType | None:
    try:
        return ir.DataType.from_numpy(dtype)
    except (TypeError, ValueError):
        return None


def _draw(plan: list[tuple[InputSpec, tuple[int, ...], tuple[int, int] | None]], count: int, seed: int) -> Iterator[Feeds]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {spec.name: _random_array(rng, spec.dtype, shape, bounds) for spec, shape, bounds in plan}


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...], bounds: tuple[int, int] | None) -> np.ndarray:
    element = _element_type(dtype)
    assert element is not None  # synthesize_feeds rejected the rest
    if element == ir.DataType.BOOL:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if element.is_integer():
        low, high = _clip_to_dtype(bounds or DEFAULT_INTEGER_RANGE, dtype)
        return rng.integers(low, high, size=shape, dtype=np.int64).astype(dtype)
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _clip_to_dtype(bounds: tuple[int, int], dtype: np.dtype) -> tuple[int, int]:
    # An int8 input indexing a 1000-row table can only reach 127.
    if np.dtype(dtype).kind == "V":  # int4, uint4, int2, uint2 come from ml_dtypes
        import ml_dtypes

        info = ml_dtypes.iinfo(dtype)
    else:
        info = np.iinfo(dtype)
    low = max(bounds[0], int(info.min))
    return low, max(low + 1, min(bounds[1], int(info.max) + 1))


def _raw_samples(source: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(label, dict) pairs; path problems raise here, at the call."""
    if isinstance(source, (str, os.PathLike)):
        files = _npz_files(Path(source))
        return ((f"sample {i} ({path.name})", _read_npz(path)) for i, path in enumerate(files))
    if callable(getattr(source, "get_next", None)):
        return _labelled(iter(source.get_next, None))
    if isinstance(source, Mapping):
        return _labelled([source])
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        return _labelled(source)
    raise DataError(
        f"cannot read feeds from a {type(source).__name__}: expected a .npz file or folder, "
        "an iterable of dicts, or a CalibrationDataReader"
    )


def _npz_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"no such data file or folder: {path}")
    if not path.is_dir():
        # np.load on a FIFO blocks until a writer comes, and a device may never end.
        if not path.is_file():
            raise DataError(f"{path}: not a regular file or folder (a FIFO or device?): give an .npz file or a folder")
        return [path]
    files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".npz" and p.is_file()), key=lambda p: p.name)
    if not files:
        raise DataError(f"{path}: the folder holds no .npz files")
    return files


def _read_npz(path: Path) -> Feeds:
    # np.load reads anything that is not a zip or .npy as a pickle, and refusing
    # that says "pickled (object) data": a text file would be blamed for pickling.
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        # Untrusted files: pickled (object) arrays are refused, not unpickled.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive of named arrays (a single .npy array?)")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({first_line(exc)})") from exc


def _labelled(samples: Iterable[Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise DataError(f"sample {index}: expected a dict of input name -> array, got a {type(sample).__name__}")
        yield f"sample {index}", sample


def _fit_sample(sample: Mapping[str, Any], label: str, specs: dict[str, InputSpec], accepted: list[str], keep_labels: bool = False) -> Feeds:
    """Checks one sample against the model's inputs and casts safe dtype differences."""
    missing = [name for name in specs if name not in sample]
    unknown = [key for key in sample if key != LABELS_KEY and key not in accepted]
    # A misspelt key shows up as both; naming both, with the valid names, points at the typo.
    problems = [f"missing input '{missing[0]}'"] if missing else []
    if unknown:
        problems.append(f"unknown input '{unknown[0]}'; the model's inputs are: {', '.join(accepted)}")
    if problems:
        raise DataError(f"{label}: {'; '.join(problems)}")
    arrays = {key: np.asarray(value) for key, value in sample.items() if key != LABELS_KEY or keep_labels}
    return {key: _fit_array(array, specs[key], label) if key in specs else array for key, array in arrays.items()}


def _fit_array(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    if _raw_bytes(array.dtype) and spec.dtype.kind != "O" and array.dtype.itemsize == spec.dtype.itemsize:
        # np.savez stores ml_dtypes arrays (bfloat16, float8) as raw bytes ('|V2', '|V1'),
        # or in a form np.load refuses (float8_e5m2): raw bytes read back, and only the model knows their type.
        array = array.view(spec.dtype)
    if array.dtype != spec.dtype:
        array = _cast(array, spec, label)
    if not _fits(array.shape, spec.shape):
        shapes = f"{_format_shape(array.shape)}, expected {_format_shape(spec.shape)}"
        raise DataError(f"{label}: input '{spec.name}' has shape {shapes}")
    return array


def _raw_bytes(dtype: np.dtype) -> bool:
    """Unstructured void: numpy's dtype for bytes of no known type."""
    return dtype.type is np.void and dtype.names is None


def _cast(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """``array`` as the input's dtype, if the kinds agree and every value survives the cast.

    Float targets may round (float64 data for a float32 input is the common
    case) but no finite value may overflow to inf or NaN; any other target
    must give every value back unchanged (int64 ids of 2**32 + 5 wrap to 5 as int32).
    """
    mismatch = f"{label}: input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype}"
    if not _same_kind(array.dtype, spec.dtype):
        raise DataError(f"{mismatch} (not a safe cast)")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found below and named
        cast = array.astype(spec.dtype)
    if _is_float(spec.dtype):
        changed = np.isfinite(array) & ~np.isfinite(cast)
        what = f"overflows {spec.dtype}"
    else:
        changed = cast.astype(array.dtype) != array
        what = f"does not fit {spec.dtype}"
    if np.any(changed):
        index = int(np.flatnonzero(changed)[0])
        value, becomes = array.reshape(-1)[index], cast.reshape(-1)[index]
        raise DataError(f"{mismatch}: value {value} {what} (it would become {becomes})")
    return cast


def _same_kind(source: np.dtype, target: np.dtype) -> bool:
    try:
        return bool(np.can_cast(source, target, casting="same_kind"))
    except TypeError:  # some ml_dtypes pairs have no casting rule
        return False


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes floats (bfloat16, float8) are not np.inexact subtypes.
    return dtype.kind in "fc" or (_element_type(dtype) or ir.DataType.UNDEFINED).is_floating_point()

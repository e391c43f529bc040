"""Load models into the onnx_ir IR and save them back, atomically.

``load`` accepts a path, an ``onnx.ModelProto``, an ``onnx_graphsurgeon.Graph``
or an ``onnx_ir.Model``. Loading from a path goes through ``onnx_ir.load``,
which memory-maps external data instead of copying it into one protobuf, so
models over 2 GB load in time and memory proportional to their graph.

``save`` writes to a temporary file in the target folder and renames it into
place, so a crash never leaves a half-written model under the user's name. It
refuses to write over the file the model was loaded from, or over any external
data file the model still reads from.
"""

from __future__ import annotations

__all__ = ["load", "save", "to_graphsurgeon", "source_path", "stored_bytes", "external_data_bytes"]

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir

from graphopt import stats, untrusted
from graphopt.errors import ModelLoadError, ModelSaveError, first_line
from graphopt.gcpause import gc_paused
from graphopt.graphs import iter_graphs

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; stay well below it
# because the graph structure adds to the weights.
PROTO_WEIGHT_LIMIT_BYTES = 1_800_000_000
# Tensors at least this large go to the external data file (onnx's default).
EXTERNAL_DATA_THRESHOLD_BYTES = 1024

_SOURCE_KEY = "graphopt.source_path"
_HAD_EXTERNAL_KEY = "graphopt.had_external_data"


def load(source: str | os.PathLike[str] | onnx.ModelProto | gs.Graph | ir.Model) -> ir.Model:
    """Loads a model into the IR.

    Args:
        source: A path to an ``.onnx`` file (external data is resolved next to
            it and memory-mapped), an ``onnx.ModelProto``, an
            ``onnx_graphsurgeon.Graph``, or an ``onnx_ir.Model`` (returned as is).

    Returns:
        The model as an ``onnx_ir.Model``.

    Raises:
        ModelLoadError: The source is missing, unreadable or not an ONNX model.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return _from_proto(source, origin="ModelProto")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if _is_graphsurgeon_graph(source):
        import onnx_graphsurgeon as gs

        return _from_proto(gs.export_onnx(source), origin="onnx_graphsurgeon.Graph")
    raise ModelLoadError(
        f"cannot load a {type(source).__name__}: expected a path, onnx.ModelProto, "
        "onnx_graphsurgeon.Graph or onnx_ir.Model"
    )


def source_path(model: ir.Model) -> Path | None:
    """The resolved path the model was loaded from, if it came from a file."""
    recorded = model.meta.get(_SOURCE_KEY)
    return Path(recorded) if recorded else None


def external_data_bytes(model: ir.Model) -> int:
    """Size on disk of the distinct external data files the model reads."""
    files = {Path(tensor.path) for tensor in _external_tensors(model)}
    return sum(path.stat().st_size for path in files if path.exists())


def stored_bytes(model: ir.Model) -> int | None:
    """Bytes the model occupies on disk (file plus external data), if loaded from a file."""
    source = source_path(model)
    if source is None or not source.exists():
        return None
    return source.stat().st_size + external_data_bytes(model)


def save(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Writes the model atomically and returns the path written.

    Args:
        model: The model to write. It is not modified.
        path: Destination ``.onnx`` file. Its folder is created if needed.
        external_data: Store tensors in ``<name>.data`` next to the output.
            ``None`` (default) does so when the model was loaded with external
            data or its weights are too large for one protobuf.

    Raises:
        ModelSaveError: The destination is the input model or one of its data
            files, or it cannot be written.
    """
    target = Path(path).absolute()
    _refuse_overwriting_sources(model, target)
    if external_data is None:
        external_data = _wants_external_data(model)
    elif not external_data and _external_tensors(model):
        raise ModelSaveError("the model reads external data; save it with external_data=True")
    data_name = f"{target.name}.data" if external_data else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with gc_paused():
            _write_atomically(model, target, data_name)
    except OSError as exc:
        raise ModelSaveError(f"cannot write {target}: {exc.strerror or exc}") from exc
    logger.debug("saved %s (external data: %s)", target, data_name)
    return target


def to_graphsurgeon(model: ir.Model) -> gs.Graph:
    """Returns an ``onnx_graphsurgeon.Graph`` holding a copy of the model.

    graphsurgeon keeps every tensor in memory, so external data is read in.
    """
    import onnx_graphsurgeon as gs
    from onnx.external_data_helper import load_external_data_for_model

    proto = ir.to_proto(model)
    source = source_path(model)
    if source is not None and model.meta.get(_HAD_EXTERNAL_KEY):
        load_external_data_for_model(proto, str(source.parent))
    return gs.import_onnx(proto)


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    untrusted.check_file(path)
    try:
        with gc_paused():
            model = ir.load(path)
    except Exception as exc:  # protobuf and onnx raise many unrelated types
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    _check_has_graph(model, str(path))
    untrusted.check_model(model, path.resolve().parent)
    model.meta[_SOURCE_KEY] = str(path.resolve())
    model.meta[_HAD_EXTERNAL_KEY] = any(_external_tensors(model))
    return model


def _from_proto(proto: onnx.ModelProto, *, origin: str) -> ir.Model:
    try:
        with gc_paused():
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # malformed protos fail deep inside the deserializer
        raise ModelLoadError(f"{origin}: not a valid ONNX model ({first_line(exc)})") from exc
    _check_has_graph(model, origin)
    untrusted.check_model(model, None)
    return model


def _check_has_graph(model: ir.Model, origin: str) -> None:
    # An empty or non-ONNX file often parses as an empty ModelProto.
    if model.ir_version <= 0 or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(f"{origin}: not an ONNX model (no ir_version or no graph)")


def _is_graphsurgeon_graph(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("onnx_graphsurgeon") and type(source).__name__ == "Graph"


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    found = []
    for graph in iter_graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    found.append(value.const_value)
    return found


def _wants_external_data(model: ir.Model) -> bool:
    if model.meta.get(_HAD_EXTERNAL_KEY) or _external_tensors(model):
        return True
    return stats.param_bytes(model) > PROTO_WEIGHT_LIMIT_BYTES


def _refuse_overwriting_sources(model: ir.Model, target: Path) -> None:
    protected = {Path(t.path).resolve() for t in _external_tensors(model)}
    source = source_path(model)
    if source is not None:
        protected.add(source)
    candidates = {target.resolve(), (target.parent / f"{target.name}.data").resolve()}
    clash = sorted(str(p) for p in candidates & protected)
    if clash:
        raise ModelSaveError(
            f"refusing to overwrite {clash[0]}: the model reads from it; choose another output path"
        )


def _write_atomically(model: ir.Model, target: Path, data_name: str | None) -> None:
    data_path = target.parent / data_name if data_name else None
    data_existed = data_path is not None and data_path.exists()
    # Same folder, so the final rename never crosses file systems; same suffix,
    # so onnx picks the serialization format from it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        ir.save(
            model,
            tmp,
            external_data=data_name,
            size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES,
        )
        _fsync(tmp)
        if data_path is not None and data_path.exists():
            if not data_existed and data_path.stat().st_size == 0:
                data_path.unlink()  # every tensor was below the threshold
            else:
                _fsync(data_path)
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if data_path is not None and not data_existed:
            data_path.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    # Makes the rename itself durable; not supported on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


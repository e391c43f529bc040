"""Load models into the onnx_ir IR and save them back, atomically.

``load`` accepts a path, an ``onnx.ModelProto``, an ``onnx_graphsurgeon.Graph``
or an ``onnx_ir.Model``. Loading from a path goes through ``onnx_ir.load``,
which memory-maps external data instead of copying it into one protobuf, so
models over 2 GB load in time and memory proportional to their graph.

``save`` never loses data. It writes the model, and ``<output>.data`` when
weights are stored externally, into a private temporary folder beside the
output, flushes both to disk, then renames the data file and then the model
into place; on any failure, Ctrl-C included, it removes the folder and leaves
any previous output as it was. It refuses to write over the file the model was
loaded from, or over any external data file the model still reads from (by
file identity, so symbolic and hard links count), unless ``in_place=True``.
Saved with ``external_data=False``, a model that reads external data gets its
weights embedded, when they fit in one protobuf.
"""

from __future__ import annotations

__all__ = [
    "load",
    "save",
    "check_target",
    "check_writable",
    "check_fits_one_file",
    "same_file",
    "write_text_atomically",
    "to_graphsurgeon",
    "source_path",
    "stored_bytes",
    "external_data_bytes",
]

import contextlib
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir

from graphopt import serialization, stats, untrusted
from graphopt.errors import ModelLoadError, ModelSaveError, UnsupportedModelError, first_line
from graphopt.gcpause import gc_paused
from graphopt.graphs import iter_graphs
from graphopt.ledger import format_bytes

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
    files = {Path(tensor.path) for tensor in serialization.external_tensors(model)}
    return sum(path.stat().st_size for path in files if path.exists())


def stored_bytes(model: ir.Model) -> int | None:
    """Bytes the model occupies on disk (file plus external data), if loaded from a file."""
    source = source_path(model)
    if source is None or not source.exists():
        return None
    return source.stat().st_size + external_data_bytes(model)


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    in_place: bool = False,
) -> Path:
    """Writes the model atomically and returns the path written.

    The model and, with external data, ``<name>.data`` are first written into
    a private temporary folder beside ``path`` and flushed to disk, then
    renamed into place, data first. On any failure, Ctrl-C included, the
    folder is removed and whatever was at ``path`` before is left as it was.

    Args:
        model: The model to write. Its content is not modified.
        path: Destination ``.onnx`` file. Its folder is created if needed.
        external_data: Store tensors in ``<name>.data`` next to the output.
            ``None`` (default) does so when the model was loaded with external
            data or its weights are too large for one protobuf. ``False``
            embeds every weight, external ones included, in one file.
        in_place: Allow ``path`` to be the file the model was loaded from, and
            its data file to be one the model reads. The old files are replaced
            only once the new ones are complete, so the disk needs room for
            both copies of the data. The model stays usable: tensors it read
            from the replaced data file keep their memory map of the old bytes
            (POSIX keeps a replaced file alive while it is mapped).

    Raises:
        ModelSaveError: Without ``in_place``, the destination is the input
            model or one of its data files; with ``external_data=False``, the
            weights do not fit in one protobuf; or it cannot be written.
    """
    target = Path(path).absolute()
    if external_data is None:
        external_data = _wants_external_data(model)
    check_target(model, target, in_place=in_place, external_data=external_data)
    if not external_data:
        check_fits_one_file(model)
    data_name = f"{target.name}.data" if external_data else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with gc_paused():
            _write_atomically(model, target, data_name)
    except OSError as exc:
        raise ModelSaveError(f"cannot write {target}: {exc.strerror or exc}") from exc
    logger.debug("saved %s (external data: %s)", target, data_name)
    return target


def check_target(
    model: ir.Model, path: str | os.PathLike[str], *, in_place: bool = False, external_data: bool | None = None
) -> None:
    """Raises ``ModelSaveError`` if ``save(model, path)`` would write over a file the model reads, or cannot write.

    Files are compared by identity, so another spelling, a symbolic link or a
    hard link to the input is caught too. A folder where the model (or, with
    ``external_data`` as ``save`` would resolve it, its data file) goes is
    caught as well. Cheap: callers run it before a long pipeline so that a bad
    output path fails first.
    """
    target = Path(path).absolute()
    check_writable(target)
    if _wants_external_data(model) if external_data is None else external_data:
        check_writable(target.parent / f"{target.name}.data")
    if in_place:
        return
    protected = [Path(tensor.path) for tensor in serialization.external_tensors(model)]
    source = source_path(model)
    if source is not None:
        protected.append(source)
    for candidate in (target, target.parent / f"{target.name}.data"):
        if any(same_file(candidate, path) for path in protected):
            raise ModelSaveError(
                f"refusing to overwrite {candidate}: the model reads from it; choose another output path"
            )


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return first.resolve() == second.resolve()


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raises ``ModelSaveError`` naming ``path`` when a file cannot be written there: it is a folder, or a parent is a file.

    Cheap, so callers run it before long work (a report path checked after
    the pipeline and validation ran would cost the user both).
    """
    target = Path(path)
    if target.is_dir():
        raise ModelSaveError(f"cannot write {target}: it is a folder")
    for parent in target.absolute().parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise ModelSaveError(f"cannot write {target}: {parent} is not a folder")


def check_fits_one_file(model: ir.Model, advice: str = "save them to an external data file") -> None:
    """Raises ``ModelSaveError`` when the model's weights are too large to embed in one ``.onnx`` file (protobuf's 2 GB limit).

    ``advice`` ends the message: what the caller's user can do instead.
    """
    weights = stats.param_bytes(model)
    if weights > PROTO_WEIGHT_LIMIT_BYTES:
        raise ModelSaveError(f"the weights ({format_bytes(weights)}) do not fit in one .onnx file (protobuf's 2 GB limit): {advice}")


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Writes a small text file (ledger, report) through a temporary file and a rename.

    The file gets the permissions ``open()`` would give it: an existing file's,
    else 0666 less the umask (``mkstemp`` alone makes it 0600).

    Raises:
        ModelSaveError: The file cannot be written; the message names it.
    """
    target = Path(path).absolute()
    check_writable(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _new_file_mode()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ModelSaveError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ModelSaveError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _new_file_mode() -> int:
    # The umask can only be read by setting it; it is put back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
    # What ir.load does, split open so the proto is checked before onnx_ir
    # deserializes it: the deserializer merges duplicate initializers, drops
    # sparse ones and loses the name of a value defined twice.
    try:
        with gc_paused():
            proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise many unrelated types
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    model = _deserialize(proto, origin=str(path))
    serialization.set_base_dir(model, path.resolve().parent)
    untrusted.check_model(model, path.resolve().parent)
    model.meta[_SOURCE_KEY] = str(path.resolve())
    model.meta[_HAD_EXTERNAL_KEY] = any(serialization.external_tensors(model))
    return model


def _from_proto(proto: onnx.ModelProto, *, origin: str) -> ir.Model:
    model = _deserialize(proto, origin=origin)
    untrusted.check_model(model, None)
    return model


def _deserialize(proto: onnx.ModelProto, *, origin: str) -> ir.Model:
    untrusted.check_proto(proto)
    try:
        with gc_paused():
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # malformed protos fail deep inside the deserializer
        missing = _not_implemented(exc)
        if missing is not None:
            # Valid ONNX that onnx_ir cannot hold yet, e.g. a ZipMap's seq(map(...)) output (scikit-learn classifiers).
            raise UnsupportedModelError(
                f"{origin}: valid ONNX that graphopt's IR (onnx_ir {ir.__version__}) cannot hold yet: {first_line(missing)}"
            ) from exc
        raise ModelLoadError(f"{origin}: not a valid ONNX model ({first_line(exc)})") from exc
    _check_has_graph(model, origin)
    return model


def _not_implemented(exc: BaseException) -> NotImplementedError | None:
    """The NotImplementedError in ``exc``'s chain (onnx_ir wraps it in its own error), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NotImplementedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _check_has_graph(model: ir.Model, origin: str) -> None:
    # An empty or non-ONNX file often parses as an empty ModelProto.
    if model.ir_version <= 0 or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(f"{origin}: not an ONNX model (no ir_version or no graph)")


def _is_graphsurgeon_graph(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("onnx_graphsurgeon") and type(source).__name__ == "Graph"


def _wants_external_data(model: ir.Model) -> bool:
    if model.meta.get(_HAD_EXTERNAL_KEY) or serialization.external_tensors(model):
        return True
    return stats.param_bytes(model) > PROTO_WEIGHT_LIMIT_BYTES


def _write_atomically(model: ir.Model, target: Path, data_name: str | None) -> None:
    # A private folder beside the target: the renames stay on one file system,
    # and the model's external data `location` is already the final relative
    # name. The staged model keeps the target's name, so onnx picks the
    # serialization format from the same suffix.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = staging / target.name
        # Without a data file of its own, the model must not keep reading the input's.
        embedded = serialization.initializers_read_in(model) if data_name is None else contextlib.nullcontext()
        with serialization.attribute_tensors_read_in(model), serialization.initializer_types_hidden(model), embedded:
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES)
        _fsync(staged)
        staged_data = staging / data_name if data_name else None
        if staged_data is not None and (not staged_data.exists() or staged_data.stat().st_size == 0):
            staged_data = None  # every tensor was below the threshold
        if staged_data is not None:
            _fsync(staged_data)
        _commit(model, staged, staged_data, target, staging)
    finally:
        with _signals_deferred():  # a second Ctrl-C must not leave the folder behind
            shutil.rmtree(staging, ignore_errors=True)


def _commit(model: ir.Model, staged: Path, staged_data: Path | None, target: Path, staging: Path) -> None:
    """Renames the staged data file, then the model, into place; undoes the first if the second fails.

    Data goes first so that the new model never points at missing data. Until
    the model's rename, a previous output's model would meet the new data, so
    the previous data is kept through a hard link and put back on failure, and
    Ctrl-C/SIGTERM wait until both renames are done.
    """
    _keep_mode(target, staged)
    if staged_data is not None:
        _keep_mode(target.parent / staged_data.name, staged_data)
    with _signals_deferred():
        if staged_data is None:
            os.replace(staged, target)
        else:
            data_target = target.parent / staged_data.name
            _detach_from(model, data_target)
            existed = data_target.exists()
            backup = _hard_link(data_target, staging / ".previous.data") if existed else None
            os.replace(staged_data, data_target)
            try:
                os.replace(staged, target)
            except BaseException:
                if backup is not None:
                    os.replace(backup, data_target)
                elif not existed:
                    data_target.unlink(missing_ok=True)
                else:
                    logger.warning("could not restore %s: hard links are not supported there", data_target)
                raise
    _fsync_directory(target.parent)


def _keep_mode(existing: Path, staged: Path) -> None:
    """A file replaced in place (--in-place, or an output written again) keeps its permissions: 0600 stays 0600."""
    if existing.exists():
        os.chmod(staged, stat.S_IMODE(existing.stat().st_mode))


def _detach_from(model: ir.Model, data_target: Path) -> None:
    # In-place saves replace the data file the model reads. onnx_ir reopens an
    # external tensor's file by path to copy it (ExternalTensor.tofile), which
    # would then read the new file at old offsets; so tensors of that file
    # become in-memory tensors over their memory map of the old bytes, which
    # POSIX keeps alive after the rename. No copy is made. Runs before the
    # backup link: onnx_ir refuses to map a file that has several hard links.
    if not data_target.exists():
        return
    replaced: dict[str, bool] = {}  # one stat per distinct file, not per tensor
    for graph in iter_graphs(model):
        if not isinstance(graph, ir.Graph):
            continue
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            if tensor.path not in replaced:
                replaced[tensor.path] = same_file(Path(tensor.path), data_target)
            if replaced[tensor.path]:
                value.const_value = serialization.in_memory(tensor)


def _hard_link(source: Path, link: Path) -> Path | None:
    try:
        os.link(source, link)
    except OSError:
        return None
    return link


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    # A blocked signal stays pending and is delivered (as KeyboardInterrupt for
    # SIGINT) once the mask is restored.
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


"""Everything that touches onnxruntime sessions: options, runners, timing.

Following Polygraphy's layering, this module only runs models; comparison and
reporting live elsewhere. These onnxruntime behaviours shape it:

- Asking for a provider that is missing or cannot start does not fail: it warns
  and silently runs on CPU, so sessions ask graphopt/providers.py first.
- Graph outputs may lack a type (onnxruntime infers it), so exposing
  intermediate tensors needs no shape inference.
- Initializers can be handed to a session from memory
  (``SessionOptions.add_external_initializers``), so an in-memory model is
  opened from a small graph-only protobuf without writing or copying its
  weights; this also keeps >2 GB models under protobuf's limit.
- Session errors about missing ops or too-new versions become
  :class:`UnsupportedModelError` with one clear line (graphopt/support.py).
"""

from __future__ import annotations

__all__ = ["OPTIMIZATION_LEVELS", "session_options", "ModelRunner", "measure_latency", "stream_tensors"]

import ctypes
import logging
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from graphopt import io, serialization, stats
from graphopt.errors import GraphoptError, ModelLoadError, ModelRunError, UnsupportedModelError
from graphopt.graphs import iter_graphs
from graphopt.ort_errors import ort_message
from graphopt.providers import PROVIDERS, resolve_providers
from graphopt.support import model_label, unsupported_reason

logger = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "full": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Weights at least this large are lent to sessions from memory, not copied
# into the protobuf (copying 90 MB of weights cost ~0.3 s per session).
_LEND_THRESHOLD_BYTES = 64 * 2**10
# Element types OrtValue.ortvalue_from_numpy takes without ml_dtypes.
_NUMPY_NATIVE_DTYPES = frozenset(
    getattr(ir.DataType, name)
    for name in ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")
)

# Whole-byte element types numpy knows only through ml_dtypes. onnxruntime's
# Python API neither takes nor returns them as arrays ("Numpy_type 4 can't be
# converted to MLDataType"), but takes and gives raw bytes through OrtValues.
# (4-, 2-bit types are packed several to a byte by onnxruntime, one per byte by ml_dtypes.)
_BYTE_TYPES = {
    dtype.numpy(): dtype
    for dtype in ir.DataType
    if dtype.name.startswith(("BFLOAT", "FLOAT8"))
}

_BYTE_TYPES_BY_ORT_NAME = {f"tensor({dtype.name.lower()})": np_dtype for np_dtype, dtype in _BYTE_TYPES.items()}  # as onnxruntime names output types
_PACKED_TYPES = frozenset(f"tensor({name})" for name in ("int4", "uint4", "int2", "uint2", "float4e2m1"))


def session_options(*, optimization: str = "full", threads: int | None = None, prepack: bool = True) -> ort.SessionOptions:
    """onnxruntime options for one session.

    Args:
        optimization: A key of :data:`OPTIMIZATION_LEVELS`; ``"none"`` runs
            the graph exactly as written.
        threads: Intra-op threads, with inter-op pinned to 1 so that sessions
            timed against each other share one parallelism. None: defaults.
        prepack: Let onnxruntime repack weights for its GEMM kernels when the
            session opens: faster runs, slower opening (about half of the
            90 MB encoder's 95 ms). Off pays for sessions that run once or
            twice, such as per-layer localization's.

    Raises:
        ValueError: Unknown level, or fewer than one thread.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization level {optimization!r}; valid: {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class ModelRunner:
    """One onnxruntime session for one model on one provider.

    Attributes:
        input_names: Required inputs (overridable initializers are accepted as feeds but not listed).
        output_names: The model's outputs followed by the exposed extra ones.
        model_output_names: The model's own outputs only.
        provider: graphopt's provider name; label: how messages name the model.
    """

    def __init__(
        self,
        model: ir.Model | str | os.PathLike[str],
        provider: str = "cpu",
        *,
        optimization: str = "full",
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
        tf32: bool = False,
        prepack: bool = True,
        profile_prefix: str | None = None,
    ) -> None:
        """Opens the session.

        Args:
            model: An IR model (never modified) or a path to an ``.onnx`` file.
            provider: A key of :data:`PROVIDERS`. CUDA sessions keep CPU as a
                fallback so that ops without a CUDA kernel still run.
            optimization: A key of :data:`OPTIMIZATION_LEVELS`.
            threads: Intra-op threads; see :func:`session_options`.
            extra_outputs: Names of main-graph node outputs to expose as
                additional outputs, for per-layer comparison.
            tf32: Let CUDA run float32 MatMul/Conv in TF32 (onnxruntime's
                default). Off here: TF32 keeps 10 mantissa bits, so on an
                Ampere or newer GPU a lossless rewrite drifts by ~1e-3.
            prepack: See :func:`session_options`; off for a session that runs once.
            profile_prefix: Run under onnxruntime's profiler, writing its trace
                to a file with this prefix; :meth:`end_profiling` names it.

        Raises:
            GraphoptError: Unknown or unavailable provider, or onnxruntime
                cannot open the model.
            ValueError: Bad options, or an extra output that no main-graph
                node produces.
        """
        options = session_options(optimization=optimization, threads=threads, prepack=prepack)
        # Fatal only: a failing kernel also logged its error to stderr (twice, in colour)
        # before run() raised it, so the CLI's one-line error came after three lines.
        options.log_severity_level = 4
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        status = resolve_providers([provider])[0]
        if not status.available:
            raise GraphoptError(f"provider {provider} is unavailable: {status.reason}")
        self.provider = provider
        self.label = _label(model)
        self._session: ort.InferenceSession | None = None
        # Arrays onnxruntime reads in place for the session's whole life.
        self._lent: list[np.ndarray] = []
        self._exposed = 0  # how many extra outputs _prepare added
        source = self._prepare(model, extra_outputs, options)
        self._session = _open_session(source, options, _provider_list(status.ort_name, tf32), self.label)
        self.input_names: list[str] = [arg.name for arg in self._session.get_inputs()]
        self.output_names: list[str] = [arg.name for arg in self._session.get_outputs()]
        self.model_output_names: list[str] = self.output_names[: len(self.output_names) - self._exposed]
        self._optional_inputs = {arg.name for arg in self._session.get_overridable_initializers()}
        self._output_types = {arg.name: arg.type for arg in self._session.get_outputs()}
        self._byte_outputs = {arg.name: _BYTE_TYPES_BY_ORT_NAME[arg.type] for arg in self._session.get_outputs() if arg.type in _BYTE_TYPES_BY_ORT_NAME}

    def _run_byte_outputs(self, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """Runs through OrtValues, reading bfloat16 and float8 outputs as bytes (see _BYTE_TYPES)."""
        assert self._session is not None
        values = {name: _ort_feed(name, array) for name, array in feeds.items()}
        ort_values = {name: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()}
        results = self._session.run_with_ort_values(names, ort_values)
        return [_from_bytes(value, self._byte_outputs[name]) if name in self._byte_outputs else value.numpy() for name, value in zip(names, results)]

    def own(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` limited to this model's required inputs.

        For samples made for another form of the model (labels, or inputs a
        prepared copy no longer has); :meth:`run` refuses unexpected names.
        """
        return {name: array for name, array in feeds.items() if name in self.input_names}

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Runs once and returns the outputs by name.

        Args:
            feeds: Input arrays by name.
            outputs: Which of :attr:`output_names` to fetch; None fetches all.
                Exposed tensors not fetched are not copied out.

        Raises:
            GraphoptError: Missing or unexpected feed names, or onnxruntime
                rejects the feeds (shape, type) or fails while running.
        """
        if self._session is None:
            raise RuntimeError(f"the runner for {self.label} is closed")
        self._check_feed_names(feeds)
        names = self.output_names if outputs is None else list(outputs)
        try:
            packed = [name for name in names if self._output_types.get(name) in _PACKED_TYPES]
            if packed:
                raise UnsupportedModelError(f"onnxruntime's Python API cannot return {self._output_types[packed[0]]} output '{packed[0]}'")
            if any(name in self._byte_outputs for name in names):
                values = self._run_byte_outputs(names, feeds)
            else:
                values = self._session.run(names, {name: _ort_feed(name, array) for name, array in feeds.items()})
        except GraphoptError:
            raise
        except InvalidArgument as exc:
            raise ModelRunError(f"onnxruntime rejected the feeds for {self.label}: {ort_message(exc)}") from exc
        except Exception as exc:  # kernels fail with several unrelated types
            raise ModelRunError(f"onnxruntime failed running {self.label}: {ort_message(exc)}") from exc
        return dict(zip(names, values))

    def end_profiling(self) -> str:
        """Stops the profiler (see ``profile_prefix``) and returns the path of its JSON trace."""
        if self._session is None:
            raise RuntimeError(f"the runner for {self.label} is closed")
        return self._session.end_profiling()

    def close(self) -> None:
        """Releases the session and the weights lent to it; safe to call twice."""
        self._session = None
        self._lent = []

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _prepare(self, model: ir.Model | str | os.PathLike[str], extra_outputs: Sequence[str], options: ort.SessionOptions) -> str | bytes:
        """What the session opens: the user's file, or a graph-only protobuf with lent weights."""
        if isinstance(model, (str, os.PathLike)) and not extra_outputs:
            path = Path(model)
            if not path.is_file():
                raise ModelLoadError(f"no such file: {path}")
            return str(path)
        working = model if isinstance(model, ir.Model) else io.load(model)
        # Outputs are appended for serialization and taken off again, so the
        # caller's IR ends as it was without the cost of cloning it.
        added = _expose_values(working, extra_outputs)
        self._exposed = len(added)
        try:
            payload, names, arrays = _serialize_lending_weights(working)
        finally:
            for value in added:
                working.graph.outputs.remove(value)
        if names:
            options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays])
        self._lent = arrays
        return payload

    def _check_feed_names(self, feeds: Mapping[str, Any]) -> None:
        listed = ", ".join(self.input_names) or "none"
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise GraphoptError(f"missing {_names('input', missing)} (model inputs: {listed})")
        extra = [name for name in feeds if name not in self.input_names and name not in self._optional_inputs]
        if extra:
            raise GraphoptError(f"unexpected {_names('input', extra)} for {self.label} (model inputs: {listed})")


def _ort_feed(name: str, array: Any) -> Any:
    """The array, or an OrtValue holding its bytes when onnxruntime cannot take its ml_dtypes type."""
    dtype = getattr(array, "dtype", None)
    if dtype is None or dtype not in _BYTE_TYPES:
        if dtype is not None and dtype.kind == "V" and dtype.type is not np.void:  # int4, float4: packed in onnxruntime
            raise UnsupportedModelError(f"onnxruntime's Python API cannot take {dtype} input '{name}'")
        return array
    raw = np.ascontiguousarray(array).view(np.uint8 if dtype.itemsize == 1 else np.uint16)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, int(_BYTE_TYPES[dtype]))


def _from_bytes(value: ort.OrtValue, dtype: np.dtype) -> np.ndarray:
    size = value.tensor_size_in_bytes()
    raw = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(raw, dtype=dtype).reshape(value.shape())


def _serialize_lending_weights(model: ir.Model) -> tuple[bytes, list[str], list[np.ndarray]]:
    """The model as protobuf bytes, large or on-disk main-graph weights left out and returned as arrays.

    Left-out weights are serialized as external-data placeholders, which
    onnxruntime fills from the arrays instead of reading a file. Subgraph
    weights and tensor attributes that live on disk are read into the
    protobuf, since external data would be resolved against a model folder
    that bytes do not have.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol | None]] = []
    names, arrays = [], []
    try:
        for graph in iter_graphs(model, functions=False):
            for name, value in graph.initializers.items():
                tensor = value.const_value
                if tensor is None:
                    continue
                lend = graph is model.graph and _lendable(tensor)
                if not lend and not isinstance(tensor, ir.ExternalTensor):
                    continue
                swapped.append((value, tensor))
                if lend:
                    names.append(name)
                    arrays.append(np.ascontiguousarray(tensor.numpy()))
                    value.const_value = _placeholder(tensor, name)
                else:
                    value.const_value = ir.Tensor(tensor.numpy(), name=name)
        with serialization.attribute_tensors_read_in(model):
            return ir.to_proto(model).SerializeToString(), names, arrays
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _lendable(tensor: ir.TensorProtocol) -> bool:
    worth_it = isinstance(tensor, ir.ExternalTensor) or stats.tensor_nbytes(tensor) >= _LEND_THRESHOLD_BYTES
    return worth_it and tensor.dtype in _NUMPY_NATIVE_DTYPES


def _placeholder(tensor: ir.TensorProtocol, name: str) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        "graphopt-lent-from-memory", 0, stats.tensor_nbytes(tensor), tensor.dtype, shape=tensor.shape, name=name
    )


def _provider_list(ort_name: str, tf32: bool) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime's ``providers`` argument: CUDA with its TF32 switch, then CPU as the fallback."""
    if ort_name == PROVIDERS["cpu"]:
        return [ort_name]
    return [(ort_name, {"use_tf32": "1" if tf32 else "0"}), PROVIDERS["cpu"]]


def _open_session(
    source: str | bytes, options: ort.SessionOptions, providers: list[str | tuple[str, dict[str, str]]], label: str
) -> ort.InferenceSession:
    ort_name = providers[0] if isinstance(providers[0], str) else providers[0][0]
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception hierarchy
        reason = unsupported_reason(str(exc))
        if reason is not None:
            raise UnsupportedModelError(f"onnxruntime cannot open {label}: {reason}") from exc
        raise GraphoptError(f"onnxruntime cannot open {label}: {ort_message(exc)}") from exc
    if ort_name not in session.get_providers():  # rare after a good probe, e.g. out of device memory
        raise GraphoptError(f"onnxruntime opened {label} without {ort_name}: it fell back to {session.get_providers()}")
    logger.debug("opened %s on %s", label, session.get_providers())
    return session


def _expose_values(model: ir.Model, names: Sequence[str]) -> list[ir.Value]:
    """Appends the named main-graph node outputs to the graph outputs, in place; returns those added."""
    produced = {value.name: value for node in model.graph for value in node.outputs if value.name}
    unknown = [name for name in names if name not in produced]
    if unknown:
        raise ValueError(
            f"cannot expose {_names('tensor', unknown)}: not produced by a node of the main graph "
            "(initializers, graph inputs and subgraph values cannot be exposed)"
        )
    present = {value.name for value in model.graph.outputs}
    added = [produced[name] for name in dict.fromkeys(names) if name not in present]
    # Untyped values go in as they are: onnxruntime 1.20 and 1.32 infer output
    # types, while onnx shape inference here cost 1.6 s on a 20k-node graph.
    model.graph.outputs.extend(added)
    logger.debug("exposed %d intermediate tensors as outputs", len(added))
    return added


def stream_tensors(
    model: ir.Model, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]], *, threads: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields, for each sample, the named tensors of ``model``'s main graph as the model computes them.

    Node outputs are exposed on one CPU session; graph inputs among
    ``names`` are taken from the sample itself. Feed entries the model does
    not take are dropped. For passes that learn from activations.
    """
    graph_inputs = {value.name for value in model.graph.inputs}
    wanted = list(dict.fromkeys(names))
    exposed = [name for name in wanted if name not in graph_inputs]
    with ModelRunner(model, threads=threads, extra_outputs=exposed) as runner:
        for sample in feeds:
            outputs = runner.run(runner.own(sample), exposed)
            yield {name: outputs[name] if name in outputs else sample[name] for name in wanted if name in outputs or name in sample}


class _Runs(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> Any: ...


def measure_latency(
    runners: Sequence[ModelRunner | _Runs], feeds: Mapping[str, np.ndarray], *, warmup: int = 3, repeats: int = 20
) -> list[float]:
    """Median seconds per run of each runner, timed interleaved.

    Runs alternate (r0, r1, r0, r1, ...) so that drift in clock speed, cache
    state or machine load hits every runner alike instead of whichever ran last.

    Args:
        runners: Objects with ``run(feeds)``, usually :class:`ModelRunner`.
        feeds: One feed dict given to every runner.
        warmup: Untimed rounds first (allocations, kernel selection).
        repeats: Timed rounds.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must not be negative, got {warmup}")
    for _ in range(warmup):
        for runner in runners:
            runner.run(feeds)
    seconds: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for runner, times in zip(runners, seconds):
            start = time.perf_counter()
            runner.run(feeds)
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


def _label(model: ir.Model | str | os.PathLike[str]) -> str:
    return Path(model).name if isinstance(model, (str, os.PathLike)) else model_label(model)


def _names(noun: str, names: Sequence[str]) -> str:
    quoted = ", ".join(repr(name) for name in names)
    return f"{noun} {quoted}" if len(names) == 1 else f"{noun}s {quoted}"

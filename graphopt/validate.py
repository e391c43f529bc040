"""Fidelity validation: does the rewritten model still compute what the original computed?

``validate`` streams samples (real data or synthesized feeds) through both
models on each requested onnxruntime provider and accumulates, per output,
the metrics of graphopt.metrics against a Tolerance. It also measures each
non-CPU provider's own noise (reference on CPU vs reference on that provider),
and, on request, localizes the first drifting tensors (graphopt.localize) on
the sample where the outputs drifted most, and compares latency and size.

Runtime concerns live in graphopt.runtime, comparison in graphopt.metrics,
presentation in graphopt.report; this module only orchestrates.
"""

from __future__ import annotations

__all__ = ["validate", "ValidationSetupError", "ValidationOptionError"]

import contextlib
import logging
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import io, stats, summary
from graphopt.data import Feeds, feed_stream, parse_shape_overrides, without_labels
from graphopt.errors import DataError, GraphoptError, ModelRunError, first_line
from graphopt.localize import (
    DEFAULT_CHUNK_SIZE,
    LayerReport,
    LayerResult,
    TensorPair,
    candidate_tensors,
    layer_comparators,
    localize,
    reference_tensors,
    tensor_pairs,
    update_layers,
)
from graphopt.metrics import OutputComparator, Tolerance, output_arrays
from graphopt.providers import ProviderStatus, resolve_providers
from graphopt.report import FidelityReport, ModelFacts
from graphopt.runtime import OPTIMIZATION_LEVELS, ModelRunner, measure_latency
from graphopt.support import check_supported
from graphopt.task import TaskMetric, TaskScore

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | ir.Model


class ValidationSetupError(GraphoptError):
    """The two models cannot be compared: different inputs or outputs, or no provider."""


class ValidationOptionError(GraphoptError, ValueError):
    """An option of :func:`validate` has an impossible value (a ValueError too, as Python callers expect)."""


def validate(
    reference: ModelSource,
    candidate: ModelSource,
    data: Any = None,
    *,
    providers: Sequence[str] = ("cpu",),
    tolerance: Tolerance | None = None,
    samples: int = 8,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None = None,
    per_layer: bool = False,
    latency: bool = False,
    optimization: str = "full",
    threads: int | None = None,
    require_providers: bool = False,
    tf32: bool = False,
    metric: TaskMetric | None = None,
) -> FidelityReport:
    """Compares ``candidate`` against ``reference`` through onnxruntime.

    Args:
        reference: The original model: a path or an ``onnx_ir.Model``.
        candidate: The rewritten model, same inputs and outputs.
        data: ``.npz`` file or folder, iterable of feed dicts, or a
            CalibrationDataReader; None synthesizes ``samples`` feeds.
        providers: ``"cpu"`` and/or ``"cuda"``.
        tolerance: Pass criteria; None uses Tolerance's default.
        samples: Number of synthesized samples (ignored with real data).
        seed: Seed of the synthesized feeds.
        shapes: Values for dynamic dims: ``{"x": (1, 3, 224, 224)}`` or
            ``["x:1x3x224x224"]``.
        per_layer: Also localize the first drifting intermediate tensors.
        latency: Also compare median latency on CPU (interleaved runs).
        optimization: onnxruntime graph optimization level; ``"none"`` for
            exact graphs (``--exact``).
        threads: onnxruntime intra-op threads for every session.
        require_providers: Raise instead of reporting an unavailable provider.
        tf32: Let CUDA run float32 MatMul/Conv in TF32, as onnxruntime does
            by default; off, so a lossless rewrite compares within 1e-4.
        metric: ``metric(outputs, sample) -> float`` scoring one sample's
            outputs (sample: inputs plus ``labels`` when the data has them);
            the report gives both models' mean and the drop. Without it,
            ``labels`` in the data give top-1 accuracy (see graphopt.task).

    Raises:
        ValidationOptionError: ``samples`` or ``threads`` below 1, ``seed``
            negative or not integers, or an unknown ``optimization`` level;
            raised before any model is read.
        UnsupportedModelError: onnxruntime cannot run a model: an opset or IR
            version newer than it supports, an unknown op, or a custom op
            without a registered kernel (CLI exit code 2).
        ValidationSetupError, DataError, GraphoptError: the models or data
            cannot be compared (CLI exit code 2), among them: every output
            empty in every sample (nothing compared, e.g. a zero-sized batch),
            and ``labels`` that are not class indices in ``[0, classes)``.
    """
    _check_options(samples=samples, seed=seed, threads=threads, optimization=optimization)
    tolerance = tolerance or Tolerance()
    statuses = resolve_providers(providers)
    available = [status.name for status in statuses if status.available]
    session_options = {"optimization": optimization, "threads": threads, "tf32": tf32}
    with contextlib.ExitStack() as stack:
        # onnxruntime reads and optimizes a model file with the GIL released, so the sessions of a
        # model given as a file open while the rest is set up: the reference's while the candidate
        # loads (MiniLM, 90 MB: about 0.1 s of the 0.35 s before the first run).
        opening = stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="graphopt-open"))
        ref_model = io.load(reference)
        check_supported(ref_model, _role_label("reference", reference))
        early_ref = _open_from_file(opening, reference, available, session_options)
        cand_model = io.load(candidate)
        check_supported(cand_model, _role_label("candidate", candidate))
        early_cand = _open_from_file(opening, candidate, available, session_options)
        _check_interfaces(ref_model, cand_model)
        _check_providers(statuses, require_providers)
        overrides = parse_shape_overrides(shapes) if isinstance(shapes, Sequence) else dict(shapes or {})
        report = FidelityReport(
            reference=_facts(ref_model, reference),
            candidate=_facts(cand_model, candidate),
            tolerance=tolerance,
            data_source=_describe_data(data, seed),
            samples=0,
            seed=seed,
            optimization=optimization,
            providers=statuses,
            tf32=tf32 and any(status.name == "cuda" and status.available for status in statuses),
            warnings=_model_warnings(ref_model, "reference") + _model_warnings(cand_model, "candidate"),
        )
        # Localization needs sessions that expose intermediate tensors. They are
        # separate from the stream's: exposing a tensor keeps onnxruntime from
        # fusing across it, which would change the outputs being validated.
        layer_pairs = tensor_pairs(ref_model, cand_model) if per_layer else []
        instrument = 0 < len(layer_pairs) <= DEFAULT_CHUNK_SIZE
        layer_provider = available[0]

        def runner(loaded: ir.Model, provider: str, extra: Sequence[str] = ()) -> ModelRunner:
            # Sessions exposing tensors run once (localization): weight prepacking would not pay.
            opened = ModelRunner(loaded, provider, **session_options, extra_outputs=extra, prepack=not extra)
            return stack.enter_context(opened)

        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphopt-candidate"))
        pairs = {}
        for provider in available:
            # In-memory models open side by side too: onnxruntime releases the GIL while it optimizes.
            pending = None if provider in early_cand else pool.submit(runner, cand_model, provider)
            ref_runner = stack.enter_context(early_ref[provider].result()) if provider in early_ref else runner(ref_model, provider)
            cand_runner = stack.enter_context(early_cand[provider].result()) if pending is None else pending.result()
            pairs[provider] = (ref_runner, cand_runner)
        noise = {p: pairs[p][0] for p in available if p != "cpu"}
        cpu_reference = pairs["cpu"][0] if "cpu" in pairs else (runner(ref_model, "cpu") if noise else None)
        # Before the opener starts: synthesizing feeds reads the IR that opening a session briefly edits.
        stream = feed_stream(ref_model, data, count=samples, seed=seed, shapes=overrides, keep_labels=True)
        layer_runners = None
        if instrument:
            # They open while the stream runs, in the gaps it leaves between
            # runs; only now, since opening a session reads (and briefly
            # edits) the same IR as the sessions above.
            opener = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphopt-layers"))
            layer_runners = opener.submit(
                lambda: (
                    runner(ref_model, layer_provider, reference_tensors(layer_pairs)),
                    runner(cand_model, layer_provider, candidate_tensors(layer_pairs)),
                )
            )
        task = TaskScore(metric)
        try:
            worst, first = _compare_stream(report, stream, pairs, cpu_reference, noise, tolerance, pool, task)
        except GraphoptError as exc:
            if data is not None or not isinstance(exc, ModelRunError):
                raise
            # Random feeds break ops whose inputs carry parameters (shapes, scales,
            # divisors, indices): onnxruntime's message alone does not say that real data would do.
            raise GraphoptError(f"{first_line(exc)} (on synthesized feeds: pass --data with real inputs)") from exc
        report.task = task.result()
        if layer_runners is not None:
            ref_layers, cand_layers = layer_runners.result()
            report.per_layer = _localize_worst(
                ref_model, layer_pairs, ref_layers, cand_layers, worst, tolerance, layer_provider
            )
        elif per_layer:
            report.per_layer = localize(
                ref_model,
                cand_model,
                [worst],
                tolerance=tolerance,
                provider=layer_provider,
                optimization=optimization,
                threads=threads,
                tf32=tf32,
            )
        if latency:
            timed = "cpu" if "cpu" in pairs else available[0]
            report.latency = _latency(pairs[timed], first, timed, threads)
    logger.info("validation %s over %d samples", "passed" if report.passed else "failed", report.samples)
    return report


def _compare_stream(
    report: FidelityReport,
    stream: Iterable[Feeds],
    pairs: dict[str, tuple[ModelRunner, ModelRunner]],
    cpu_reference: ModelRunner | None,
    noise: dict[str, ModelRunner],
    tolerance: Tolerance,
    pool: ThreadPoolExecutor,
    task: TaskScore,
) -> tuple[Feeds, Feeds]:
    """Runs every sample once per provider; returns the worst and the first sample.

    The task metric scores the first provider's outputs.
    """
    comparators: dict[tuple[str, str], OutputComparator] = {}
    noise_comparators: dict[tuple[str, str], OutputComparator] = {}
    worst: tuple[float, Feeds] | None = None
    first: Feeds | None = None
    scored = next(iter(pairs))  # the provider whose outputs the task metric scores
    for sample in stream:
        # Labels travel with the sample for the task metric; the models get the inputs alone.
        feeds = without_labels(sample)
        first = first or feeds
        if cpu_reference is not None and "cpu" not in pairs:
            reference_cpu = cpu_reference.run(feeds, cpu_reference.model_output_names)
        else:
            reference_cpu = None
        sample_error = 0.0
        for provider, (ref_runner, cand_runner) in pairs.items():
            ref_out, cand_out = _run_pair(ref_runner, cand_runner, feeds, pool)
            if provider == scored:
                task.update(sample, ref_out, cand_out)
            if provider == "cpu":
                reference_cpu = ref_out
            for name in ref_runner.model_output_names:
                comparators.setdefault((provider, name), OutputComparator(name, tolerance)).update(ref_out[name], cand_out[name])
                sample_error = max(sample_error, _relative_error(ref_out[name], cand_out[name]))
            if provider in noise and reference_cpu is not None:
                for name in ref_runner.model_output_names:
                    noise_comparators.setdefault((provider, name), OutputComparator(name, tolerance)).update(reference_cpu[name], ref_out[name])
        if worst is None or sample_error > worst[0]:
            worst = (sample_error, feeds)
        report.samples += 1
    if first is None or worst is None:
        raise DataError("no samples to validate with: the data source is empty")
    if all(comparator.nothing_compared for comparator in comparators.values()):
        # Not one value compared: no evidence either way. Exit 1 would blame the candidate and
        # 0 would vouch for it; the input is at fault (a zero-sized dim, NaN data), so it is
        # refused as bad input, as empty data is. One such output beside others is shown as not compared.
        raise DataError(
            f"nothing to compare: every output of both models was empty, or NaN/Inf in both, in all {report.samples} "
            "samples (a zero-sized dimension in --shape, or NaN/Inf in the data?)"
        )
    report.outputs = [(provider, comparator.result()) for (provider, _), comparator in comparators.items()]
    report.noise_floor = [(provider, comparator.result()) for (provider, _), comparator in noise_comparators.items()]
    return worst[1], first


def _run_pair(
    ref_runner: ModelRunner, cand_runner: ModelRunner, feeds: Feeds, pool: ThreadPoolExecutor
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Runs both models on one sample at the same time, fetching their own outputs.

    onnxruntime releases the GIL while it runs, so on a multi-core machine the
    pair costs about one run instead of two; the results are the same as
    running them one after the other.
    """
    pending = pool.submit(cand_runner.run, feeds, cand_runner.model_output_names)
    ref_out = ref_runner.run(feeds, ref_runner.model_output_names)
    return ref_out, pending.result()


def _localize_worst(
    ref_model: ir.Model,
    layer_pairs: list[TensorPair],
    ref_runner: ModelRunner,
    cand_runner: ModelRunner,
    worst: Feeds,
    tolerance: Tolerance,
    provider: str,
) -> LayerReport:
    """Compares every aligned intermediate tensor on the worst sample, with sessions that expose them."""
    # One after the other: each run fills fresh memory with every exposed tensor,
    # and two threads faulting pages into one process wait on each other (MiniLM
    # at 128 tokens, 80 MB a run: 0.2-0.3 s side by side, 0.11-0.13 s in turn).
    ref_out, cand_out = ref_runner.run(worst), cand_runner.run(worst)
    comparators = layer_comparators(layer_pairs, tolerance)
    update_layers(ref_model, layer_pairs, ref_out, cand_out, comparators)
    layers = [LayerResult(pair, comparator.result()) for pair, comparator in zip(layer_pairs, comparators)]
    return LayerReport(provider=provider, samples=1, layers=layers)


def _check_options(*, samples: int, seed: int, threads: int | None, optimization: str) -> None:
    """Refuses impossible option values before any work, naming the option (else onnxruntime fails deep inside)."""
    for label, value, low in (("samples", samples, 1), ("seed", seed, 0), ("threads", threads, 1)):
        if value is None and label == "threads":  # onnxruntime's default
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            default = " or None (onnxruntime's default)" if label == "threads" else ""
            raise ValidationOptionError(f"{label} must be an integer >= {low}{default}, got {value!r}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValidationOptionError(f"unknown optimization level {optimization!r}; valid: {', '.join(OPTIMIZATION_LEVELS)}")


def _relative_error(reference: Any, candidate: Any) -> float:
    # Sequence, map and optional outputs are lists, dicts or None, not arrays: their tensors are
    # compared in turn. Strings have no distance: equal or infinitely far.
    if not (isinstance(reference, np.ndarray) and isinstance(candidate, np.ndarray)):
        refs, cands = output_arrays(reference), output_arrays(candidate)
        errors = [_relative_error(r, c) for r, c in zip(refs, cands)]
        return float("inf") if len(refs) != len(cands) else max(errors, default=0.0)
    if reference.shape != candidate.shape:
        return float("inf")
    if reference.dtype.kind in "OUS" or candidate.dtype.kind in "OUS":
        return 0.0 if np.array_equal(reference.astype(str), candidate.astype(str)) else float("inf")
    ref = np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf outputs: the error is simply huge
        diff = np.linalg.norm(np.nan_to_num(np.asarray(candidate, dtype=np.float64) - ref, nan=1e30))
        return float(diff / (np.linalg.norm(np.nan_to_num(ref)) + 1e-30))


def _latency(pair: tuple[ModelRunner, ModelRunner], feeds: Feeds, provider: str, threads: int | None) -> dict[str, Any]:
    warmup, repeats = 3, 20
    ref_seconds, cand_seconds = measure_latency(list(pair), feeds, warmup=warmup, repeats=repeats)
    return {
        "provider": provider,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "reference_ms": ref_seconds * 1000,
        "candidate_ms": cand_seconds * 1000,
        "ratio": cand_seconds / ref_seconds if ref_seconds > 0 else None,
    }


def _check_interfaces(reference: ir.Model, candidate: ir.Model) -> None:
    def real_inputs(model: ir.Model) -> list[str]:
        return [v.name or "" for v in model.graph.inputs if v.name not in model.graph.initializers]

    ref_in, cand_in = real_inputs(reference), real_inputs(candidate)
    if sorted(ref_in) != sorted(cand_in):
        raise ValidationSetupError(f"the models take different inputs: reference {ref_in}, candidate {cand_in}")
    ref_out = [v.name for v in reference.graph.outputs]
    cand_out = [v.name for v in candidate.graph.outputs]
    if ref_out != cand_out:
        raise ValidationSetupError(f"the models have different outputs: reference {ref_out}, candidate {cand_out}")


def _check_providers(statuses: Sequence[ProviderStatus], require: bool) -> None:
    missing = [status for status in statuses if not status.available]
    if missing and require:
        raise ValidationSetupError(f"provider {missing[0].name} is unavailable: {missing[0].reason}")
    if not any(status.available for status in statuses):
        raise ValidationSetupError("none of the requested providers is available: " + "; ".join(f"{s.name}: {s.reason}" for s in statuses))


def _open_from_file(
    pool: ThreadPoolExecutor, source: ModelSource, providers: Sequence[str], options: Mapping[str, Any]
) -> dict[str, Future[ModelRunner]]:
    """Plain sessions of a model given as a file, opening in ``pool``; none for an in-memory model.

    Only files: opening a session from the IR edits it briefly (runtime's
    ``_prepare``) while this thread goes on reading it. Call after
    ``io.load`` has checked the file (untrusted's rules hold for onnxruntime too).
    """
    if not isinstance(source, (str, os.PathLike)):
        return {}
    return {provider: pool.submit(ModelRunner, source, provider, **options) for provider in providers}


def _facts(model: ir.Model, given: ModelSource) -> ModelFacts:
    # An IR model may have been rewritten since it was read: its file says nothing about it.
    on_disk = isinstance(given, (str, os.PathLike))
    path = str(io.source_path(model)) if on_disk else None
    return ModelFacts(path, io.stored_bytes(model) if on_disk else None, stats.node_count(model), stats.param_bytes(model))


def _role_label(role: str, given: ModelSource) -> str:
    return f"the {role} {os.fspath(given)}" if isinstance(given, (str, os.PathLike)) else f"the {role} model"


def _model_warnings(model: ir.Model, role: str) -> list[dict[str, Any]]:
    """What about a model deserves a warning although it ran: custom or unknown ops, NaN/Inf weights."""
    warnings = []
    custom, unknown, nonfinite = summary.custom_ops(model), summary.unknown_ops(model), summary.nonfinite_weights(model)
    if custom:
        message = f"{role}: custom-domain ops (they run only where their kernels are registered): {', '.join(custom)}"
        warnings.append({"model": role, "kind": "custom_ops", "items": custom, "message": message})
    if unknown:
        message = f"{role}: ops unknown to onnx {onnx.__version__} at the model's opset: {', '.join(unknown)}"
        warnings.append({"model": role, "kind": "unknown_ops", "items": unknown, "message": message})
    if nonfinite:
        listed = ", ".join(f"{name} ({count})" for name, count in nonfinite.items())
        message = f"{role}: NaN/Inf in weights: {listed}"
        warnings.append({"model": role, "kind": "nonfinite_weights", "items": nonfinite, "message": message})
    for warning in warnings:
        logger.info("%s", warning["message"])  # the report shows them; a WARNING log would print them twice
    return warnings


def _describe_data(data: Any, seed: int) -> str:
    if data is None:
        return f"synthesized (seed {seed})"
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    return type(data).__name__

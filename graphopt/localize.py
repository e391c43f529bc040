"""Per-layer localization: where, in topological order, the candidate starts to drift.

Both models are run with intermediate tensors exposed as extra outputs, and
each candidate tensor is compared with the reference tensor it stands for:

- the tensor of the same name;
- the name recorded by a pass under ``graphopt.provenance`` (a rewrite that
  could not keep the name);
- for a DequantizeLinear output, the float tensor it quantizes: the input of
  the matching QuantizeLinear for activations, or, for a weight, the original
  initializer named by provenance. This shows each QDQ pair's own error.

Memory stays bounded: one sample at a time, and tensors are exposed in
chunks of ``chunk_size`` so a big model never materializes all its
activations at once.
"""

from __future__ import annotations

__all__ = [
    "TensorPair",
    "LayerResult",
    "LayerReport",
    "tensor_pairs",
    "localize",
    "reference_tensors",
    "candidate_tensors",
    "update_layers",
    "layer_comparators",
    "next_chunk_size",
    "DEFAULT_CHUNK_SIZE",
    "CHUNK_BYTES",
]

import contextlib
import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt import provenance
from graphopt.data import Feeds
from graphopt.metrics import ComparisonResult, OutputComparator, Tolerance
from graphopt.runtime import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024
# Bytes of exposed tensors per model and chunk that chunks grow or shrink toward (next_chunk_size).
CHUNK_BYTES = 256 << 20
_MAX_GROWTH = 8


@dataclass(frozen=True)
class TensorPair:
    """A candidate tensor and the reference tensor it should match."""

    reference: str
    candidate: str
    node: str
    op: str
    reference_is_weight: bool = False


@dataclass(frozen=True)
class LayerResult:
    pair: TensorPair
    result: ComparisonResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference_tensor": self.pair.reference,
            "candidate_tensor": self.pair.candidate,
            "node": self.pair.node,
            "op": self.pair.op,
            **{key: value for key, value in self.result.to_dict().items() if key != "name"},
        }


@dataclass
class LayerReport:
    """All compared tensors in candidate topological order, and the first that drift."""

    provider: str
    samples: int
    layers: list[LayerResult] = field(default_factory=list)
    limit: int = 5

    @property
    def first_divergent(self) -> list[LayerResult]:
        return [layer for layer in self.layers if not layer.result.passed][: self.limit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "samples": self.samples,
            "paired": len(self.layers),
            "compared": sum(1 for layer in self.layers if layer.result.compared),
            "first_divergent": [layer.to_dict() for layer in self.first_divergent],
            "layers": [layer.to_dict() for layer in self.layers],
        }


def tensor_pairs(reference: ir.Model, candidate: ir.Model) -> list[TensorPair]:
    """Candidate main-graph tensors that have a reference counterpart, in candidate order."""
    ref_values = {value.name for node in reference.graph for value in node.outputs if value.name}
    ref_weights = set(reference.graph.initializers)
    renamed = provenance.read(candidate)
    pairs = []
    for node in candidate.graph:
        for value in node.outputs:
            if not value.name:
                continue
            target, is_weight = _reference_name(node, value, renamed, ref_values, ref_weights)
            if target is not None:
                pairs.append(TensorPair(target, value.name, node.name or "", node.op_type, is_weight))
    return pairs


def _reference_name(
    node: ir.Node, value: ir.Value, renamed: dict[str, str], ref_values: set[str], ref_weights: set[str]
) -> tuple[str | None, bool]:
    name = renamed.get(value.name, value.name)
    if name in ref_values:
        # The reference has this very tensor (two QDQ models, or a DQ the rewrite kept):
        # the float tensor behind the Q would charge the model's own quantization as drift.
        return name, False
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.inputs[0] is not None:
        quantized = node.inputs[0]
        producer = quantized.producer()
        if producer is not None and producer.op_type == "QuantizeLinear" and producer.inputs[0] is not None:
            source = producer.inputs[0].name or ""
            name = renamed.get(source, source)
        elif quantized.const_value is not None:
            # A quantized weight: the pass records which float weight it replaced.
            name = renamed.get(value.name) or renamed.get(quantized.name or "", "")
            return (name, True) if name in ref_weights else (None, False)
    if name in ref_values:
        return name, False
    return None, False


def localize(
    reference: ir.Model | str | os.PathLike[str],
    candidate: ir.Model | str | os.PathLike[str],
    samples: Sequence[Feeds],
    *,
    tolerance: Tolerance,
    provider: str = "cpu",
    optimization: str = "full",
    threads: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limit: int = 5,
    tf32: bool = False,
) -> LayerReport:
    """Compares every aligned intermediate tensor on the given samples.

    Args:
        reference: The original model (path or IR).
        candidate: The rewritten model (path or IR).
        samples: Feed dicts; a few suffice (validation passes the worst one).
        tolerance: Applied to each tensor as to the outputs, except that
            rtol scales with the tensor's largest ``|value|`` in the sample.
        provider: Execution provider name, as in graphopt.runtime.
        optimization: onnxruntime graph optimization level name.
        threads: intra-op threads; None lets onnxruntime decide.
        chunk_size: Tensors exposed by the first pair of sessions; later
            chunks grow or shrink toward :data:`CHUNK_BYTES` of exposed
            tensors (:func:`next_chunk_size`), which bounds activation memory.
        limit: How many first divergent tensors the report lists.
        tf32: Let CUDA use TF32 math (see graphopt.runtime.ModelRunner).
    """
    from graphopt import io

    ref_model, cand_model = io.load(reference), io.load(candidate)
    pairs = tensor_pairs(ref_model, cand_model)
    report = LayerReport(provider=provider, samples=len(samples), limit=limit)
    options = {"optimization": optimization, "threads": threads, "tf32": tf32}
    start, size = 0, chunk_size
    while start < len(pairs):
        chunk = pairs[start : start + size]
        comparators, exposed = _compare_chunk(ref_model, cand_model, chunk, samples, tolerance, provider, options)
        report.layers.extend(LayerResult(pair, comparator.result()) for pair, comparator in zip(chunk, comparators))
        start, size = start + len(chunk), next_chunk_size(len(chunk), exposed)
    logger.debug("localize: compared %d tensors, %d diverge", len(report.layers), len(report.first_divergent))
    return report


def next_chunk_size(size: int, exposed_bytes: int) -> int:
    """How many tensors the next chunk exposes: ``size`` scaled toward :data:`CHUNK_BYTES`, by at most 8x.

    Each chunk opens two sessions of the whole graph, so the count of chunks
    sets the cost on big graphs: fixed 1,024-tensor chunks of a 40k-node chain
    of small tensors took 92 s (34 sessions) where validation alone took 7 s.
    The bytes of the last chunk predict the next; the growth cap keeps a
    region of much larger tensors from overshooting the budget by more than
    that factor.
    """
    if exposed_bytes <= 0:
        return size * _MAX_GROWTH
    return max(1, min(size * _MAX_GROWTH, size * CHUNK_BYTES // exposed_bytes))


def _compare_chunk(
    ref_model: ir.Model,
    cand_model: ir.Model,
    chunk: list[TensorPair],
    samples: Iterable[Feeds],
    tolerance: Tolerance,
    provider: str,
    options: dict[str, Any],
) -> tuple[list[OutputComparator], int]:
    """The chunk's comparators, and the most bytes the reference exposed for it in one sample.

    ``options`` are ModelRunner's keyword arguments.
    """
    comparators = layer_comparators(chunk, tolerance)
    exposed = 0
    # The two sessions open and run side by side: onnxruntime releases the GIL. Each
    # reads (and briefly edits) its own IR, already loaded: a path would load it again;
    # one IR given as both models opens one session after the other.
    with ThreadPoolExecutor(max_workers=1) as pool, contextlib.ExitStack() as stack:
        open_candidate = functools.partial(ModelRunner, cand_model, provider, extra_outputs=candidate_tensors(chunk), **options)
        pending = pool.submit(open_candidate) if cand_model is not ref_model else None
        ref_runner = stack.enter_context(ModelRunner(ref_model, provider, extra_outputs=reference_tensors(chunk), **options))
        cand_runner = stack.enter_context(pending.result() if pending is not None else open_candidate())
        extra = set(ref_runner.output_names) - set(ref_runner.model_output_names)
        for feeds in samples:
            running = pool.submit(cand_runner.run, cand_runner.own(feeds))
            ref_out = ref_runner.run(ref_runner.own(feeds))
            update_layers(ref_model, chunk, ref_out, running.result(), comparators)
            exposed = max(exposed, sum(getattr(ref_out[name], "nbytes", 0) for name in extra))
    return comparators, exposed


def layer_comparators(pairs: Sequence[TensorPair], tolerance: Tolerance) -> list[OutputComparator]:
    """One comparator per pair, with atol/rtol relative to each tensor's peak (see graphopt.metrics)."""
    return [OutputComparator(pair.candidate, tolerance, peak_relative=True) for pair in pairs]


def reference_tensors(pairs: Sequence[TensorPair]) -> list[str]:
    """The reference tensors to expose for ``pairs`` (weights are read from the model instead)."""
    return list(dict.fromkeys(p.reference for p in pairs if not p.reference_is_weight))


def candidate_tensors(pairs: Sequence[TensorPair]) -> list[str]:
    """The candidate tensors to expose for ``pairs``."""
    return list(dict.fromkeys(p.candidate for p in pairs))


def update_layers(
    ref_model: ir.Model,
    pairs: Sequence[TensorPair],
    ref_out: Mapping[str, np.ndarray],
    cand_out: Mapping[str, np.ndarray],
    comparators: Sequence[OutputComparator],
) -> None:
    """Feeds one sample's exposed tensors of both models to the comparators of ``pairs``."""
    for pair, comparator in zip(pairs, comparators):
        expected = _weight(ref_model, pair.reference) if pair.reference_is_weight else ref_out[pair.reference]
        comparator.update(expected, cand_out[pair.candidate])


def _weight(model: ir.Model, name: str) -> np.ndarray:
    tensor = model.graph.initializers[name].const_value
    assert tensor is not None  # tensor_pairs only pairs readable initializers
    return tensor.numpy()

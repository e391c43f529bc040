"""``qdq``: calibrated static int8 quantization (and int4 weight-only) in QDQ form.

Error model: each quantized weight moves by at most half a step of its
channel's scale (max|w|/127 per output channel), each quantized activation by
half a step of its calibrated range (plus clipping beyond the range); the
output error is the accumulation of those. ``target_cosine``/``target_snr``
bound it end to end on held-back samples by returning the most sensitive
layers to float.

Non-finite values never reach a scale: a layer whose weight or bias holds
NaN/Inf stays float (``float_layers`` says so); calibration ignores NaN/Inf
activation values (``nonfinite_activations`` counts them) and leaves float a
tensor that had no finite value at all (``float_activations``); a last check
refuses to emit a Q/DQ scale that is not finite and positive.

Steps (each in its own module):

1. preparation (prepare.py): opset upgrade (13, or 21 for int4 blocks),
   lift-constants and BatchNorm folding, so weights are initializers and BNs are gone;
2. placement (placement.py): which Conv/MatMul/Gemm nodes and activations;
3. calibration (calibration.py): one onnxruntime pass exposing the chosen
   activations, bounded memory, ranges by minmax/percentile/entropy/mse;
4. rewrite (rewrite.py): Q/DQ pairs, int8 per-channel weights, int32 biases;
5. mixed precision and speed (mixed.py): layers back to float until the
   fidelity target holds; the whole model back to float if int8 runs slower.

The float model is kept as a protobuf snapshot, so that every candidate
quantization is built afresh from it with a different set of float layers.
"""

from __future__ import annotations

__all__ = ["QuantizePass", "QuantizationSummary"]

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ledger import IN_SUMMARY
from graphopt.pipeline import adopt_model
from graphopt.progress import report
from passes.options import check_shapes, unmatched_names
from passes.qdq import calibration as calib
from passes.qdq.arithmetic import ActivationParams, activation_params
from passes.qdq.bias_correction import channel_axes, channel_axis, input_means, output_shift
from passes.qdq.options import check_options, exclude_names
from passes.qdq.placement import Placement, Target, plan, representative
from passes.qdq.prepare import check_runnable, name_unnamed_nodes, prepare, unname
from passes.qdq.rewrite import (
    NodeMaker,
    quantize_activation,
    quantize_bias_input,
    quantize_embedding,
    quantize_weight,
    set_float_bias,
)
from passes.qdq.samples import Samples
from passes.qdq.summary import QuantizationSummary
from passes.qdq.weight_only import quantize_weights_only

logger = logging.getLogger(__name__)

_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
_BLOCKED_OPSET = 21  # DequantizeLinear block_size and int4
_ACTIVATION_TYPES = ("u8", "s8")
_FALLBACKS = ("storage", "float")
_ROUNDINGS = ("nearest", "gptq")
_CHOICES = {"calibration": calib.METHODS, "activations": _ACTIVATION_TYPES, "rounding": _ROUNDINGS, "fallback": _FALLBACKS}
# Without a target, an output cosine below this (held back where the data allows) is reported with a warning.
ADVISED_COSINE = 0.99


class QuantizePass(ir.passes.InPlacePass):
    """Inserts QuantizeLinear/DequantizeLinear so onnxruntime runs int8 kernels.

    Options (all keyword-only):
        calibration: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        percentile: For ``percentile`` calibration.
        activations: ``u8`` (default; fastest on x86) or ``s8``.
        symmetric: Symmetric activation ranges.
        reduce_range: 7-bit weights and activations, for CPUs without VNNI.
        weight_bits: 8 (static int8) or 4 (int4 block-wise, weight-only, MatMul/Gemm).
        weight_only: With 8 bits: int8 MatMul/Gemm weights (a scale per
            output column) and float activations, which onnxruntime runs as
            MatMulNBits; pays at few rows (batch-1 MLPs, decoding).
        block_size: Block of the int4 scales (a power of 2, >= 16).
        exclude: Comma-separated node names or op types to keep float.
        data: Calibration feeds: ``.npz`` file or folder, iterable of feed
            dicts, or a CalibrationDataReader; None synthesizes ``samples``.
        samples: Synthesized calibration samples when ``data`` is None.
        seed: Seed of synthesized samples.
        shapes: Dims of synthesized samples' dynamic inputs, ``NAME:DIMS``
            items as ``--shape`` takes them (the CLI hands its own over).
        target_cosine: Keep layers float until the output cosine on held-back
            samples, less two standard errors of its per-sample values,
            reaches this (needs at least 2 samples).
        target_snr: The same with an SNR in dB.
        rounding: ``nearest`` (default) rounds each int8 weight to its nearest
            level; ``gptq`` rounds a layer's weights so that its outputs on
            the calibration samples move least (GPTQ, gptq.py): slower, and
            closer to float where weight rounding dominates the error.
        bias_correction: (default on) Fold the mean output shift of weight rounding, measured
            on the calibration samples, into each layer's bias (adds one to a
            Conv/Gemm without bias).
        embeddings: Store Gather tables (token embeddings) as int8 rows with
            a scale per row; only gathered rows are dequantized.
        check_speed: Measure latency and return the model to float if int8 is slower.
        fallback: What a layer returned to float for speed keeps: ``storage``
            (default) stores its weight as int8 that onnxruntime widens once at
            load (float kernels, weights ~4x smaller; within any fidelity
            target), ``float`` leaves the float weight as it was.
        threads: onnxruntime threads for calibration and measurements.
    """

    visits_subgraphs = False  # bodies stay float; the summary counts their nodes
    lossy = True  # its outputs differ from the input's: the CLI compares them (graphopt/quick_check.py)
    fidelity_hint = "target_cosine=0.99 keeps the layers that cost it float"  # what the CLI suggests when it moved far

    def __init__(
        self,
        *,
        calibration: str = "percentile",
        percentile: float = calib.DEFAULT_PERCENTILE,
        activations: str = "u8",
        symmetric: bool = False,
        reduce_range: bool = False,
        weight_bits: int = 8,
        weight_only: bool = False,
        block_size: int = 32,
        exclude: str = "",
        data: Any = None,
        samples: int = 16,
        seed: int = 0,
        shapes: list[str] | None = None,
        target_cosine: float | None = None,
        target_snr: float | None = None,
        rounding: str = "nearest",
        bias_correction: bool = True,
        embeddings: bool = True,
        check_speed: bool = True,
        fallback: str = "storage",
        threads: int | None = 1,
    ) -> None:
        super().__init__()
        check_options(locals(), _CHOICES)
        # Options keep their own names: a pipeline records an instance's options by them (its ledger row).
        self.calibration = calibration
        self.percentile = percentile
        self.activations = activations
        self.signed = activations == "s8"
        self.symmetric = symmetric
        self.reduce_range = reduce_range
        self.weight_bits = int(weight_bits)
        self.weight_only = weight_only or weight_bits == 4  # int4 is weight-only only
        self.block_size = int(block_size)
        self.exclude = exclude_names(exclude)
        self.data = data
        self.samples = int(samples)
        self.seed = int(seed)
        self.shapes = check_shapes(shapes)
        self.target_cosine = target_cosine
        self.target_snr = target_snr
        self.rounding = rounding
        self.bias_correction = bias_correction
        self.embeddings = embeddings
        self.check_speed = check_speed
        self.fallback = fallback
        self.threads = None if threads is None else int(threads)
        self._input_means: dict[tuple[str, int], np.ndarray] = {}  # (tensor, channel axis) -> means
        self._rounded: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weight name -> GPTQ levels, scales
        self.summary = QuantizationSummary()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Preparing changes the model (opset upgrade, lifted constants, folded
        # BatchNorms), and an upgraded opset can cost onnxruntime fusions: the
        # encoder at opset 21 ran 9% slower in float. So speed is judged
        # against the model as given, and a run that quantizes nothing gives
        # it back unchanged.
        unmatched = unmatched_names("qdq", "exclude", self.exclude, model)  # before generated names could match
        given = name_unnamed_nodes(model)  # layers are told apart by name; given back if nothing changes
        original = model.clone()  # shares the tensors: cheap
        try:
            result = self._quantize(model, original)
        except GraphoptError:  # a refusal (opset, data, ...) leaves the model as it was given
            adopt_model(model, original)
            unname(model, given)
            raise
        self.summary.unmatched_exclude = unmatched
        if not self.summary.quantized and not self.summary.stored:
            adopt_model(model, original)
            unname(model, given)
            return ir.passes.PassResult(model, False)
        return result

    def _quantize(self, model: ir.Model, original: ir.Model) -> ir.passes.PassResult:
        self._rounded = {}
        hold_back = self.target_cosine is not None or self.target_snr is not None
        measured = not self.weight_only or self.check_speed or hold_back or self.rounding == "gptq"
        if measured:  # calibration, fidelity and speed checks run the model
            check_runnable(model, self.threads)
        prepare(model, _BLOCKED_OPSET if self.weight_bits == 4 else _QDQ_OPSET)
        placement = plan(model, exclude=self.exclude, weight_only=self.weight_only)
        self.summary = QuantizationSummary(float_subgraph_nodes=placement.float_subgraph_nodes)
        self.summary.float_layers.update(dict(placement.skipped))
        if not placement.targets:
            logger.info("qdq: nothing to quantize")
            return ir.passes.PassResult(model, False)
        if not measured:  # weight-only unchecked: a pure rewrite, so models onnxruntime cannot run still compress
            return self._adopt(model, *self._build_weight_only(model, frozenset()), placement)
        samples = Samples(
            model, self.data, count=self.samples, seed=self.seed, hold_back=hold_back, shapes=self.shapes, check_unseen=True
        )
        if self.weight_only:
            kind = "int4" if self.weight_bits == 4 else "int8 weight-only"
            if self.rounding == "gptq":
                from passes.qdq.gptq import round_targets  # loaded only when asked for

                group = self.block_size if self.weight_bits == 4 else None
                # int4 leaves float the layers with fewer inputs than a block (weight_only.py): no GPTQ for them.
                wanted = [t for t in placement.targets if group is None or _inputs(t) >= group]
                self._rounded = round_targets(model, wanted, samples.calibration, self.threads, bits=self.weight_bits, group=group)
            return self._choose(model, original, placement, samples, self._build_weight_only, kind=kind)
        names = [value.name or "" for value in placement.activations]
        observed = calib.collect(
            model, names, samples.calibration, threads=self.threads,
            progress=lambda done, total: report(done, total or 0, "calibration runs"),
            channel_axes=channel_axes([t.node for t in placement.targets]) if self.bias_correction else None,
        )
        self._input_means = input_means(observed)
        stats = {name: observed[name] for name in names}  # without the tensors observed for bias correction only
        self.summary.nonfinite_activations = {name: s.nonfinite for name, s in stats.items() if s.nonfinite}
        self.summary.float_activations = {name: "no finite value in calibration" for name, s in stats.items() if not s.count}
        params = self._activation_params(placement, {name: s for name, s in stats.items() if s.count})
        if self.rounding == "gptq":
            from passes.qdq.gptq import in_weight_layout, round_targets  # loaded only when asked for

            by_name = {t.weight.name or "": t for t in placement.targets}
            rounded = round_targets(model, placement.targets, samples.calibration, self.threads, reduce_range=self.reduce_range)
            self._rounded = {name: (in_weight_layout(by_name[name], levels), scales) for name, (levels, scales) in rounded.items()}

        def build(float_model: ir.Model, float_layers: frozenset[str]) -> tuple[ir.Model, QuantizationSummary]:
            return self._build(float_model, params, float_layers)

        return self._choose(model, original, placement, samples, build, kind="int8")

    def _choose(
        self,
        model: ir.Model,
        original: ir.Model,
        placement: Placement,
        samples: Samples,
        build: Callable[[ir.Model, frozenset[str]], tuple[ir.Model, QuantizationSummary]],
        kind: str,
    ) -> ir.passes.PassResult:
        """Builds quantized candidates from a float copy, keeps mixed.choose's pick, and adopts it into ``model``."""
        from passes.qdq import mixed  # measures models: onnxruntime sessions

        # clone() shares the tensors, so external data keeps its folder (a proto round trip loses it).
        float_model = model.clone()
        chosen, summary = mixed.choose(
            float_model, lambda float_layers: build(float_model, frozenset(float_layers)),
            [t.node.name or "" for t in placement.targets], samples.held_back,
            target_cosine=self.target_cosine, target_snr=self.target_snr, check_speed=self.check_speed,
            threads=self.threads, kind=kind, speed_reference=original, store_slow=self.fallback == "storage",
        )
        cosine = summary.fidelity.get("cosine", 1.0)
        if summary.fidelity:
            summary.fidelity["samples"] = len(samples.held_back)
            summary.fidelity_samples = samples.judged_on
        if self.target_cosine is None and self.target_snr is None and cosine < ADVISED_COSINE:
            # No target means no guard: say so rather than hand back a degraded model quietly.
            summary.advice = f"below {ADVISED_COSINE:g}: target_cosine={ADVISED_COSINE:g} keeps the layers that cost it float"
            logger.warning("qdq: output cosine %.5f %s, %s", cosine, summary.judged_text(), summary.advice, extra=IN_SUMMARY)
        return self._adopt(model, chosen, summary, placement)

    def _adopt(self, model: ir.Model, chosen: ir.Model, summary: QuantizationSummary, placement: Placement) -> ir.passes.PassResult:
        """Puts ``chosen`` in place of ``model``, with ``summary`` merged into what placement and calibration found."""
        summary.float_layers = {**self.summary.float_layers, **summary.float_layers}
        summary.float_activations = self.summary.float_activations
        summary.nonfinite_activations = self.summary.nonfinite_activations
        summary.float_subgraph_nodes = placement.float_subgraph_nodes
        self.summary = summary
        adopt_model(model, chosen)
        return ir.passes.PassResult(model, bool(summary.quantized or summary.stored))

    def details(self) -> dict[str, Any]:
        """The last run's summary, for the pipeline ledger, with a one-line ``summary`` for people."""
        return {**dataclasses.asdict(self.summary), "summary": self.summary.line()}

    def _activation_params(self, placement: Placement, stats: dict[str, calib.TensorStatistics]) -> dict[str, ActivationParams]:
        levels = 128 if self.reduce_range else 256
        ranges = {
            name: calib.choose_range(s, self.calibration, percentile=self.percentile, levels=levels) for name, s in stats.items()
        }
        groups: dict[str, tuple[float, float]] = {}
        for name, (low, high) in ranges.items():
            if high - low <= calib.DEGENERATE_WIDTH:
                # An all-zero tensor: a tiny scale would clip the int32 bias; scale 1 keeps it.
                low, high = 0.0, 0.0
            root = representative(placement, name)
            old = groups.get(root, (low, high))
            groups[root] = (min(old[0], low), max(old[1], high))
        return {
            name: activation_params(
                *groups[representative(placement, name)], signed=self.signed, symmetric=self.symmetric, reduce_range=self.reduce_range
            )
            for name in ranges
        }

    def _build(self, float_model: ir.Model, params: dict[str, ActivationParams], float_layers: frozenset[str]) -> tuple[ir.Model, QuantizationSummary]:
        """A quantized copy of the float model, with ``float_layers`` left float."""
        model = float_model.clone()
        placement = plan(model, exclude=self.exclude | float_layers)
        summary = QuantizationSummary()
        summary.weight_bytes_before = sum(_nbytes(t.weight) + _nbytes(t.bias) for t in placement.targets)
        with NodeMaker(model) as maker:  # leaving it records the provenance of every dequantized weight at once
            scales: dict[str, np.float32] = {}
            for value in placement.activations:
                if value.name in params:
                    quantize_activation(maker, value, params[value.name])
                    scales[value.name or ""] = params[value.name].scale
                    summary.activations += 1
            for target in placement.targets:
                if self._quantize_target(maker, target, scales):
                    summary.corrected.append(target.node.name or target.node.op_type)
                summary.quantized.append(target.node.name or target.node.op_type)
                if (target.weight.name or "") in self._rounded:
                    summary.gptq.append(target.node.name or target.node.op_type)
            summary.weight_bytes_after = _quantized_bytes(model)
            if self.embeddings:
                for table, gathers in placement.embeddings:
                    before, after = quantize_embedding(maker, table, gathers)
                    summary.weight_bytes_before += before
                    summary.weight_bytes_after += after
                    summary.quantized.append(f"{table.name} (embedding, {len(gathers)} Gather)")
        _check_scales(model)
        return model, summary

    def _quantize_target(self, maker: NodeMaker, target: Target, scales: dict[str, np.float32]) -> bool:
        """int8 weight and, when the input is quantized, int32 bias; returns whether the bias was corrected.

        Bias correction subtracts the weight-rounding shift from the bias,
        giving a Conv or Gemm without bias one; the bias is int32 only when
        the layer's input is quantized (its scale is part of the bias scale).
        """
        node = target.node
        weight_scales, delta = quantize_weight(
            maker, node, target.weight, target.weight_axis, reduce_range=self.reduce_range, rounded=self._rounded.get(target.weight.name or "")
        )
        source = _quantized_source(node.inputs[0])
        float_input = source or (node.inputs[0].name if node.inputs[0] is not None else None)
        bias, reader, values = target.bias, target.bias_reader or node, target.bias_values
        mean = self._input_means.get((float_input or "", channel_axis(node)))
        shift = output_shift(node, delta, mean) if mean is not None else None
        # A bias that is not one value per channel stays as it is: correcting it would replace it.
        corrected = shift is not None and not target.keeps_bias and (values is not None or node.op_type in ("Conv", "Gemm"))
        if corrected:
            values = (np.zeros(len(shift), np.float32) if values is None else values) - shift
        if (bias is not None or corrected) and source in scales:
            if bias is None:  # a corrected layer without bias: give it one to quantize
                set_float_bias(maker, reader, None, values)  # type: ignore[arg-type]
                bias = reader.inputs[2]
            quantize_bias_input(maker, reader, bias, scales[source], weight_scales, values, corrected=corrected)  # type: ignore[arg-type]
        elif corrected:
            set_float_bias(maker, reader, bias, values)  # type: ignore[arg-type]
        return corrected

    def _build_weight_only(self, float_model: ir.Model, float_layers: frozenset[str]) -> tuple[ir.Model, QuantizationSummary]:
        """A weight-only copy of the float model, with ``float_layers`` left float."""
        model = float_model.clone()
        placement = plan(model, exclude=self.exclude | float_layers, weight_only=True)
        summary = QuantizationSummary()
        with NodeMaker(model) as maker:  # leaving it records the provenance of every dequantized weight at once
            quantize_weights_only(maker, placement, self.weight_bits, self.block_size, summary, self._rounded)
        summary.weight_bytes_after = _quantized_bytes(model)
        _check_scales(model)
        return model, summary


def _inputs(target: Target) -> int:
    """K: the weight's size along its reduction axis (the one that is not the output channels)."""
    shape = target.weight.const_value.shape  # type: ignore[union-attr]
    return int(shape[1 - target.weight_axis])


def _quantized_source(value: ir.Value | None) -> str | None:
    """The float tensor a DequantizeLinear output dequantizes, if ``value`` is one."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    quantize = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.inputs[0] is None:
        return None
    return quantize.inputs[0].name


def _check_scales(model: ir.Model) -> None:
    """Refuses Q/DQ scales that are not finite and positive; the steps above should never make one.

    Raises:
        GraphoptError: Naming the scale, so that a NaN/Inf never ships silently.
    """
    for node in model.graph:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        scale = node.inputs[1]
        values = scale.const_value.numpy() if scale.const_value is not None else None
        if values is not None and not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise GraphoptError(f"qdq computed an unusable scale {scale.name} for node {node.name} ({values.ravel()[:4]}...)")


def _nbytes(value: ir.Value | None) -> int:
    return 0 if value is None or value.const_value is None else value.const_value.nbytes


def _quantized_bytes(model: ir.Model) -> int:
    """Bytes of the integer weights and their scales (what replaced the float weights)."""
    total = 0
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            total += sum(_nbytes(value) for value in node.inputs)
    return total

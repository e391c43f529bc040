"""``prune``: magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights (unstructured and N:M).

Error model: pruning zeroes the smallest-magnitude weights, so each layer's
output moves by its input times the removed weights; with Gaussian-like
weights, removing the smallest half keeps about 90% of the weight energy.

Zeros alone make no model faster on onnxruntime's CPU kernels, and the
summary says so: what they buy is storage once the weights are entropy
coded (see compression.py) and speed on hardware with sparse kernels (the
N:M layout along the input-channel axis is what sparse tensor cores use).
Structured channel pruning (``pattern=channel``, channels.py) shrinks the
tensors of Conv/ConvTranspose/Gemm/MatMul layers and what follows them, and
that is what makes onnxruntime faster.
"""

from __future__ import annotations

__all__ = ["PrunePass", "PruneSummary"]

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.runtime import stream_tensors
from passes.lift_constants import LiftConstantsPass
from passes.options import (
    check_bool,
    check_int,
    check_names,
    check_number,
    check_shapes,
    check_threads,
    unmatched_names,
)
from passes.prune.channels import Chain, find_chains, grouped_keep, prune_chain, prune_concat_consumers
from passes.prune.compression import compression_report
from passes.prune.importance import FeatureStats, activation_importance, compensate_means, weight_importance
from passes.prune.layer_checks import GRAPH_INPUT_WEIGHT, layer_label, left_constant, nonfinite_count, quantized_weight
from passes.prune.masks import global_threshold_masks, n_of_m_mask, parse_n_of_m, unstructured_mask
from passes.prune.reconstruct import input_gram_halves
from passes.prune.refit_channels import layers_to_refit, refit_in_order
from passes.prune.refit_masked import checked_refit, refit_refusal
from passes.qdq.samples import Samples
from passes.qdq.summary import counted

logger = logging.getLogger(__name__)

_TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ONNX_DOMAINS = ("", "ai.onnx")
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
DEFAULT_SKIP = "default"
# The channel summary says when align moved a layer's share of channels removed this far from ratio.
_ROUNDING_NOTED = 0.05


@dataclass
class PruneSummary:
    """Per-layer achieved sparsity, what was skipped and why, and the storage report."""

    sparsity: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    pattern: str = "unstructured"
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # producer -> (before, after)
    reconstructed: list[str] = field(default_factory=list)
    not_reconstructed: dict[str, str] = field(default_factory=dict)
    compensated: list[str] = field(default_factory=list)  # consumers whose bias took the removed channels' mean
    norm: str = ""  # the channel importance used: l1, l2 or activation
    rounded: str = ""  # channel: how far align moved the share removed from ratio, when it did
    unmatched_skip: list[str] = field(default_factory=list)  # skip= entries that name no node or op type
    defaults_replaced: list[str] = field(default_factory=list)  # layers the default skips would have kept, when skip= left out "default"

    def line(self) -> str:
        total = self.compression.get("dense_bytes", 0)
        if self.pattern == "channel":
            before = sum(b for b, _ in self.channels.values())
            after = sum(a for _, a in self.channels.values())
            if self.channels:
                parts = [f"{counted(len(self.channels), 'layer')} lost {before - after} of {before} output channels (tensors shrink, {self.norm} importance)"]
            else:
                parts = ["no output channel removed"]
            if self.rounded:
                parts.append(self.rounded)
            if self.compensated:
                parts.append(f"{counted(len(self.compensated), 'layer')} took the removed channels' mean into their bias")
            whole = {label: why for label, why in self.skipped.items() if label not in self.reconstructed}  # a refit one kept its channels only
            if whole:
                parts.append(f"{len(whole)} left whole ({'; '.join(sorted(set(whole.values()))[:4])})")
            return ", ".join(parts + self._refit_parts())
        pruned = f"{counted(len(self.sparsity), 'layer')} pruned" if self.sparsity else "no layer pruned"
        if self.sparsity:
            pruned += f" (sparsity {min(self.sparsity.values()):.3f}-{max(self.sparsity.values()):.3f})"
        parts = [pruned]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped ({'; '.join(sorted(set(self.skipped.values())))})")
        if total:
            best = min(self.compression["zlib_bytes"], self.compression["lzma_bytes"], self.compression["sparse_bytes"])
            parts.append(f"int8 + entropy coding {total / best:.1f}x smaller than dense")
        parts.extend(self._refit_parts())
        parts.append("zeros alone do not speed up onnxruntime CPU")
        return ", ".join(parts)

    def _refit_parts(self) -> list[str]:
        """Reconstruction's counts, and what the skip option did that a reader would not expect."""
        parts = []
        if self.unmatched_skip:
            parts.append(f"skip entries matching no node or op type: {', '.join(self.unmatched_skip)}")
        if self.defaults_replaced:
            parts.append(f"skip= replaced the default skips ({', '.join(self.defaults_replaced)}; add 'default' to keep them)")
        if self.reconstructed:
            parts.append(f"{counted(len(self.reconstructed), 'layer')} refit on calibration data")
        if self.not_reconstructed:
            parts.append(f"{len(self.not_reconstructed)} not refit ({'; '.join(sorted(set(self.not_reconstructed.values()))[:3])})")
        return parts


class PrunePass(ir.passes.InPlacePass):
    """Zeroes the smallest weights of Conv/ConvTranspose/Gemm/MatMul layers.

    Options (keyword-only):
        pattern: ``unstructured``, ``N:M`` (e.g. ``2:4``: keep 2 of every
            4 consecutive weights along the input-channel axis), or
            ``channel``: remove whole output channels and shrink the tensors
            that carry them (see channels.py).
        ratio: Share of output channels ``channel`` removes per layer.
        norm: Channel importance for ``channel``: ``l1`` or ``l2`` weight norm,
            or ``activation`` (from ``data``: each channel's spread where the
            next layers read it times their weights; the removed channels'
            mean goes into the next layers' biases; see importance.py).
            ``auto`` (the default) is ``activation`` when ``data`` is given
            and ``l1`` otherwise: on the trained digits CNN at ratio 0.3,
            top-1 0.686 by L1 and 0.976 by activation, before reconstruction.
        align: ``channel`` keeps a multiple of this many channels in layers
            whose count is one (the nearest multiple, at least one block):
            onnxruntime's fast NCHWc conv kernels need channel counts that
            are multiples of their block (8 on AVX2, 16 on AVX-512), and
            misaligned layers fall back to slower kernels plus layout
            conversions. 1 keeps exactly ``ratio``.
        sparsity: Share of weights to zero (unstructured only).
        scope: ``layer`` (each layer hits ``sparsity``) or ``global`` (one
            magnitude threshold over all layers).
        skip: Comma-separated node names or op types to leave alone;
            ``default`` skips the first Conv and the final classifier (the
            last weighted layer before an output). Embedding tables are never
            pruned (only the ops above are). A list without ``default``
            replaces those skips, and the summary says so; entries that match
            no node name or op type are warned about.
        reconstruct: Refit each pruned MatMul/Gemm's kept weights (and bias)
            so its outputs match the original layer's on calibration data
            (see refit_masked.py); with ``channel``, every Conv/Gemm/MatMul
            whose input the pruning changed, in graph order (refit_channels.py).
            A refit is kept only if, fitted on half the samples, it lowers
            the output error on the other half; the kept ones are then refit
            on all samples. The others stay as pruned, with the reason in
            ``not_reconstructed``, as do layers whose Gram matrices would pass
            1 GiB (reconstruct.gram_refusal), before any is built.
        data: Calibration feeds for ``reconstruct`` (as for ``qdq``); None
            synthesizes ``samples`` feeds with ``seed``, dynamic dims from
            ``shapes`` (``NAME:DIMS`` items, as ``--shape``, which the CLI hands over).
        threads: onnxruntime threads for the calibration run.
    """

    visits_subgraphs = False
    lossy = True  # its outputs differ from the input's: the CLI compares them (graphopt/quick_check.py)
    fidelity_hint = "a lower ratio or sparsity, or reconstruct=true with --calib-data"  # what the CLI suggests when it moved far

    def __init__(
        self,
        *,
        pattern: str = "unstructured",
        sparsity: float = 0.5,
        ratio: float = 0.3,
        norm: str = "auto",
        align: int = 16,
        scope: str = "layer",
        skip: str = DEFAULT_SKIP,
        reconstruct: bool = False,
        data: Any = None,
        samples: int = 16,
        seed: int = 0,
        shapes: list[str] | None = None,
        threads: int | None = 1,
    ) -> None:
        super().__init__()
        named = pattern in ("unstructured", "channel")
        self.n_of_m = parse_n_of_m(pattern) if isinstance(pattern, str) and not named else None
        if not named and self.n_of_m is None:
            raise ValueError(f"pattern must be 'unstructured', 'channel' or N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")
        if norm not in ("auto", "l1", "l2", "activation"):
            raise ValueError(f"norm must be 'auto', 'l1', 'l2' or 'activation', got {norm!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.pattern, self.norm, self.scope = pattern, norm, scope
        self.ratio, self.sparsity = check_number("ratio", ratio, "[0, 1)"), check_number("sparsity", sparsity, "[0, 1)")
        self.align, self.samples, self.seed = check_int("align", align, 1), check_int("samples", samples, 1), check_int("seed", seed, 0)
        self.shapes = check_shapes(shapes)
        self.reconstruct, self.data, self.threads = check_bool("reconstruct", reconstruct), data, check_threads(threads)
        self.skip = check_names("skip", skip)
        self.summary = PruneSummary()

    def details(self) -> dict[str, Any]:
        """The last run's summary for the pipeline ledger, with a one-line ``summary``."""
        return {**dataclasses.asdict(self.summary), "summary": self.summary.line()}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        LiftConstantsPass()(model)  # Paddle-style Constant weights become initializers first
        self.summary = PruneSummary(pattern=self.pattern)
        layers = self._layers(model)
        if not layers:
            return ir.passes.PassResult(model, False)
        if self.pattern == "channel":
            return ir.passes.PassResult(model, self._prune_channels(model, [node for node, _, _ in layers]))
        arrays = [weight.const_value.numpy() for _, weight, _ in layers]  # type: ignore[union-attr]
        masks = self._masks(layers, arrays)
        grams = self._grams(model, layers) if self.reconstruct else {}
        modified = False
        pruned_arrays = []
        for (node, weight, _), array, mask in zip(layers, arrays, masks):
            label = layer_label(node)
            if mask is None:
                self.summary.skipped[label] = f"input channels not divisible by {self.n_of_m[1]}"  # type: ignore[index]
                continue
            pruned = np.where(mask, array, np.zeros((), array.dtype)).astype(array.dtype)
            if np.any(array[~mask] != 0):  # a second run finds its zeros already there
                weight.const_value = ir.Tensor(pruned, name=weight.name)
                modified = True
            self.summary.sparsity[label] = float(1 - mask.mean())
            pruned_arrays.append(pruned)
            if self.reconstruct and np.any(array[~mask] != 0):
                self._refit(node, weight, array, mask, grams)
        if pruned_arrays:
            self.summary.compression = dataclasses.asdict(compression_report(pruned_arrays))
        return ir.passes.PassResult(model, modified)

    def _prune_channels(self, model: ir.Model, producers: list[ir.Node]) -> bool:
        """Structured pruning of every chain that can be followed; returns whether anything shrank."""
        chains, refused = find_chains(model.graph, producers)
        self.summary.skipped.update(refused)
        # Importance from the unpruned model, so the result does not depend on chain order.
        self.summary.norm = self.norm if self.norm != "auto" else ("activation" if self.data is not None else "l1")
        stats = self._consumer_input_stats(model, chains) if self.summary.norm == "activation" else {}
        for chain, reason in [(chain, _nonfinite(chain, stats)) for chain in chains]:
            if reason:  # NaN scores rank nothing, and a NaN mean would go into a bias
                self.summary.skipped[layer_label(chain.producer)] = reason
                chains.remove(chain)
        keeps = []
        for chain in chains:
            scores = activation_importance(chain, stats[chain.output.name]) if stats else weight_importance(chain, self.summary.norm)  # type: ignore[union-attr]
            keeps.append(grouped_keep(scores, _kept_channels(len(scores), self.ratio, self.align), chain.groups))
        self.summary.rounded = self._rounding_note(chains, keeps)
        # The unpruned model is the teacher that reconstruction fits the pruned layers to.
        # clone() shares tensors, so external data keeps its folder (a proto round trip loses it).
        teacher = model.clone() if self.reconstruct and chains else None
        cut: list[Chain] = []
        for chain, keep in zip(chains, keeps):
            channels = chain.channels
            label = layer_label(chain.producer)
            if len(keep) < channels:
                if stats:
                    compensated = compensate_means(chain, keep, stats[chain.output.name])  # type: ignore[union-attr]
                    self.summary.compensated.extend(layer_label(node) for node in compensated)
                prune_chain(chain, keep)
                cut.append(chain)
            self.summary.channels[label] = (channels, len(keep))
        pruned = {id(chain) for chain in cut}
        prune_concat_consumers([(chain, keep) for chain, keep in zip(chains, keeps) if id(chain) in pruned and chain.concat is not None])
        if teacher is not None and cut:
            out_keep = {chain.producer: keep for chain, keep in zip(chains, keeps)}
            samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
            layers, not_built = layers_to_refit(model, cut, self.skip)
            done, refused = refit_in_order(model, teacher, layers, out_keep, samples, self.threads)
            self.summary.reconstructed.extend(done)
            self.summary.not_reconstructed.update({**not_built, **refused})
        return bool(cut)

    def _rounding_note(self, chains: list[Chain], keeps: list) -> str:
        """Says so when align, not ratio, set a layer's share of channels removed (digits_cnn, ratio 0.3: 16 of 32)."""
        shares = [1 - len(keep) / chain.channels for chain, keep in zip(chains, keeps)]
        moved = any(
            _kept_channels(chain.channels, self.ratio, self.align) != _kept_channels(chain.channels, self.ratio, 1)
            and abs(share - self.ratio) > _ROUNDING_NOTED
            for chain, share in zip(chains, shares)
        )
        if not moved:
            return ""
        low, high = min(shares), max(shares)
        removed = f"{low:.0%}" if high - low < 0.005 else f"{low:.0%}-{high:.0%}"
        return f"align={self.align} rounded each layer's cut: {removed} removed for ratio={self.ratio:g}"

    def _consumer_input_stats(self, model: ir.Model, chains: list[Chain]) -> dict[str, FeatureStats]:
        """Mean and spread of each feature of each chain's consumer input, over the calibration samples."""
        stats = {chain.output.name or "": FeatureStats(chain.axis) for chain in chains if chain.output is not None}
        samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
        for tensors in stream_tensors(model, list(stats), samples.calibration(), threads=self.threads):
            for name, feature_stats in stats.items():
                feature_stats.add(tensors[name])
        return stats

    def _grams(self, model: ir.Model, layers: list[tuple[ir.Node, ir.Value, int]]) -> dict[ir.Node, list[np.ndarray]]:
        """Input Gram matrices of the layers that can be refit, even and odd samples apart, from the still unpruned model."""
        fit = [node for node, _, _ in layers if _refittable(node)]
        for node, _, _ in layers:
            if not _refittable(node):
                self.summary.not_reconstructed[layer_label(node)] = f"reconstruction of {node.op_type} is not built"
        if not fit:
            return {}
        samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
        refused = {node: reason for node in fit if (reason := refit_refusal(node))}
        self.summary.not_reconstructed.update({layer_label(node): reason for node, reason in refused.items()})
        fit = [node for node in fit if node not in refused]
        return input_gram_halves(model, fit, samples.calibration(), self.threads) if fit else {}

    def _refit(self, node: ir.Node, weight: ir.Value, original: np.ndarray, mask: np.ndarray, grams: dict[ir.Node, list[np.ndarray]]) -> None:
        """Refits the pruned layer if that lowers its output error on held-out samples (refit_masked.py); else says why not."""
        halves = grams.get(node)
        if halves is None or not _refittable(node):
            return
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        as_kn = (lambda a: a.T) if transposed else (lambda a: a)
        bias_value = _refittable_bias(node, original.shape[0] if transposed else original.shape[1])
        bias = bias_value.const_value.numpy() if bias_value is not None else None  # type: ignore[union-attr]
        result = checked_refit(halves, as_kn(original), bias, as_kn(mask))
        if isinstance(result, str):
            self.summary.not_reconstructed[layer_label(node)] = result
            return
        new_weight, new_bias = result
        weight.const_value = ir.Tensor(np.ascontiguousarray(as_kn(new_weight)), name=weight.name)
        if bias_value is not None and new_bias is not None:
            bias_value.const_value = ir.Tensor(new_bias, name=bias_value.name)
        self.summary.reconstructed.append(layer_label(node))

    def _masks(self, layers: list[tuple[ir.Node, ir.Value, int]], arrays: list[np.ndarray]) -> list[np.ndarray | None]:
        if self.n_of_m is not None:
            n, m = self.n_of_m
            return [n_of_m_mask(array, n, m, axis) for (_, _, axis), array in zip(layers, arrays)]
        if self.scope == "global":
            return list(global_threshold_masks(arrays, self.sparsity))
        return [unstructured_mask(array, self.sparsity) for array in arrays]

    def _layers(self, model: ir.Model) -> list[tuple[ir.Node, ir.Value, int]]:
        """(node, weight, input-channel axis) of every layer to prune, in graph order."""
        graph = model.graph
        candidates = [node for node in graph if node.op_type in _TARGET_OPS and node.domain in _ONNX_DOMAINS]
        default_skips = _default_skips(graph, candidates) if DEFAULT_SKIP in self.skip else {}
        self.summary.unmatched_skip = unmatched_names("prune", "skip", self.skip, model, keywords=(DEFAULT_SKIP,))
        if self.skip and DEFAULT_SKIP not in self.skip:
            replaced = [node for node in _default_skips(graph, candidates) if node.name not in self.skip and node.op_type not in self.skip]
            self.summary.defaults_replaced = [layer_label(node) for node in replaced]
        layers = []
        for node in candidates:
            label = layer_label(node)
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if node.name in self.skip or node.op_type in self.skip:
                self.summary.skipped[label] = "skip option"
            elif node in default_skips:
                self.summary.skipped[label] = default_skips[node]
            elif left_constant(node):
                self.summary.skipped[label] = "the constant is the left operand (W @ x): only x @ W is pruned"
            elif weight is not None and weight.is_graph_input():
                self.summary.skipped[label] = GRAPH_INPUT_WEIGHT
            elif quantized := quantized_weight(weight, "prune"):
                self.summary.skipped[label] = quantized
            elif weight is None or weight.const_value is None:
                self.summary.skipped[label] = "no constant weight (it is computed, as attention's operands are)"
            elif weight.const_value.dtype not in _FLOAT:
                self.summary.skipped[label] = "weight is not a float initializer"
            elif any(user is not node for user, _ in weight.uses()):
                self.summary.skipped[label] = "weight shared with other nodes"
            elif bad := nonfinite_count(weight.const_value.numpy()):
                self.summary.skipped[label] = f"weight has {bad} NaN/Inf values"
            elif (axis := _input_axis(node, weight.const_value.shape.numpy())) is None:
                self.summary.skipped[label] = "weight layout not understood"
            else:
                layers.append((node, weight, axis))
        return layers


def _nonfinite(chain: Chain, stats: dict[str, FeatureStats]) -> str | None:
    """Why NaN/Inf leave ``chain`` whole: in a consumer's weight, or in its channels on the calibration data (``stats``)."""
    for user in chain.consumers:
        if bad := nonfinite_count(user.inputs[1].const_value.numpy()):  # type: ignore[union-attr]
            return f"weight of {user.name or user.op_type}, which reads its channels, has {bad} NaN/Inf values"
    if stats and not stats[chain.output.name or ""].finite:  # type: ignore[union-attr]
        return "its output holds NaN/Inf on the calibration data"
    return None


def _kept_channels(channels: int, ratio: float, align: int) -> int:
    """How many of ``channels`` to keep: ``1 - ratio`` of them, rounded to a multiple of ``align`` when it divides them."""
    kept = max(1, int(round(channels * (1 - ratio))))
    if align > 1 and channels % align == 0:
        kept = min(channels, max(align, int(round(kept / align)) * align))
    return kept


def _default_skips(graph: ir.Graph, candidates: list[ir.Node]) -> dict[ir.Node, str]:
    """The first Conv, and the last weighted layer before each graph output.

    The last one is the latest in graph order of the weighted layers an
    output reaches without passing another: in a transformer the residual
    stream reaches every block's output projection that way, and only the
    final block's is the "classifier".
    """
    skips: dict[ir.Node, str] = {}
    convs = [node for node in candidates if node.op_type == "Conv"]
    if convs:
        skips[convs[0]] = "first conv (default skip)"
    position = {node: index for index, node in enumerate(candidates)}  # candidates are in graph order
    for output in graph.outputs:
        seen, stack, reached = set(), [output.producer()], []
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in position:
                reached.append(node)
                continue
            stack.extend(value.producer() for value in node.inputs if value is not None)
        if reached:
            skips.setdefault(max(reached, key=position.__getitem__), "final classifier (default skip)")
    return skips


def _input_axis(node: ir.Node, shape: tuple[int, ...]) -> int | None:
    """The weight axis that runs over input channels (where N:M groups are taken)."""
    if node.op_type == "Conv":
        return 1 if len(shape) >= 3 else None
    if node.op_type == "ConvTranspose":
        return 0 if len(shape) >= 3 else None
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "MatMul":
        return 0 if len(shape) == 2 else None
    return None


def _refittable(node: ir.Node) -> bool:
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not node.attributes.get_int("transA", 0))


def _refittable_bias(node: ir.Node, outputs: int) -> ir.Value | None:
    """A Gemm's C when it is a constant [N] vector read only here with beta = 1 (refit with the weight)."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = node.inputs[2]
    if bias.const_value is None or tuple(bias.const_value.shape.numpy()) != (outputs,) or node.attributes.get_float("beta", 1.0) != 1.0:
        return None
    return bias if all(user is node for user, _ in bias.uses()) else None

"""``lowrank``: low-rank decomposition of MatMul/Gemm weights and Conv kernels.

A layer y = x W (+ b) with W [k, n] becomes y = (x A) B (+ b) with A [k, r]
and B [r, n]; it pays when r (k + n) < k n. A group-1 Conv kernel
W [O, I, kh, kw] becomes either three convs (``conv=tucker``: 1x1 reduce to
r_in channels, the kh x kw core r_in -> r_out with the original strides,
pads and dilations, 1x1 expand with the bias) or two (``conv=channel``: a
kh x kw conv with r filters, then a 1x1 conv with the bias). 1x1 kernels are
always factored as matrices (two 1x1 convs): a Tucker core would be a third.
Factors are exact at full rank; a layer is rewritten only if it saves
``min_gain`` of its weight parameters.

Error model: plain SVD keeps the best rank-r approximation of each weight;
its relative weight error is sqrt(sum of the dropped s_i^2 / sum of all
s_i^2), and the layer's output error follows it for isotropic inputs. Real
activations are far from isotropic, so ``data_aware`` weighs the weight
error by the layer's input Gram matrix (see factor.py) and minimizes the
output error on calibration data instead. With ``sequential`` (the default
when data-aware) each layer is fit, in graph order, on the inputs the
already-factored model gives it against the original layer's output (see
sequential.py), so a layer absorbs part of the error upstream of it instead
of adding to it; without it, errors of successive layers add up. Nothing
here re-trains.
"""

from __future__ import annotations

__all__ = ["LowRankPass", "LowRankSummary"]

import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.progress import report
from graphopt.runtime import stream_tensors
from passes.held_back import NOT_MEASURED, ONE_SAMPLE, judge, reference_outputs
from passes.lift_constants import LiftConstantsPass
from passes.lowrank import allocate, factor, speed
from passes.lowrank.layers import Layer, find_layers, fits_data, label
from passes.lowrank.refit import refit_last_factors
from passes.lowrank.rewrite import Chain, Step, copy_attributes
from passes.lowrank.sequential import factor_in_order
from passes.options import (
    check_bool,
    check_int,
    check_names,
    check_number,
    check_shapes,
    check_threads,
    unmatched_names,
)
from passes.prune.layer_checks import NONFINITE_INPUTS, finite
from passes.prune.reconstruct import input_gram
from passes.qdq.samples import Samples
from passes.qdq.summary import counted

logger = logging.getLogger(__name__)

_CONV_MODES = ("tucker", "channel")
_CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


@dataclass
class LowRankSummary:
    """Per-layer ranks and parameter counts, and what was skipped and why."""

    decomposed: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)  # with target_cosine: what the allocation reached
    # With target_cosine or scope=global: each layer's output drift (1 - cosine) factored alone at its middle rung.
    sensitivity: dict[str, float] = field(default_factory=dict)
    reconstructed: list[str] = field(default_factory=list)  # last factors refit (reconstruct)
    not_reconstructed: dict[str, str] = field(default_factory=dict)
    unmatched_skip: list[str] = field(default_factory=list)  # skip= entries that name no node or op type

    def line(self) -> str:
        before = sum(entry["params_before"] for entry in self.decomposed.values())
        after = sum(entry["params_after"] for entry in self.decomposed.values())
        if self.decomposed:
            ranks = [rank for entry in self.decomposed.values() for rank in entry["ranks"]]
            parts = [f"{counted(len(self.decomposed), 'layer')} factored (ranks {min(ranks)}-{max(ranks)}), weights {before} -> {after} params"]
        else:
            parts = ["no layer factored"]
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            parts.append(f"{len(self.skipped)} skipped ({'; '.join(reasons[:4])}{'; ...' if len(reasons) > 4 else ''})")
        if self.reconstructed or self.not_reconstructed:
            parts.append(f"{len(self.reconstructed)} refit to the original outputs")
        if self.sensitivity and not self.fidelity:
            parts.append(f"ranks spread across layers by the output drift measured on each ({counted(len(self.sensitivity), 'layer')})")
        if self.fidelity:
            parts.append(self._fidelity_text())
        if self.unmatched_skip:
            parts.append(f"skip entries matching no node or op type: {', '.join(self.unmatched_skip)}")
        return ", ".join(parts)

    def _fidelity_text(self) -> str:
        cosine, bound, target = self.fidelity["cosine"], self.fidelity["lower_bound"], self.fidelity["target_cosine"]
        if math.isnan(cosine):
            return f"output cosine {NOT_MEASURED} (target {target:g})"
        if self.fidelity.get("samples") == 1:  # no spread to allow for: the bound is the figure itself
            return f"output cosine {cosine:.5f} on held-back samples ({ONE_SAMPLE}; target {target:g})"
        return f"output cosine {cosine:.5f} on held-back samples, at least {bound:.5f} allowing for their spread (target {target:g})"


class LowRankPass(ir.passes.InPlacePass):
    """Factors MatMul/Gemm weights and group-1 Conv kernels into low-rank chains.

    Options (keyword-only):
        ratio: Share of each layer's weight parameters the factors keep
            (2-D: r = floor(ratio k n / (k + n)), at least 1); with
            ``scope=global``, of all the layers' together.
        scope: ``layer`` (each layer keeps ``ratio``) or ``global``: the
            layers together keep ``ratio`` of their weight parameters, ranks
            spread by allocate.py, cheapest measured output drift per saved
            parameter first; a layer may stay whole while another loses
            more. Costs one calibration run per layer.
        energy: If given, instead of ``ratio``: the smallest rank whose squared
            singular values hold this share of the total (per channel mode for
            Tucker; of the whitened weight when ``data_aware``).
        rank: If given, instead of both: one rank for every layer (capped at
            the layer's full rank; both Tucker ranks).
        min_gain: Factor a layer only if that saves at least this share of
            its weight parameters. Negative values allow factorizations that
            grow the layer (full-rank checks).
        conv: ``tucker`` (Tucker-2, three convs) or ``channel`` (two convs).
        data_aware: Fit MatMul/Gemm and ``channel`` conv factors to the
            layer's calibration activations (see factor.py); Tucker stays
            plain HOSVD.
        sequential: With ``data_aware`` (not ``target_cosine``): fit the
            layers in graph order, each on the inputs the model factored so
            far gives it, against the original layer's output (see
            sequential.py). One calibration run per level of independent
            layers instead of one in all.
        skip: Comma-separated node names or op types to leave alone.
        target_cosine: If given, ignore ``ratio``/``energy``/``rank`` and
            allocate ranks across layers (see allocate.py) until the model's
            output cosine on held-back calibration samples (every fourth,
            never fitted to) would drop below this.
        reconstruct: After factoring, refit each layer's last factor (and
            bias) in graph order on the inputs the factored model really
            gives it, against the original layer's outputs on calibration
            data (see refit.py).
        check_speed: Time each layer alone on onnxruntime CPU at its real
            input shape, dense against its factors, and keep it dense unless
            factoring is faster (see speed.py).
        data: Calibration feeds for ``data_aware`` (as for ``qdq``); None
            synthesizes ``samples`` feeds with ``seed``, dynamic dims from
            ``shapes`` (``NAME:DIMS`` items, as ``--shape``, which the CLI hands over).
        threads: onnxruntime threads for the calibration run.
    """

    visits_subgraphs = False
    lossy = True  # its outputs differ from the input's: the CLI compares them (graphopt/quick_check.py)
    fidelity_hint = "target_cosine=0.98 with data_aware=true picks the ranks that keep it"  # what the CLI suggests when it moved far

    def __init__(
        self,
        *,
        ratio: float = 0.5,
        energy: float | None = None,
        rank: int | None = None,
        scope: str = "layer",
        min_gain: float = 0.1,
        conv: str = "tucker",
        data_aware: bool = False,
        sequential: bool = True,
        skip: str = "",
        target_cosine: float | None = None,
        reconstruct: bool = False,
        check_speed: bool = True,
        data: Any = None,
        samples: int = 16,
        seed: int = 0,
        shapes: list[str] | None = None,
        threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.ratio, self.min_gain = check_number("ratio", ratio, "(0, 1]"), check_number("min_gain", min_gain, "(-inf, 1)")
        self.energy = None if energy is None else check_number("energy", energy, "(0, 1]")
        self.rank = None if rank is None else check_int("rank", rank, 1)
        self.target_cosine = None if target_cosine is None else check_number("target_cosine", target_cosine, "(0, 1]")
        if energy is not None and rank is not None:
            raise ValueError("give at most one of energy and rank")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and (energy is not None or rank is not None):
            raise ValueError("scope=global spreads a share of the parameters (ratio); energy and rank are per layer")
        if conv not in _CONV_MODES:
            raise ValueError(f"conv must be 'tucker' or 'channel', got {conv!r}")
        self.scope, self.conv = scope, conv
        self.data_aware, self.sequential = check_bool("data_aware", data_aware), check_bool("sequential", sequential)
        self.reconstruct, self.check_speed = check_bool("reconstruct", reconstruct), check_bool("check_speed", check_speed)
        self.data, self.samples, self.seed, self.threads = data, check_int("samples", samples, 1), check_int("seed", seed, 0), check_threads(threads)
        self.shapes = check_shapes(shapes)
        self.skip = check_names("skip", skip)
        self._factored_outputs: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._ranks: dict[str, tuple[int, ...]] | None = None  # scope=global: the ranks the budget gives
        self.summary = LowRankSummary()

    def details(self) -> dict[str, Any]:
        """The last run's summary for the pipeline ledger, with a one-line ``summary``."""
        return {**dataclasses.asdict(self.summary), "summary": self.summary.line()}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        LiftConstantsPass()(model)  # Constant-node weights become initializers first
        self.summary = LowRankSummary()
        self.summary.unmatched_skip = unmatched_names("lowrank", "skip", self.skip, model)
        layers = find_layers(model.graph, self.skip, self.conv, self.summary.skipped)
        if not layers:
            return ir.passes.PassResult(model, False)
        self._shapes = self._input_shapes(model, layers) if self.check_speed else {}
        # clone() shares tensors, so external data keeps its folder (a proto round trip loses it).
        teacher = model.clone() if self.reconstruct else None
        self._factored_outputs = []
        self._ranks = None
        if self.target_cosine is None and self.scope == "global":
            self._ranks = self._spread(model, layers)
        if self.target_cosine is not None:
            modified = self._allocate(model, layers)
        elif self.data_aware and self.sequential:
            modified = self._factor_sequentially(model, layers)
        else:
            fits = self._grams(model, layers) if self.data_aware else {}
            chain = Chain(model.graph)
            modified = False
            for layer in self._unskipped(layers):
                modified |= self._try_factor(layer, fits.get(label(layer.node)), chain)
        if teacher is not None and modified:
            samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
            done, refused = refit_last_factors(model, teacher, self._factored_outputs, samples, self.threads)
            self.summary.reconstructed, self.summary.not_reconstructed = done, refused
        if modified:
            _record_factors(model, self.summary.decomposed)
        return ir.passes.PassResult(model, modified)

    def _allocate(self, model: ir.Model, layers: list[Layer]) -> bool:
        """Factors the layers at the ranks that keep the most steps of allocate.plan within ``target_cosine``."""
        samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=True, shapes=self.shapes)
        fits = self._grams(model, layers, samples) if self.data_aware else {}
        layers = self._unskipped(layers)
        ladders = self._measured_ladders(model, layers, fits, samples)
        steps = allocate.plan(ladders, {label(layer.node): layer.params for layer in layers})
        expected = reference_outputs(model, samples.held_back, self.threads)
        judged = {0: (1.0, 1.0)}
        bisections = max(1, len(steps)).bit_length()  # what most_steps takes, at most

        def meets(count: int) -> bool:
            report(len(judged) - 1, bisections, "rank allocations tried")
            trial = self._trial(model, allocate.allocation(steps[:count]), fits)
            # The bound, not the cosine: the most steps that meet the target are selected to sit just above it (passes/held_back.py).
            result = judge(trial, samples.held_back, expected, self.threads)
            judged[count] = (result.cosine, result.lower_bound)
            logger.info("lowrank: %d of %d rank steps -> held-back cosine %.5f (bound %.5f)", count, len(steps), *judged[count])
            return result.lower_bound >= self.target_cosine  # type: ignore[operator]

        best = allocate.most_steps(len(steps), meets)
        ranks = allocate.allocation(steps[:best])
        for layer in layers:
            if label(layer.node) not in ranks:
                self.summary.skipped.setdefault(label(layer.node), f"kept whole to reach cosine {self.target_cosine:g}")
        cosine, bound = judged[best]
        self.summary.fidelity = {
            "target_cosine": self.target_cosine, "cosine": cosine, "lower_bound": bound, "steps": best, "of": len(steps),
            "samples": len(samples.held_back),
        }
        return self._factor_at(model, ranks, fits)

    def _spread(self, model: ir.Model, layers: list[Layer]) -> dict[str, tuple[int, ...]]:
        """scope=global: the ranks at which the layers together keep ``ratio`` of their parameters, cheapest drift first."""
        samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
        fits = self._grams(model, layers, samples) if self.data_aware else {}
        layers = self._unskipped(layers)
        ladders = self._measured_ladders(model, layers, fits, samples)
        dense = {label(layer.node): layer.params for layer in layers}
        steps = allocate.plan(ladders, dense)
        ranks = allocate.allocation(steps[: allocate.steps_within(steps, dense, self.ratio * sum(dense.values()))])
        for name in dense:
            if name not in ranks:
                self.summary.skipped[name] = "kept whole: scope=global spends the parameter budget on layers that drift less"
        return ranks

    def _measured_ladders(self, model: ir.Model, layers: list[Layer], fits: dict[str, factor.Fit], samples: Samples) -> list[list[allocate.Step]]:
        """Each layer's ladder, its predicted errors rescaled to the output drift measured with it alone factored (allocate.py).

        The drift is measured on the first calibration samples, never on held-back ones: those judge the result.
        """
        probes = list(itertools.islice(samples.calibration(), _PROBE_SAMPLES))
        expected = reference_outputs(model, probes, self.threads)
        ladders = []
        for index, layer in enumerate(layers):
            report(index, len(layers), "output drift per layer")
            name = label(layer.node)
            rungs = allocate.rungs(layer, fits.get(name), self.min_gain)
            reference = allocate.reference_rung(rungs, layer.params)
            if reference is not None:
                trial = self._trial(model, {name: reference[0]}, fits)
                result = judge(trial, probes, expected, self.threads)
                drift = max(1.0 - result.cosine, 0.0) if result.measured else 0.0  # nothing finite to compare: no drift seen
                self.summary.sensitivity[name] = drift
                rungs = allocate.rescaled(rungs, reference, drift)
            ladders.append(allocate.ladder(name, rungs, layer.params))
        logger.info("lowrank: output drift measured for %d layers", len(self.summary.sensitivity))
        return ladders

    def _trial(self, model: ir.Model, ranks: dict[str, tuple[int, ...]], fits: dict[str, factor.Fit]) -> ir.Model:
        """A copy of ``model`` with the layers in ``ranks`` factored at them: no timing, nothing recorded."""
        trial = model.clone()
        kept = self.summary, self._shapes, self._factored_outputs
        self.summary, self._shapes, self._factored_outputs = LowRankSummary(), {}, []
        try:
            self._factor_at(trial, ranks, fits)
        finally:
            self.summary, self._shapes, self._factored_outputs = kept
        return trial

    def _factor_sequentially(self, model: ir.Model, layers: list[Layer]) -> bool:
        """Factors the layers sequential.py can fit in graph order on the partly factored model; the others plainly, first."""
        teacher = model.clone()
        chain = Chain(model.graph)
        fit = [layer for layer in layers if fits_data(layer)]
        modified = False
        for layer in layers:
            if not fits_data(layer):
                modified |= self._try_factor(layer, None, chain)
        if fit:
            samples = Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
            modified |= factor_in_order(
                model, teacher, fit, samples, self.threads, lambda layer, fitted: self._try_factor(layer, fitted, chain), self.summary.skipped
            )
        return modified

    def _input_shapes(self, model: ir.Model, layers: list[Layer]) -> dict[str, tuple[int, ...]]:
        """The input shape of every layer on the first calibration sample (what check_speed times it at)."""
        first = next(Samples(model, self.data, count=1 if self.data is None else self.samples, seed=self.seed, hold_back=False, shapes=self.shapes).calibration())
        names = [layer.node.inputs[0].name or "" for layer in layers]
        tensors = next(stream_tensors(model, names, [first], threads=self.threads))
        return {label(layer.node): tuple(tensors[name].shape) for layer, name in zip(layers, names) if name in tensors}

    def _factor_at(self, model: ir.Model, ranks: dict[str, tuple[int, ...]], fits: dict[str, factor.Fit]) -> bool:
        """Factors the layers of ``model`` named in ``ranks`` at those ranks; returns whether any was."""
        chain = Chain(model.graph)
        modified = False
        for layer in find_layers(model.graph, self.skip, self.conv, {}, only=frozenset(ranks)):
            name = label(layer.node)
            modified |= self._try_factor(layer, fits.get(name), chain, list(ranks[name]))
        return modified

    def _grams(self, model: ir.Model, layers: list[Layer], samples: Samples | None = None) -> dict[str, factor.Fit]:
        """The data-aware fit of each layer on its inputs' X^T X in the unfactored model, by label; none where X holds NaN/Inf (skipped)."""
        fit = {layer.node: layer for layer in layers if fits_data(layer)}
        if not fit:
            return {}
        samples = samples or Samples(model, self.data, count=self.samples, seed=self.seed, hold_back=False, shapes=self.shapes)
        grams = input_gram(model, list(fit), samples.calibration(), self.threads)
        for node in [node for node, gram in grams.items() if not finite(gram)]:
            self.summary.skipped[label(node)] = f"{NONFINITE_INPUTS} (no data-aware fit)"
            grams.pop(node)
        return {label(node): factor.fit(fit[node].matrix, gram[:-1, :-1]) for node, gram in grams.items()}

    def _unskipped(self, layers: list[Layer]) -> list[Layer]:
        """The layers not yet left whole (by :meth:`_grams`: NaN/Inf calibration inputs)."""
        return [layer for layer in layers if label(layer.node) not in self.summary.skipped]

    def _try_factor(self, layer: Layer, fitted: factor.Fit | None, chain: Chain, ranks: list[int] | None = None) -> bool:
        """Factors one layer (at ``ranks`` if given) if that saves ``min_gain`` of its parameters; returns whether it did."""
        name = label(layer.node)
        if ranks is None and self._ranks is not None:
            if name not in self._ranks:
                return False  # scope=global left it whole (the reason is in summary.skipped)
            ranks = list(self._ranks[name])
        if layer.kind == "tucker":
            ranks = ranks or self._tucker_ranks(layer.kernel)
            r_out, r_in = ranks
            out_channels, in_channels, kh, kw = layer.kernel.shape
            params = in_channels * r_in + r_out * r_in * kh * kw + r_out * out_channels
            method = "tucker2"
        else:
            k, n = layer.matrix.shape
            ranks = ranks or [self._matrix_rank(layer.matrix, fitted)]
            params = ranks[0] * (k + n)
            method = "svd" if fitted is None else "data-aware svd"
            if layer.node.op_type == "Conv" and layer.kernel.shape[2:] == (1, 1) and self.conv == "tucker":
                method += " (1x1 kernel)"
        if params > (1 - self.min_gain) * layer.params:
            self.summary.skipped[name] = f"rank {'x'.join(map(str, ranks))} would not save {self.min_gain:g} of the parameters"
            logger.debug("lowrank: %s left whole: %s", name, self.summary.skipped[name])
            return False
        steps = self._tucker_steps(layer, *ranks) if layer.kind == "tucker" else self._matrix_steps(layer, ranks[0], fitted, chain)
        timing = {}
        if name in self._shapes:
            dense, factored = self._times(layer, ranks, steps, self._shapes[name])
            timing = {"dense_us": round(dense * 1e6, 2), "factored_us": round(factored * 1e6, 2)}
            if factored >= dense:
                self.summary.skipped[name] = f"factored layer not faster on onnxruntime CPU ({factored * 1e6:.0f} us vs {dense * 1e6:.0f} us dense)"
                return False
        self._factored_outputs.append(layer.node.outputs[0].name or "")
        chain.replace(layer.node, steps, layer.dtype)
        self.summary.decomposed[name] = {
            "op": layer.node.op_type,
            "method": method,
            "ranks": list(ranks),
            "params_before": layer.params,
            "params_after": params,
            **timing,
        }
        logger.debug("lowrank: %s factored at rank %s", name, ranks)
        return True

    def _times(self, layer: Layer, ranks: list[int], steps: list[Step], shape: tuple[int, ...]) -> tuple[float, float]:
        """Seconds of the dense layer and of its factors, each timed alone on ``shape`` (see speed.py)."""
        if layer.node.op_type != "Conv":
            return speed.matmul_times(int(np.prod(shape[:-1])), *layer.matrix.shape, ranks[0], self.threads)
        dense = (tuple(layer.kernel.shape), _attribute_values(layer.node, _CONV_ATTRIBUTES), len(_bias(layer.node)) > 0)
        chain = [(tuple(step.weight.shape), {attr.name: attr.value for attr in step.attributes}, bool(step.extra_inputs)) for step in steps]
        return speed.conv_times(shape, dense, chain, self.threads)

    def _matrix_rank(self, matrix: np.ndarray, fitted: factor.Fit | None) -> int:
        k, n = matrix.shape
        if self.rank is not None:
            return min(self.rank, k, n)
        if self.energy is not None:
            values = factor.singular_values(matrix) if fitted is None else fitted.singular_values()
            return factor.energy_rank(values, self.energy)
        return min(factor.matrix_rank_for_ratio(k, n, self.ratio), k, n)

    def _matrix_steps(self, layer: Layer, rank: int, fitted: factor.Fit | None, chain: Chain) -> list[Step]:
        """Two-factor chain for MatMul, Gemm and ``channel``/1x1 Conv: y = (x A) B."""
        a, b = factor.svd_factors(layer.matrix, rank) if fitted is None else fitted.factors(rank)
        node = layer.node
        if node.op_type == "MatMul":
            return [Step("a", "MatMul", a), Step("b", "MatMul", b)]
        if node.op_type == "Gemm":
            # The first factor is a MatMul: a Gemm without C is invalid before opset 11 (resnet50's is 9).
            return [Step("a", "MatMul", a), Step("b", "Gemm", b, *_gemm_bias(node, chain))]
        # Conv: the columns of A are r filters over the input patch, B^T is a 1x1 conv with the bias.
        kernel = layer.kernel
        first = Step("a", "Conv", a.T.reshape(rank, *kernel.shape[1:]), attributes=copy_attributes(node, _CONV_ATTRIBUTES))
        return [first, Step("b", "Conv", b.T.reshape(kernel.shape[0], rank, 1, 1), _bias(node))]

    def _tucker_ranks(self, kernel: np.ndarray) -> list[int]:
        out_channels, in_channels, kh, kw = kernel.shape
        if self.rank is not None:
            return [min(self.rank, out_channels), min(self.rank, in_channels)]
        if self.energy is not None:
            out_values, in_values = factor.mode_singular_values(kernel)
            return [factor.energy_rank(out_values, self.energy), factor.energy_rank(in_values, self.energy)]
        return list(factor.tucker_ranks_for_ratio(out_channels, in_channels, kh * kw, self.ratio))

    def _tucker_steps(self, layer: Layer, r_out: int, r_in: int) -> list[Step]:
        """Reduce (1x1) -> core (kh x kw, the original geometry) -> expand (1x1, with the bias)."""
        out_channels, in_channels = layer.kernel.shape[:2]
        u_in, core, u_out = factor.tucker2(layer.kernel, r_out, r_in)
        return [
            Step("reduce", "Conv", u_in.T.reshape(r_in, in_channels, 1, 1)),
            Step("core", "Conv", core, attributes=copy_attributes(layer.node, _CONV_ATTRIBUTES)),
            Step("expand", "Conv", u_out.reshape(out_channels, r_out, 1, 1), _bias(layer.node)),
        ]


FACTORS_KEY = "graphopt.lowrank"
_PROBE_SAMPLES = 4  # calibration samples a layer's output drift is measured on


def _record_factors(model: ir.Model, decomposed: dict[str, dict[str, Any]]) -> None:
    """Adds each factored layer's method and ranks to the model metadata, so the saved file says what was done to it."""
    recorded = json.loads(model.metadata_props.get(FACTORS_KEY) or "{}")
    recorded.update({name: {"method": entry["method"], "ranks": entry["ranks"]} for name, entry in decomposed.items()})
    model.metadata_props[FACTORS_KEY] = json.dumps(recorded, sort_keys=True)


def _attribute_values(node: ir.Node, names: tuple[str, ...]) -> dict[str, object]:
    return {name: node.attributes[name].value for name in names if name in node.attributes}


def _bias(node: ir.Node) -> list[ir.Value | None]:
    return [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []


def _gemm_bias(node: ir.Node, chain: Chain) -> tuple[list[ir.Value | None], list[ir.Attr]]:
    """The second Gemm's C and attributes: beta folds into a constant C, else it stays an attribute."""
    bias = _bias(node)
    beta = node.attributes.get_float("beta", 1.0)
    if not bias or beta == 1.0:
        return bias, []
    value = bias[0]
    if value is not None and value.const_value is not None and not value.is_graph_input():
        array = value.const_value.numpy()
        return [chain.constant(f"{value.name}_lowrank_beta", (beta * array.astype(np.float64)).astype(array.dtype))], []
    return bias, [ir.AttrFloat32("beta", beta)]

"""The ``qdq`` pass's account of a run: what was quantized, what stayed float and why, and one line for people."""

from __future__ import annotations

__all__ = ["QuantizationSummary", "counted", "ALREADY_QUANTIZED"]

import math
from collections import Counter
from dataclasses import dataclass, field

from passes.held_back import NOT_MEASURED

# The reason placement gives a layer of a model that is QDQ already.
ALREADY_QUANTIZED = "already quantized"


def counted(number: int, noun: str) -> str:
    """``1 layer``, ``2 layers``: a count for a summary line (prune and lowrank use it too)."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


@dataclass
class QuantizationSummary:
    """What the pass did, for its caller and the ledger's reader."""

    quantized: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # float layers whose weights are stored as int8 (storage.py)
    gptq: list[str] = field(default_factory=list)  # quantized layers whose weights GPTQ rounded (gptq.py)
    corrected: list[str] = field(default_factory=list)  # layers whose bias absorbed the rounding shift
    float_layers: dict[str, str] = field(default_factory=dict)  # node -> why it stayed float
    float_activations: dict[str, str] = field(default_factory=dict)  # tensor -> why it has no Q/DQ
    nonfinite_activations: dict[str, int] = field(default_factory=dict)  # tensor -> NaN/Inf values calibration ignored
    unmatched_exclude: list[str] = field(default_factory=list)  # exclude= entries that name no node or op type
    activations: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    float_subgraph_nodes: int = 0
    fidelity: dict[str, float] = field(default_factory=dict)  # with "samples": how many judged it
    fidelity_samples: str = ""  # "held back" (calibration never read them) or "calibration" (too few to spare any)
    latency_ratio: float | None = None
    backed_off: str = ""
    advice: str = ""  # set when the result is far from the float model and no target was given

    def line(self) -> str:
        """One line a person reads after the run."""
        if self.backed_off:
            return self.backed_off + (f", {self._stored_text()}" if self.stored else "")
        already = [label for label, reason in self.float_layers.items() if reason == ALREADY_QUANTIZED]
        if already and not self.quantized and len(already) == len(self.float_layers):
            # A QDQ model given again: its layers are int8 already, not "kept float".
            return f"nothing to quantize: {counted(len(already), 'layer')} already quantized"
        parts = [f"{counted(len(self.quantized), 'layer')} quantized" + (f" ({len(self.gptq)} GPTQ-rounded)" if self.gptq else "")]
        if self.float_layers:
            # Grouped without their per-layer details, such as kernel timings: the ledger keeps those.
            reasons = Counter(reason.split(" (")[0] for reason in self.float_layers.values())
            grouped = "; ".join(f"{count} {reason}" if count > 1 else reason for reason, count in sorted(reasons.items()))
            parts.append(f"{len(self.float_layers)} kept float ({grouped})")
        if self.stored:
            parts.append(f"{len(self.stored)} of them with int8-stored weights")
        if self.weight_bytes_after:
            parts.append(f"weights {self.weight_bytes_before / self.weight_bytes_after:.1f}x smaller")
        if "cosine" in self.fidelity and math.isnan(self.fidelity["cosine"]):
            parts.append(f"output cosine {NOT_MEASURED}")
        elif "cosine" in self.fidelity:
            on = f" {self.judged_text()}" if self.fidelity_samples == "calibration" else ""
            parts.append(f"output cosine {self.fidelity['cosine']:.5f}{on}" + (f" ({self.advice})" if self.advice else ""))
        if self.latency_ratio is not None:
            parts.append(f"latency {self.latency_ratio:.2f}x float")
        if self.float_subgraph_nodes:
            parts.append(f"{counted(self.float_subgraph_nodes, 'node')} in If/Loop bodies stay{'s' if self.float_subgraph_nodes == 1 else ''} float")
        if self.nonfinite_activations:
            parts.append(f"NaN/Inf ignored in calibrating {counted(len(self.nonfinite_activations), 'tensor')}")
        if self.float_activations:
            parts.append(f"{counted(len(self.float_activations), 'tensor')} kept float ({'; '.join(sorted(set(self.float_activations.values())))})")
        if self.unmatched_exclude:
            parts.append(f"exclude entries matching no node or op type: {', '.join(self.unmatched_exclude)}")
        return ", ".join(parts)

    def judged_text(self) -> str:
        """Which samples the fidelity figures come from, as the summary words it."""
        count = int(self.fidelity.get("samples", 0))
        if self.fidelity_samples == "calibration":
            return f"on {count} calibration sample{'s' if count != 1 else ''}"
        return "on held-back samples"

    def _stored_text(self) -> str:
        ratio = self.weight_bytes_before / self.weight_bytes_after if self.weight_bytes_after else 1.0
        latency = f", latency {self.latency_ratio:.2f}x float" if self.latency_ratio is not None else ""
        layers = counted(len(self.stored), "layer")
        return f"with the weights of {layers} stored as int8 ({ratio:.1f}x smaller){latency}"

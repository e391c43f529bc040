"""The fidelity report: one JSON document, a terminal table, and a Markdown/HTML page.

JSON schema ``graphopt.fidelity/1`` (keys of ``FidelityReport.to_dict()``):

- ``schema``: ``"graphopt.fidelity/1"``; ``passed``: bool.
- ``reference`` / ``candidate``: ``{path, bytes, nodes, parameter_bytes}``
  (``path`` and ``bytes`` are null for in-memory models).
- ``tolerance``: ``{atol, rtol, min_cosine, min_snr_db, description}``.
- ``data``: ``{source, samples, seed}``; ``optimization``: onnxruntime level name.
- ``cuda_tf32``: whether CUDA ran float32 MatMul/Conv in TF32 (``--tf32``).
- ``providers``: ``[{name, ort_name, available, reason}]``.
- ``outputs``: one entry per (provider, output): ``{provider, output, samples,
  elements, max_abs, mean_abs, rel_l2, cosine, snr_db, nan_reference,
  inf_reference, nan_candidate, inf_candidate, violations, top1, top5, passed,
  reason}``. Non-finite floats are written as the strings ``"inf"``, ``"-inf"``,
  ``"nan"``.
- ``noise_floor``: the same entries comparing the *reference* on CPU with the
  reference on each other provider (the provider's own numeric noise).
- ``task``: null, or ``{metric, reference, candidate, drop}`` plus
  ``samples`` (a metric callback) or ``labelled rows`` (top-1 accuracy from
  ``labels`` in the data).
- ``per_layer``: null, or ``{provider, samples, compared, first_divergent,
  layers}``; each layer is ``{reference_tensor, candidate_tensor, node, op}``
  plus the output metrics.
- ``latency``: null, or ``{provider, threads, warmup, repeats,
  reference_ms, candidate_ms, ratio}`` (ratio = candidate / reference).
- ``size``: ``{reference_bytes, candidate_bytes, ratio}`` (bytes on disk,
  external data included; null for in-memory models).
- ``ledger``: null, or the pass ledger rows; ``bisection``: null, or
  ``{first_failing_pass, step, checked}``.
- ``warnings``: ``[{model, kind, items, message}]`` about either model
  (``model`` is ``"reference"`` or ``"candidate"``): ``kind``
  ``"custom_ops"`` or ``"unknown_ops"`` with ``items`` a list of op names
  (``domain::op`` for custom domains), or ``"nonfinite_weights"`` with
  ``items`` ``{initializer: NaN/Inf count}``.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "ModelFacts", "FidelityReport"]

import base64
import html
import io as std_io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from graphopt.ledger import format_bytes
from graphopt.localize import LayerReport
from graphopt.metrics import ComparisonResult, Tolerance
from graphopt.providers import ProviderStatus

SCHEMA = "graphopt.fidelity/1"


@dataclass(frozen=True)
class ModelFacts:
    path: str | None
    bytes: int | None
    nodes: int
    parameter_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "nodes": self.nodes, "parameter_bytes": self.parameter_bytes}


@dataclass
class FidelityReport:
    """Everything validation found; ``bool(report)`` is whether it passed."""

    reference: ModelFacts
    candidate: ModelFacts
    tolerance: Tolerance
    data_source: str
    samples: int
    seed: int
    optimization: str
    providers: list[ProviderStatus]
    tf32: bool = False
    outputs: list[tuple[str, ComparisonResult]] = field(default_factory=list)
    noise_floor: list[tuple[str, ComparisonResult]] = field(default_factory=list)
    per_layer: LayerReport | None = None
    latency: dict[str, Any] | None = None
    ledger: list[dict[str, Any]] | None = None
    bisection: dict[str, Any] | None = None
    task: dict[str, Any] | None = None  # graphopt.task.TaskScore.result()
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(result.passed for _, result in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict(),
            "tolerance": {**_tolerance_dict(self.tolerance), "description": self.tolerance.describe()},
            "data": {"source": self.data_source, "samples": self.samples, "seed": self.seed},
            "optimization": self.optimization,
            "cuda_tf32": self.tf32,
            "providers": [status.to_dict() for status in self.providers],
            "outputs": [_entry(provider, result) for provider, result in self.outputs],
            "noise_floor": [_entry(provider, result) for provider, result in self.noise_floor],
            "per_layer": self.per_layer.to_dict() if self.per_layer else None,
            "latency": self.latency,
            "size": self._size(),
            "ledger": self.ledger,
            "bisection": self.bisection,
            "task": self.task,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def _size(self) -> dict[str, Any]:
        ref, cand = self.reference.bytes, self.candidate.bytes
        ratio = cand / ref if ref and cand is not None else None
        return {"reference_bytes": ref, "candidate_bytes": cand, "ratio": ratio}

    def to_text(self) -> str:
        """The short table printed on stdout."""
        lines = [f"fidelity: {'PASS' if self.passed else 'FAIL'} ({self.tolerance.describe()}, {self.samples} samples, {self.data_source})"]
        for status in self.providers:
            if not status.available:
                lines.append(f"provider {status.name}: unavailable ({status.reason})")
        header = ("provider", "output", "max abs", "rel L2", "cosine", "SNR dB", "top-1", "result")
        rows = [header] + [_row(provider, result) for provider, result in self.outputs]
        rows += [_row(f"{provider} noise", result) for provider, result in self.noise_floor]
        lines += _table(rows)
        if self.noise_floor:
            math = "TF32 (--tf32)" if self.tf32 else "full float32 (TF32 off; --tf32 allows it)"
            lines.append(f"cuda math: {math}; 'noise' rows compare the original on CPU and on that provider")
        lines += self._extra_lines()
        return "\n".join(lines)

    def _extra_lines(self) -> list[str]:
        lines = [f"warning: {warning['message']}" for warning in self.warnings]
        if self.per_layer is not None:
            divergent = self.per_layer.first_divergent
            lines.append(f"per-layer: {len(self.per_layer.layers)} tensors compared, {len(divergent)} first divergent shown")
            for layer in divergent:
                lines.append(
                    f"  {layer.pair.candidate} <- {layer.pair.op} node {layer.pair.node!r}: "
                    f"max abs {_num(layer.result.max_abs)}, cosine {_num(layer.result.cosine, 6)} ({layer.result.reason})"
                )
        if self.latency is not None:
            threads = self.latency["threads"] or "default"
            lines.append(
                f"latency ({self.latency['provider']}, {threads} threads): "
                f"{self.latency['reference_ms']:.2f} ms -> {self.latency['candidate_ms']:.2f} ms (x{self.latency['ratio']:.2f})"
            )
        if self.task is not None:
            count = next((f"{value} {key}" for key, value in self.task.items() if key in ("samples", "labelled rows")), "")
            lines.append(
                f"task: {self.task['metric']} {self.task['reference']:.4f} -> {self.task['candidate']:.4f} "
                f"(drop {self.task['drop']:+.4f}) over {count}"
            )
        size = self._size()
        if size["ratio"] is not None:
            lines.append(f"size: {format_bytes(size['reference_bytes'])} -> {format_bytes(size['candidate_bytes'])} (x{size['ratio']:.3f})")
        if self.bisection is not None and self.bisection.get("first_failing_pass"):
            lines.append(f"bisection: first pass breaking the tolerance: {self.bisection['first_failing_pass']} (step {self.bisection['step']})")
        return lines

    def to_markdown(self, *, plot: bool = True) -> str:
        """A page with the tables and, with matplotlib installed, the per-layer error plot."""
        parts = ["# graphopt fidelity report", "", f"**{'PASS' if self.passed else 'FAIL'}** against {self.tolerance.describe()}", ""]
        rows = [("provider", "output", "max abs", "rel L2", "cosine", "SNR dB", "top-1", "result")]
        rows += [_row(p, r) for p, r in self.outputs] + [_row(f"{p} noise", r) for p, r in self.noise_floor]
        parts += ["| " + " | ".join(row) + " |" for row in rows[:1]] + ["|" + "---|" * len(rows[0])]
        parts += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        parts += ["", *(f"- {line}" for line in self._extra_lines())]
        image = _layer_plot_png(self.per_layer) if plot and self.per_layer else None
        if image is not None:
            parts += ["", f"![per-layer error](data:image/png;base64,{base64.b64encode(image).decode()})"]
        elif plot and self.per_layer:
            parts += ["", "(install the `plots` extra, matplotlib, for the per-layer plot)"]
        return "\n".join(parts) + "\n"

    def to_html(self) -> str:
        """The Markdown page's content as a standalone HTML file."""
        body = []
        for line in self.to_markdown().splitlines():
            if line.startswith("![per-layer error]("):
                body.append(f'<img alt="per-layer error" src="{html.escape(line[len("![per-layer error]("):-1])}">')
            elif line.startswith("|"):
                body.append("<pre>" + html.escape(line) + "</pre>")
            elif line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line:
                body.append(f"<p>{html.escape(line)}</p>")
        return "<!doctype html><meta charset='utf-8'><title>graphopt fidelity</title>\n" + "\n".join(body) + "\n"


def _tolerance_dict(tolerance: Tolerance) -> dict[str, Any]:
    return {"atol": tolerance.atol, "rtol": tolerance.rtol, "min_cosine": tolerance.min_cosine, "min_snr_db": tolerance.min_snr_db}


def _entry(provider: str, result: ComparisonResult) -> dict[str, Any]:
    data = result.to_dict()
    return {"provider": provider, "output": data.pop("name"), **data}


def _row(provider: str, result: ComparisonResult) -> tuple[str, ...]:
    top1 = "-" if result.top1 is None else f"{result.top1:.3f}"
    verdict = "ok" if result.passed else f"FAIL: {result.reason}"
    return (provider, result.name, _num(result.max_abs), _num(result.rel_l2), _num(result.cosine, 6), _num(result.snr_db, 1), top1, verdict)


def _num(value: float, digits: int = 3) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if digits in (1, 6):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}e}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _layer_plot_png(per_layer: LayerReport) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    errors = [layer.result.rel_l2 if math.isfinite(layer.result.rel_l2) else float("nan") for layer in per_layer.layers]
    figure, axis = plt.subplots(figsize=(9, 3.2))
    axis.semilogy(range(len(errors)), [max(e, 1e-12) for e in errors], marker=".", linewidth=0.8)
    axis.set_xlabel("tensor (candidate topological order)")
    axis.set_ylabel("relative L2 error (exact = 1e-12)")
    axis.set_title(f"per-layer error ({per_layer.provider}, {per_layer.samples} sample(s))")
    buffer = std_io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()

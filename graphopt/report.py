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
  reason, equal_share}`` (``equal_share``: integer and bool outputs only, the
  share of values equal in both models; null otherwise). Non-finite floats are
  written as the strings ``"inf"``, ``"-inf"``, ``"nan"``.
- ``noise_floor``: the same entries comparing the *reference* on CPU with the
  reference on each other provider (the provider's own numeric noise).
- ``task``: null, or ``{metric, reference, candidate, drop}`` plus
  ``samples`` (a metric callback) or ``labelled rows`` (top-1 accuracy from
  ``labels`` in the data).
- ``per_layer``: null, or ``{provider, samples, paired, compared,
  first_divergent, layers}`` (``paired``: tensors matched across the models;
  ``compared``: those of them with values compared, the rest changed shape
  or were empty); each layer is ``{reference_tensor, candidate_tensor, node, op}``
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
from graphopt.localize import LayerReport, LayerResult
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
        lines = [f"fidelity: {self._verdict()} ({self.tolerance.describe()}, {self.samples} samples, {self.data_source})"]
        lines += self._provider_lines()
        lines += _table([_OUTPUT_HEADER, *self._output_rows()])
        lines += self._noise_lines() + self._warning_lines()
        if self.per_layer is not None:
            lines.append(self._layer_summary())
            for layer in self.per_layer.first_divergent:
                tensor, op, node, max_abs, cosine, _ = _layer_row(layer)
                reason = layer.result.reason
                measured = f"max abs {max_abs}, cosine {cosine} ({reason})" if layer.result.compared else reason
                lines.append(f"  {tensor} <- {op} node {node!r}: {measured}")
        return "\n".join(lines + self._summary_lines())

    def to_markdown(self, *, plot: bool = True) -> str:
        """A page with the tables and, with matplotlib installed, the per-layer error plot."""
        parts = ["# graphopt fidelity report", "", f"**{self._verdict()}** against {_md(self.tolerance.describe())}", ""]
        parts += _md_table(_OUTPUT_HEADER, self._output_rows())
        notes = self._provider_lines() + self._noise_lines() + self._warning_lines()
        parts += ["", *(f"- {_md(line)}" for line in notes)] if notes else []
        if self.per_layer is not None:
            parts += ["", "## Per-layer", "", _md(self._layer_summary())]
            if self.per_layer.first_divergent:
                parts += ["", *_md_table(_LAYER_HEADER, [_layer_row(layer) for layer in self.per_layer.first_divergent])]
        parts += ["", *(f"- {_md(line)}" for line in self._summary_lines())]
        if self.ledger:
            parts += ["", "## Passes", "", *_md_table(_LEDGER_HEADER, self._ledger_rows())]
        image = self._plot() if plot else None
        if image is not None:
            parts += ["", f"![per-layer error](data:image/png;base64,{image})"]
        elif plot and self.per_layer:
            parts += ["", "(install the `plots` extra, matplotlib, for the per-layer plot)"]
        return "\n".join(parts) + "\n"

    def to_html(self) -> str:
        """A standalone HTML page built from the report's data; every string from the models is escaped."""
        verdict = self._verdict()
        body = [
            "<h1>graphopt fidelity report</h1>",
            f'<p><strong class="{verdict.lower()}">{verdict}</strong> against {_h(self.tolerance.describe())}, '
            f"{self.samples} samples ({_h(self.data_source)})</p>",
            _html_table(_OUTPUT_HEADER, self._output_rows(), [not r.passed for _, r in self.outputs + self.noise_floor]),
        ]
        body += _html_list(self._provider_lines() + self._noise_lines() + self._warning_lines())
        if self.per_layer is not None:
            divergent = self.per_layer.first_divergent
            body += ["<h2>Per-layer</h2>", f"<p>{_h(self._layer_summary())}</p>"]
            if divergent:
                body.append(_html_table(_LAYER_HEADER, [_layer_row(layer) for layer in divergent], [True] * len(divergent)))
        body += _html_list(self._summary_lines())
        if self.ledger:
            body += ["<h2>Passes</h2>", _html_table(_LEDGER_HEADER, self._ledger_rows(), [False] * len(self.ledger))]
        image = self._plot()
        if image is not None:
            body.append(f'<img alt="per-layer error" src="data:image/png;base64,{image}">')
        elif self.per_layer:
            body.append("<p>(install the <code>plots</code> extra, matplotlib, for the per-layer plot)</p>")
        head = "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>graphopt fidelity report</title>"
        return f"{head}<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"

    def _verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def _output_rows(self) -> list[tuple[str, ...]]:
        return [_row(provider, result) for provider, result in self.outputs] + [
            _row(f"{provider} noise", result) for provider, result in self.noise_floor
        ]

    def _provider_lines(self) -> list[str]:
        return [f"provider {status.name}: unavailable ({status.reason})" for status in self.providers if not status.available]

    def _noise_lines(self) -> list[str]:
        if not self.noise_floor:
            return []
        kind = "TF32 (--tf32)" if self.tf32 else "full float32 (TF32 off; --tf32 allows it)"
        return [f"cuda math: {kind}; 'noise' rows compare the original on CPU and on that provider"]

    def _warning_lines(self) -> list[str]:
        return [f"warning: {warning['message']}" for warning in self.warnings]

    def _layer_summary(self) -> str:
        assert self.per_layer is not None
        divergent = self.per_layer.first_divergent
        layers = self.per_layer.layers
        shown = sum(1 for layer in layers if layer.result.compared)
        # Channel pruning changes tensor shapes: such pairs have no values to compare.
        compared = f"per-layer: {len(layers)} tensors paired, {shown} compared" if shown < len(layers) else f"per-layer: {shown} tensors compared"
        if not divergent:
            if not self.tolerance.rtol:
                return f"{compared}, none beyond the tolerance ({self.tolerance.describe()})"
            # An output can miss the elementwise rule where every tensor keeps within its scale.
            return (
                f"{compared}, none beyond {self.tolerance.describe()} of each tensor's peak |value| "
                "(a miss only where values are near zero is float rounding)"
            )
        return f"{compared}, {len(divergent)} first divergent shown"

    def _summary_lines(self) -> list[str]:
        """Latency, task metric, size and bisection, one line each when present."""
        lines = []
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
        elif self.bisection is not None:
            # The replay ended elsewhere than the run that failed: passes whose choices follow timings.
            lines.append(
                f"bisection: none of the {self.bisection.get('checked', 0)} replayed prefixes failed; a pass that decides by "
                "timing (qdq or lowrank with check_speed) may have chosen differently: rerun with --deterministic"
            )
        return lines

    def _ledger_rows(self) -> list[tuple[str, ...]]:
        """One row per pass the optimize run made: what changed, and the pass's own one-line summary."""
        return [
            (
                row["name"],
                "yes" if row["modified"] else "no",
                f"{row['nodes_before']} -> {row['nodes_after']}",
                f"{format_bytes(row['param_bytes_before'])} -> {format_bytes(row['param_bytes_after'])}",
                f"{row['seconds'] * 1000:.1f} ms",
                str(row.get("details", {}).get("summary", "")),
            )
            for row in self.ledger or []
        ]

    def _plot(self) -> str | None:
        """The per-layer plot as base64 PNG, or None without per-layer results or matplotlib."""
        image = _layer_plot_png(self.per_layer) if self.per_layer else None
        return base64.b64encode(image).decode() if image is not None else None


_OUTPUT_HEADER = ("provider", "output", "max abs", "rel L2", "cosine", "SNR dB", "top-1", "result")
_LAYER_HEADER = ("tensor", "op", "node", "max abs", "cosine", "result")
_LEDGER_HEADER = ("pass", "changed", "nodes", "params", "time", "summary")
_CSS = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-family:monospace}"
    "tr.fail td{background:#fdecea}strong.fail{color:#b00020}strong.pass{color:#1b5e20}"
)


def _tolerance_dict(tolerance: Tolerance) -> dict[str, Any]:
    return {"atol": tolerance.atol, "rtol": tolerance.rtol, "min_cosine": tolerance.min_cosine, "min_snr_db": tolerance.min_snr_db}


def _entry(provider: str, result: ComparisonResult) -> dict[str, Any]:
    data = result.to_dict()
    return {"provider": provider, "output": data.pop("name"), **data}


def _row(provider: str, result: ComparisonResult) -> tuple[str, ...]:
    top1 = "-" if result.top1 is None else f"{result.top1:.3f}"
    metrics = (_num(result.max_abs), _num(result.rel_l2), _num(result.cosine, 6), _num(result.snr_db, 1))
    if result.equal_share is not None:  # class indices and the like: how many agree, not a cosine
        metrics = (*metrics[:2], f"{result.equal_share:.1%} equal", "-")
    if not result.compared:  # no element compared: the NaN statistics are shown as absent
        metrics = ("-",) * len(metrics)
    return (provider, result.name, *metrics, top1, _verdict(result))


def _layer_row(layer: LayerResult) -> tuple[str, ...]:
    result, pair = layer.result, layer.pair
    metrics = (_num(result.max_abs), _num(result.cosine, 6)) if result.compared else ("-", "-")
    return (pair.candidate, pair.op, pair.node, *metrics, _verdict(result))


def _verdict(result: ComparisonResult) -> str:
    if not result.passed:
        return f"FAIL: {result.reason}"
    # Empty in every sample on both sides: the models agree, but nothing was measured.
    return "ok" if result.compared else "ok (empty: nothing compared)"


def _num(value: float, digits: int = 3) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if digits in (1, 6):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}e}"


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _md(text: str) -> str:
    """Text that stays literal in Markdown: no table break (|), tag (<), code span, emphasis or link.

    ``_`` is left alone: CommonMark ignores it inside words, where tensor names have it.
    """
    text = " ".join(text.splitlines())
    for char in "\\`*[]<|":
        text = text.replace(char, "\\" + char)
    return text


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(_md(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]


def _html_table(header: tuple[str, ...], rows: list[tuple[str, ...]], failed: list[bool]) -> str:
    head = "<tr>" + "".join(f"<th>{_h(cell)}</th>" for cell in header) + "</tr>"
    body = [
        ('<tr class="fail">' if fail else "<tr>") + "".join(f"<td>{_h(cell)}</td>" for cell in row) + "</tr>"
        for row, fail in zip(rows, failed)
    ]
    return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _html_list(lines: list[str]) -> list[str]:
    return ["<ul>", *(f"<li>{_h(line)}</li>" for line in lines), "</ul>"] if lines else []


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

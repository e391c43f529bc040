"""What ``graphopt inspect`` reports about a model: ops, sizes, opsets, inputs, bad weights."""

from __future__ import annotations

__all__ = ["ModelSummary", "summarize"]

import collections
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt import io, stats
from graphopt.graphs import iter_graphs
from graphopt.ledger import format_bytes

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


@dataclass
class ModelSummary:
    """A JSON-ready description of one model."""

    path: str | None
    file_bytes: int | None
    external_data_bytes: int
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    nodes: int
    subgraphs: int
    functions: int
    ops: dict[str, int]
    custom_domains: list[str]
    parameters: int
    parameter_bytes: int
    nonfinite_weights: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """A report a person can read in a terminal."""
        size = format_bytes(self.file_bytes) if self.file_bytes is not None else "in memory"
        if self.external_data_bytes:
            size += f" + {format_bytes(self.external_data_bytes)} external data"
        lines = [
            f"model       {self.path or '(in memory)'} ({size})",
            f"ir_version  {self.ir_version}   producer {self.producer or '-'}",
            "opsets      " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(self.opsets.items())),
            f"nodes       {self.nodes} ({self.subgraphs} subgraphs, {self.functions} functions)",
            f"parameters  {self.parameters:,} ({format_bytes(self.parameter_bytes)})",
        ]
        lines += [f"input       {_describe_io(item)}" for item in self.inputs]
        lines += [f"output      {_describe_io(item)}" for item in self.outputs]
        if self.custom_domains:
            lines.append("custom      " + ", ".join(self.custom_domains))
        if self.nonfinite_weights:
            bad = ", ".join(f"{name} ({count})" for name, count in self.nonfinite_weights.items())
            lines.append(f"WARNING     NaN/Inf in weights: {bad}")
        else:
            lines.append("weights     all finite")
        lines.append("ops")
        lines += [f"  {count:>6}  {op}" for op, count in self.ops.items()]
        return "\n".join(lines)


def summarize(model: ir.Model) -> ModelSummary:
    """Collects the summary; reads weight data only to look for NaN/Inf."""
    source = io.source_path(model)
    ops: collections.Counter[str] = collections.Counter()
    domains = set()
    for graph in iter_graphs(model):
        for node in graph:
            ops[f"{node.domain}::{node.op_type}" if node.domain not in _STANDARD_DOMAINS else node.op_type] += 1
            domains.add(node.domain)
    return ModelSummary(
        path=str(source) if source else None,
        file_bytes=source.stat().st_size if source else None,
        external_data_bytes=io.external_data_bytes(model),
        ir_version=model.ir_version,
        producer=" ".join(filter(None, (model.producer_name, model.producer_version))),
        opsets=dict(model.opset_imports),
        inputs=[_io_entry(value) for value in model.graph.inputs if value.name not in model.graph.initializers],
        outputs=[_io_entry(value) for value in model.graph.outputs],
        nodes=stats.node_count(model),
        subgraphs=sum(1 for _ in model.graph.subgraphs()),
        functions=len(model.functions),
        ops=dict(ops.most_common()),
        custom_domains=sorted(d for d in domains if d not in _STANDARD_DOMAINS),
        parameters=stats.param_count(model),
        parameter_bytes=stats.param_bytes(model),
        nonfinite_weights=_nonfinite_weights(model),
    )


def _io_entry(value: ir.Value) -> dict[str, Any]:
    dims = [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    dynamic = value.shape is None or any(not isinstance(d, int) for d in value.shape)
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    return {"name": value.name, "dtype": dtype, "shape": dims if value.shape is not None else None, "dynamic": dynamic}


def _describe_io(item: dict[str, Any]) -> str:
    shape = "?" if item["shape"] is None else "[" + ", ".join(str(d) for d in item["shape"]) + "]"
    suffix = "  (dynamic)" if item["dynamic"] else ""
    return f"{item['name']}: {item['dtype']}{shape}{suffix}"


def _nonfinite_weights(model: ir.Model) -> dict[str, int]:
    bad = {}
    for name, tensor in stats.constant_tensors(model):
        if not tensor.dtype.is_floating_point():
            continue
        count = int(np.count_nonzero(~np.isfinite(np.asarray(tensor.numpy(), dtype=np.float32))))
        if count:
            bad[name] = count
    return bad

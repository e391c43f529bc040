"""What ``graphopt inspect`` reports about a model: ops, sizes, opsets, inputs, bad weights."""

from __future__ import annotations

__all__ = [
    "ModelSummary",
    "summarize",
    "is_custom_domain",
    "is_unknown_op",
    "is_opaque",
    "custom_ops",
    "unknown_ops",
    "nonfinite_weights",
]

import collections
import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
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
    # Standard-domain op types that onnx has no schema for at the model's opset.
    unknown_ops: list[str] = field(default_factory=list)

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
        if self.unknown_ops:
            lines.append("WARNING     unknown ops: " + ", ".join(self.unknown_ops))
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
        nonfinite_weights=nonfinite_weights(model),
        unknown_ops=unknown_ops(model),
    )


def _io_entry(value: ir.Value) -> dict[str, Any]:
    # A symbolic dim's name, None (JSON null) for an unnamed one: str() of it read "None".
    dims = [] if value.shape is None else [d if isinstance(d, int) else d.value for d in value.shape]
    dynamic = value.shape is None or any(not isinstance(d, int) for d in value.shape)
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    return {"name": value.name, "dtype": dtype, "shape": dims if value.shape is not None else None, "dynamic": dynamic}


def _describe_io(item: dict[str, Any]) -> str:
    shape = "?" if item["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in item["shape"]) + "]"
    suffix = "  (dynamic)" if item["dynamic"] else ""
    return f"{item['name']}: {item['dtype']}{shape}{suffix}"


def nonfinite_weights(model: ir.Model) -> dict[str, int]:
    """NaN/Inf element count of every floating-point initializer or Constant that has any."""
    bad = {}
    for name, tensor in stats.constant_tensors(model):
        if not tensor.dtype.is_floating_point():
            continue
        count = int(np.count_nonzero(~np.isfinite(np.asarray(tensor.numpy(), dtype=np.float32))))
        if count:
            bad[name] = count
    return bad


def is_custom_domain(domain: str) -> bool:
    """Whether ``domain`` is outside the standard ONNX domains (e.g. com.microsoft, com.example)."""
    return domain not in _STANDARD_DOMAINS


def is_unknown_op(node: ir.Node, opsets: Mapping[str, int]) -> bool:
    """Whether a standard-domain node names an op onnx has no schema for at the model's opset.

    ``FooBar`` in the default domain is unknown; so is ``Gelu`` at opset 17
    (it arrived in opset 20). Custom domains are never "unknown" here: see
    :func:`is_custom_domain`.
    """
    if is_custom_domain(node.domain):
        return False
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    return not _has_schema(node.op_type, domain, version)


def is_opaque(node: ir.Node, opsets: Mapping[str, int]) -> bool:
    """A node no built-in pass may look into: a custom domain or an unknown standard op."""
    return is_custom_domain(node.domain) or is_unknown_op(node, opsets)


def custom_ops(model: ir.Model) -> list[str]:
    """``domain::op_type`` of every custom-domain node, sorted, once each; calls to the model's own functions excluded."""
    local = _local_functions(model)
    return sorted(
        {
            f"{node.domain}::{node.op_type}"
            for graph in iter_graphs(model)
            for node in graph
            if is_custom_domain(node.domain) and (node.domain, node.op_type) not in local
        }
    )


def unknown_ops(model: ir.Model) -> list[str]:
    """Standard-domain op types onnx has no schema for at the model's opset, sorted, once each.

    Calls to the model's own functions are not unknown: the function defines them.
    """
    local = _local_functions(model)
    opsets = model.opset_imports
    found = set()
    for graph in iter_graphs(model):
        for node in graph:
            if (node.domain, node.op_type) not in local and is_unknown_op(node, opsets):
                found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
    return sorted(found)


def _local_functions(model: ir.Model) -> set[tuple[str, str]]:
    return {(domain, name) for domain, name, _ in model.functions}


@functools.lru_cache(maxsize=4096)
def _has_schema(op_type: str, domain: str, version: int | None) -> bool:
    # onnx.defs knows every released op and the opset each version arrived in;
    # a missing opset import means "the newest this onnx knows".
    if version is None:
        return onnx.defs.has(op_type, domain)
    return onnx.defs.has(op_type, version, domain)

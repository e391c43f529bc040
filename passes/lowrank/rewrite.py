"""Graph surgery for ``lowrank``: replace one layer by a chain of smaller layers.

The last node of each chain takes over the original output value's name
(and type, shape, doc_string and metadata_props), so graph outputs and
validation's by-name alignment of intermediate tensors see the same tensor
as before. New nodes are named ``<layer>/lowrank/<part>``: that marks them
as factors, which a second run leaves alone.
"""

from __future__ import annotations

__all__ = ["MARKER", "Chain", "Step", "copy_attributes", "is_factor"]

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

MARKER = "/lowrank/"


def is_factor(node: ir.Node) -> bool:
    return MARKER in (node.name or "")


@dataclass
class Step:
    """One node of the chain: its op, constant weight, extra inputs after it, and attributes."""

    part: str
    op_type: str
    weight: np.ndarray
    extra_inputs: list[ir.Value | None] = field(default_factory=list)
    attributes: list[ir.Attr] = field(default_factory=list)


class Chain:
    """Builds replacement chains in one graph with fresh, unique names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.taken = set(graph.initializers)
        self.taken.update(value.name for value in graph.inputs if value.name)
        for node in graph:
            self.taken.update(value.name for value in node.outputs if value.name)

    def fresh(self, base: str) -> str:
        name = base
        for index in itertools.count(1):
            if name not in self.taken:
                break
            name = f"{base}_{index}"
        self.taken.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.fresh(base)
        # np.asarray, not np.ascontiguousarray: the latter turns a 0-d array (a scalar
        # Gemm C) into shape [1], which then disagrees with the declared shape.
        array = np.asarray(array, order="C")
        tensor = ir.Tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def replace(self, node: ir.Node, steps: list[Step], dtype: np.dtype) -> None:
        """Replaces ``node`` (whose first input feeds the chain) by ``steps`` in order."""
        label = node.name or node.op_type
        weight_name = node.inputs[1].name or label  # type: ignore[union-attr]
        output = node.outputs[0]
        current = node.inputs[0]
        built: list[ir.Node] = []
        for index, step in enumerate(steps):
            weight = self.constant(f"{weight_name}_lowrank_{step.part}", step.weight.astype(dtype))
            last = index == len(steps) - 1
            out = ir.Value(name=self.fresh(f"{output.name}_lowrank_{step.part}"))
            new = ir.Node(
                node.domain,
                step.op_type,
                [current, weight, *step.extra_inputs],
                attributes=step.attributes,
                outputs=[out],
                name=self.fresh(f"{label}{MARKER}{step.part}"),
            )
            if not last and output.type is not None:
                out.type = output.type
            built.append(new)
            current = out
        self.graph.insert_before(node, built)
        old_inputs = list(node.inputs[1:])
        name = output.name
        output.replace_all_uses_with(current, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        current.name = name
        current.type, current.shape = output.type, output.shape
        # The value stands in for the old one, a graph output's description included.
        current.doc_string = output.doc_string
        current.metadata_props.update(output.metadata_props)
        for value in old_inputs:
            _drop_if_unused(self.graph, value)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is None or value.uses() or value.is_graph_input() or value.is_graph_output():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        graph.initializers.pop(value.name)


def copy_attributes(node: ir.Node, names: tuple[str, ...]) -> list[ir.Attr]:
    """Fresh copies of the node's attributes among ``names`` (an Attr object belongs to one node)."""
    return [ir.Attr(attr.name, attr.type, attr.value) for name, attr in node.attributes.items() if name in names]

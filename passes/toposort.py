"""Topological sort of every graph: main graph, If/Loop/Scan bodies, functions.

Stable: nodes that do not depend on each other keep their relative order, so a
sorted graph is left exactly as it was (``modified`` is False). Only the order
of nodes changes, never what they compute.
"""

from __future__ import annotations

__all__ = ["SortTopologicallyPass"]

import onnx_ir as ir

from graphopt.errors import InvalidModelError
from graphopt.graphs import iter_graphs


class SortTopologicallyPass(ir.passes.InPlacePass):
    """Stable topological sort of the main graph, subgraphs and functions."""

    visits_subgraphs = True

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _node_orders(model)
        # Graph.sort sorts a graph together with all its subgraphs.
        for graph in [model.graph, *model.functions.values()]:
            try:
                graph.sort()
            except ValueError as exc:
                raise InvalidModelError(f"cannot sort graph {graph.name!r}: {exc}") from exc
        return ir.passes.PassResult(model, modified=_node_orders(model) != before)


def _node_orders(model: ir.Model) -> list[tuple[int, ...]]:
    return [tuple(id(node) for node in graph) for graph in iter_graphs(model)]

"""Dead-code elimination: remove nodes, initializers and functions nothing reads.

A node is live when it produces a graph output, or a value that a live node
reads. The walk starts at the main graph's outputs; a live If/Loop/Scan node
also makes its bodies' outputs roots, and a body node that reads an
outer-scope value keeps that value's producer alive. Everything else is dead,
including whole subgraphs of dead nodes, and removing it never changes an
output. Graph inputs and outputs are the user's interface and stay.

onnx_ir's RemoveUnusedNodesPass is not enough here: when it removes a dead If,
the nodes of the If's bodies keep their uses of outer-scope values, so the
producers of those values survive as dead code (seen with onnx-ir 1.1). This
pass marks liveness across scopes instead, in O(nodes + edges). Unused
functions are removed with onnx_ir's RemoveUnusedFunctionsPass.
"""

from __future__ import annotations

__all__ = ["EliminateDeadCodePass"]

import logging
from collections.abc import Iterable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass

from graphopt.graphs import GraphLike, apply_to_graphs, bodies, iter_nodes

logger = logging.getLogger(__name__)


class EliminateDeadCodePass(ir.passes.InPlacePass):
    """Remove nodes, initializers (subgraphs included) and functions that no output needs."""

    visits_subgraphs = True

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnx_ir's pass walks every node even when there is no function to drop.
        modified = bool(model.functions) and RemoveUnusedFunctionsPass()(model).modified
        modified = _sweep(model.graph, *_live_nodes(model.graph.outputs)) or modified
        for function in model.functions.values():
            modified = _sweep(function.graph, *_live_nodes(function.outputs)) or modified
        modified = apply_to_graphs(model, _remove_unused_initializers, functions=False) or modified
        return ir.passes.PassResult(model, modified)


def _live_nodes(roots: Iterable[ir.Value]) -> tuple[set[ir.Node], set[ir.Graph]]:
    """Nodes that some root value depends on, across subgraph boundaries, and the bodies of those nodes."""
    live: set[ir.Node] = set()
    live_bodies: set[ir.Graph] = set()
    stack = [value.producer() for value in roots]
    while stack:
        node = stack.pop()
        if node is None or node in live:
            continue
        live.add(node)
        for value in node.inputs:
            if value is not None:
                stack.append(value.producer())
        for body in bodies(node):
            live_bodies.add(body)
            stack.extend(value.producer() for value in body.outputs)
    return live, live_bodies


def _sweep(graph: ir.Graph, live: set[ir.Node], live_bodies: set[ir.Graph]) -> bool:
    """Removes every node of ``graph`` and its live subgraphs that is not live."""
    dead_by_graph: dict[ir.Graph, list[ir.Node]] = {}
    for node in iter_nodes(graph):
        if node not in live:
            # Detach first, so values read only by dead code lose all their uses,
            # including uses from inside the bodies of a dead If/Loop/Scan.
            for index, value in enumerate(node.inputs):
                if value is not None:
                    node.replace_input_with(index, None)
            dead_by_graph.setdefault(node.graph, []).append(node)
    # A body of a dead node disappears with that node; only edit kept graphs.
    removed = 0
    for owner, dead in dead_by_graph.items():
        if owner is graph or owner in live_bodies:
            owner.remove(dead, safe=True)
            removed += len(dead)
            logger.debug("dce: removed %d nodes from graph %s", len(dead), owner.name)
    return removed > 0


def _remove_unused_initializers(graph: GraphLike) -> bool:
    if not isinstance(graph, ir.Graph):
        return False
    boundary = set(graph.inputs) | set(graph.outputs)
    unused = [name for name, value in graph.initializers.items() if not value.uses() and value not in boundary]
    for name in unused:
        logger.debug("dce: removing unused initializer %s", name)
        del graph.initializers[name]
    return bool(unused)

"""Walk every graph of a model: the main graph, If/Loop/Scan bodies, and functions.

Passes that rewrite "per graph" call :func:`apply_to_graphs` so that they are
subgraph-aware without each re-implementing the traversal.
"""

from __future__ import annotations

__all__ = ["iter_graphs", "apply_to_graphs"]

from collections.abc import Callable, Iterator

import onnx_ir as ir

GraphLike = ir.Graph | ir.Function


def iter_graphs(model: ir.Model, *, functions: bool = True) -> Iterator[GraphLike]:
    """Yields the main graph, its subgraphs (recursively), then each function.

    Subgraphs nested inside function bodies are yielded after their function.
    """
    yield from model.graphs()
    if not functions:
        return
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def apply_to_graphs(
    model: ir.Model,
    rewrite: Callable[[GraphLike], bool],
    *,
    functions: bool = True,
) -> bool:
    """Calls ``rewrite`` once on every graph and returns whether any call changed one.

    The list of graphs is taken before the first call, so a graph detached by
    an earlier rewrite is still visited; that is harmless for rewrites that only
    look inside the graph they are handed.
    """
    modified = False
    for graph in list(iter_graphs(model, functions=functions)):
        modified = rewrite(graph) or modified
    return modified

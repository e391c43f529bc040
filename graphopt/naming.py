"""Fresh value names for rewrites that add tensors.

Value names must be unique across the whole model (subgraphs read outer
names), so a pass that creates values asks one allocator, built once per run
by walking every graph, instead of probing the graph per new name.
"""

from __future__ import annotations

__all__ = ["NameAllocator"]

import onnx_ir as ir

from graphopt.graphs import iter_graphs


class NameAllocator:
    """Hands out names unused anywhere in the model; build one per pass run."""

    def __init__(self, model: ir.Model) -> None:
        self._used: set[str] = set()
        for graph in iter_graphs(model):
            self._used.update(v.name for v in graph.inputs if v.name)
            self._used.update(v.name for v in graph.outputs if v.name)
            if isinstance(graph, ir.Graph):
                self._used.update(graph.initializers)
            for node in graph:
                self._used.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ...; the name is then taken."""
        name, index = base, 0
        while name in self._used:
            index += 1
            name = f"{base}_{index}"
        self._used.add(name)
        return name

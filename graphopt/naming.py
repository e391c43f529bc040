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
    """Hands out names unused anywhere in the model; build one per pass run.

    The walk over the model happens on the first :meth:`fresh` call, not at
    construction: most pass runs create nothing, and on a 80k-node graph the
    walk costs ~0.1 s per pass.
    """

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._used: set[str] | None = None

    def fresh(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ...; the name is then taken."""
        used = self._names_in_use()
        name, index = base, 0
        while name in used:
            index += 1
            name = f"{base}_{index}"
        used.add(name)
        return name

    def _names_in_use(self) -> set[str]:
        if self._used is None:
            used: set[str] = set()
            for graph in iter_graphs(self._model):
                used.update(v.name for v in graph.inputs if v.name)
                used.update(v.name for v in graph.outputs if v.name)
                if isinstance(graph, ir.Graph):
                    used.update(graph.initializers)
                for node in graph:
                    used.update(v.name for v in node.outputs if v.name)
            self._used = used
        return self._used

"""Raise IR version 3 models to 4, so their initializers are constants to every pass.

Below IR version 4 every initializer must also be listed as a graph input.
Passes cannot rewrite a weight that is a graph input (a caller could feed a
different value), so on such models (many classic model-zoo exports at
opsets 7-9) every pass would find nothing it may change. onnxruntime already
treats them as constants: its ``Graph::CanOverrideInitializer`` is false
below IR 4, so a feed cannot replace them. Dropping them from the inputs and
raising the IR version to 4, the first that lets an initializer stand alone,
therefore keeps what onnxruntime computes for every feed it accepts, and
lets the passes see the weights.

Only the main graph is changed: a Loop or Scan body's inputs are positional,
and an If body has none. run_pipeline runs this pass first on IR 3 models.
"""

from __future__ import annotations

__all__ = ["UpgradeIrPass", "FIRST_SEPARATE_INITIALIZERS"]

import logging
from typing import Any

import onnx_ir as ir

logger = logging.getLogger(__name__)

# The first IR version in which an initializer need not be a graph input.
FIRST_SEPARATE_INITIALIZERS = 4


class UpgradeIrPass(ir.passes.InPlacePass):
    """Below IR version 4: the main graph's initializers leave graph.inputs, and the IR version becomes 4."""

    def __init__(self) -> None:
        super().__init__()
        self._details: dict[str, Any] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.ir_version
        self._details = {}
        if before >= FIRST_SEPARATE_INITIALIZERS:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        kept = [value for value in graph.inputs if not value.is_initializer()]
        removed = len(graph.inputs) - len(kept)
        graph.inputs.clear()
        graph.inputs.extend(kept)
        model.ir_version = FIRST_SEPARATE_INITIALIZERS
        self._details = {"ir_version_before": before, "ir_version_after": model.ir_version, "inputs_removed": removed}
        logger.info("upgrade-ir: IR version %d -> %d, %d initializers no longer graph inputs", before, model.ir_version, removed)
        return ir.passes.PassResult(model, True)

    def details(self) -> dict[str, Any]:
        """The last run's versions and count, with a one-line ``summary`` for people."""
        if not self._details:
            return {}
        d = self._details
        versions = f"IR version {d['ir_version_before']} -> {d['ir_version_after']}"
        if not d["inputs_removed"]:
            return {**d, "summary": f"{versions} (no initializer was a graph input)"}
        line = (
            f"{versions}: {d['inputs_removed']} initializers are no longer graph inputs"
            " (onnxruntime already treats them as constants below IR 4)"
        )
        return {**d, "summary": line}

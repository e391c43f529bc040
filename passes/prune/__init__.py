"""``prune``: magnitude pruning of layer weights (unstructured and N:M); see prune.py."""

from __future__ import annotations

__all__ = ["PrunePass", "PruneSummary"]

from passes.prune.prune import PrunePass, PruneSummary

"""Name provenance: which original tensor a rewritten tensor stands for.

A pass that replaces a tensor the user could compare against, and cannot keep
its name, calls :func:`record`, or :func:`record_many` for a whole run's
renames at once. The mapping lives in model metadata under
``graphopt.provenance`` as JSON, so it survives save/load and lets validation
align intermediate tensors of the original and the rewritten model.
"""

from __future__ import annotations

__all__ = ["PROVENANCE_KEY", "record", "record_many", "read"]

import json
from collections.abc import Iterable

import onnx_ir as ir

PROVENANCE_KEY = "graphopt.provenance"


def read(model: ir.Model) -> dict[str, str]:
    """The ``new_name -> original_name`` mapping recorded in the model (empty if none)."""
    text = model.metadata_props.get(PROVENANCE_KEY)
    if not text:
        return {}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(mapping, dict):
        return {}
    return {str(new): str(old) for new, old in mapping.items()}


def record(model: ir.Model, new_name: str, original_name: str) -> None:
    """Records that ``new_name`` now computes what ``original_name`` computed.

    Chains collapse: if ``original_name`` was itself a rename, the entry points
    at the name in the model the user started from.
    """
    record_many(model, [(new_name, original_name)])


def record_many(model: ir.Model, renames: Iterable[tuple[str, str]]) -> None:
    """:func:`record` for each ``(new_name, original_name)`` in order, with one metadata read and write.

    The metadata holds the whole mapping as one JSON text, so recording renames
    one by one costs a parse and a dump of everything recorded so far each
    time: quadratic in a pass that renames a tensor per layer.
    """
    renames = list(renames)
    if not renames:
        return
    mapping = read(model)
    for new_name, original_name in renames:
        mapping[new_name] = mapping.get(original_name, original_name)
    model.metadata_props[PROVENANCE_KEY] = json.dumps(mapping, sort_keys=True)

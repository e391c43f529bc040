"""Provenance mapping: recorded in metadata, chained, and kept by save/load."""

from __future__ import annotations

from helpers import parse

import graphopt
from graphopt import provenance

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
  y = Relu(x)
}
"""


def test_record_and_read_collapse_chains():
    model = parse(_TEXT)

    provenance.record(model, "b", "a")
    provenance.record(model, "c", "b")

    assert provenance.read(model) == {"b": "a", "c": "a"}


def test_mapping_survives_save_and_load(tmp_path):
    model = parse(_TEXT)
    provenance.record(model, "conv_folded", "conv_out")

    reloaded = graphopt.load(graphopt.save(model, tmp_path / "m.onnx"))

    assert provenance.read(reloaded) == {"conv_folded": "conv_out"}


def test_read_tolerates_missing_or_malformed_metadata():
    model = parse(_TEXT)
    assert provenance.read(model) == {}
    model.metadata_props[provenance.PROVENANCE_KEY] = "not json"
    assert provenance.read(model) == {}

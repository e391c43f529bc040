"""Provenance mapping: recorded in metadata, chained, and kept by save/load."""

from __future__ import annotations

from helpers import CountingJson, parse

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


def test_record_many_equals_records_one_by_one_with_one_metadata_read_and_write(monkeypatch):
    renames = [("w0_dq", "w0"), ("kept", "w0_dq")] + [(f"w{i}_dq", f"w{i}") for i in range(1, 200)]
    one_by_one = parse(_TEXT)
    provenance.record(one_by_one, "w0", "start")  # an earlier pass's entry: later chains collapse onto it
    for new, old in renames:
        provenance.record(one_by_one, new, old)
    batched = parse(_TEXT)
    provenance.record(batched, "w0", "start")
    counting = CountingJson(provenance.json)
    monkeypatch.setattr(provenance, "json", counting)

    provenance.record_many(batched, iter(renames))  # any iterable, consumed in order

    assert (counting.loads_calls, counting.dumps_calls) == (1, 1)
    key = provenance.PROVENANCE_KEY
    assert batched.metadata_props[key] == one_by_one.metadata_props[key]  # the stored text, byte for byte
    assert provenance.read(batched)["kept"] == "start"
    assert provenance.read(batched)["w199_dq"] == "w199"


def test_record_many_of_nothing_leaves_the_metadata_alone():
    model = parse(_TEXT)
    provenance.record_many(model, [])
    assert provenance.PROVENANCE_KEY not in model.metadata_props

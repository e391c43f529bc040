"""qdq on long chains: provenance is written once per built candidate, not once per layer.

The provenance mapping is one JSON text in model metadata; writing it per
dequantized weight made qdq quadratic in the layer count (12.5k nodes: 14 s
of 61 s in json). Counting the metadata's parses and dumps checks the fix
without timing anything. Outputs are compared through onnxruntime against
float at cosine >= 0.99 (int8 weights of an 8x8 near-identity chain).
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import CountingJson, check_full, cosine, one_input_model, run_ort, to_proto

from graphopt import load, provenance, run_pipeline
from passes.qdq import QuantizePass

MIN_COSINE = 0.99


def _chain(layers: int) -> onnx.ModelProto:
    """``layers`` repeats of MatMul(8x8) -> Add(bias) -> Relu -> Mul(1), the tester's repro in small."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")], "x"
    for i in range(layers):
        weight = (np.eye(8) + 0.05 * rng.standard_normal((8, 8))).astype(np.float32)
        initializers += [onnx.numpy_helper.from_array(weight, f"W{i}"), onnx.numpy_helper.from_array(np.full(8, 0.01, np.float32), f"b{i}")]
        output = "y" if i == layers - 1 else f"z{i}"
        nodes += [
            onnx.helper.make_node("MatMul", [previous, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
            onnx.helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"ad{i}"),
            onnx.helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"re{i}"),
            onnx.helper.make_node("Mul", [f"r{i}", "one"], [output], name=f"mu{i}"),
        ]
        previous = output
    return one_input_model(nodes, initializers, [2, 8], [2, 8])


def _quantize(layers: int, monkeypatch, **options):
    counting = CountingJson(provenance.json)
    monkeypatch.setattr(provenance, "json", counting)
    original = _chain(layers)
    result = run_pipeline(load(original), [QuantizePass(check_speed=False, samples=4, **options)])
    monkeypatch.undo()
    return original, result.model, counting.calls


def test_provenance_metadata_is_written_as_often_for_many_layers_as_for_few(monkeypatch):
    _, _, few = _quantize(2, monkeypatch)
    original, model, many = _quantize(24, monkeypatch)

    # One candidate built, one dump (one record per dequantized weight and bias cost 4 calls for 2 layers).
    assert few == many == 1
    mapping = provenance.read(model)
    for i in range(24):
        dequantized = [name for name, old in mapping.items() if old == f"W{i}"]
        assert len(dequantized) == 1
        assert model.graph.node(f"mm{i}").inputs[1].name == dequantized[0]
        assert model.graph.node(f"mm{i}").inputs[1].producer().op_type == "DequantizeLinear"
    check_full(model)
    x = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    assert cosine(run_ort(original, x)[0], run_ort(to_proto(model), x)[0]) >= MIN_COSINE


def test_weight_only_records_every_weight_with_as_many_metadata_writes_as_for_few(monkeypatch):
    _, _, few = _quantize(2, monkeypatch, weight_only=True)
    _, model, many = _quantize(12, monkeypatch, weight_only=True)

    assert few == many == 1
    mapping = provenance.read(model)
    assert sorted(old for old in mapping.values() if old.startswith("W")) == sorted(f"W{i}" for i in range(12))

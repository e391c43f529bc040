"""Per-layer localization: pairing by name, provenance and QDQ, and chunked exposure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import parse

import graphopt
from graphopt import provenance
from graphopt.data import integer_input_ranges, synthesize_feeds
from graphopt.localize import localize, tensor_pairs
from graphopt.metrics import Tolerance
from model_zoo.encoder import build_encoder

RNG = np.random.default_rng(11)
X = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}

_REFERENCE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y)
<float[4,4] W = {0.5,0,0,0, 0,0.25,0,0, 0,0,1,0, 0,0,0,2}> {
  r = Relu(x)
  y = MatMul(r, W)
}
"""

# The same model with QDQ on the activation r and on the weight W (int8,
# scale 1/64), as a quantization pass would write it.
_QDQ_CANDIDATE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y)
<int8[4,4] W_q = {32,0,0,0, 0,16,0,0, 0,0,64,0, 0,0,0,127}, float s = {0.015625}, int8 z = {0},
 float sa = {0.05}, uint8 za = {0}> {
  r = Relu(x)
  r_q = QuantizeLinear(r, sa, za)
  r_dq = DequantizeLinear(r_q, sa, za)
  W_dq = DequantizeLinear(W_q, s, z)
  y = MatMul(r_dq, W_dq)
}
"""


def test_qdq_outputs_pair_with_the_float_tensors_they_quantize():
    reference = parse(_REFERENCE)
    candidate = parse(_QDQ_CANDIDATE)
    provenance.record(candidate, "W_dq", "W")

    pairs = {(p.reference, p.candidate, p.op, p.reference_is_weight) for p in tensor_pairs(reference, candidate)}

    assert pairs == {
        ("r", "r", "Relu", False),
        ("r", "r_dq", "DequantizeLinear", False),
        ("W", "W_dq", "DequantizeLinear", True),
        ("y", "y", "MatMul", False),
    }


def test_localize_reports_each_qdq_pairs_own_error():
    reference, candidate = parse(_REFERENCE), parse(_QDQ_CANDIDATE)
    provenance.record(candidate, "W_dq", "W")

    report = localize(reference, candidate, [X], tolerance=Tolerance(atol=1e-6, rtol=0.0))

    by_tensor = {layer.pair.candidate: layer.result for layer in report.layers}
    assert by_tensor["r"].max_abs == 0.0 and by_tensor["r"].passed
    # Activation QDQ: error within half a quantization step (scale 0.05).
    assert 0 < by_tensor["r_dq"].max_abs <= 0.025 + 1e-7
    # 127/64 = 1.984375 stands for 2.0; the other weights are exact.
    assert by_tensor["W_dq"].max_abs == pytest.approx(2.0 - 127 / 64)
    assert [layer.pair.candidate for layer in report.first_divergent] == ["r_dq", "W_dq", "y"]


def test_a_qdq_model_compared_with_itself_pairs_each_tensor_with_itself():
    # Pairing a DQ output with the float tensor behind its Q even when the reference has the DQ
    # output itself charged the model's own quantization as drift (cosine 0.57 on an identical file).
    candidate = parse(_QDQ_CANDIDATE)

    pairs = {(p.reference, p.candidate) for p in tensor_pairs(parse(_QDQ_CANDIDATE), candidate)}
    report = localize(parse(_QDQ_CANDIDATE), candidate, [X], tolerance=Tolerance(atol=0.0, rtol=0.0))

    assert {("r_dq", "r_dq"), ("W_dq", "W_dq"), ("y", "y")} <= pairs
    assert report.first_divergent == [] and all(layer.result.max_abs == 0.0 for layer in report.layers)


def test_chunked_exposure_gives_the_same_results():
    reference, candidate = parse(_REFERENCE), parse(_QDQ_CANDIDATE)
    provenance.record(candidate, "W_dq", "W")

    whole = localize(reference, candidate, [X], tolerance=Tolerance())
    chunked = localize(reference, candidate, [X], tolerance=Tolerance(), chunk_size=1)

    assert [layer.to_dict() for layer in chunked.layers] == [layer.to_dict() for layer in whole.layers]


def test_synthesized_token_ids_stay_inside_the_embedding_table_of_a_zoo_encoder():
    zoo = build_encoder(layers=1, hidden=32, heads=2, intermediate=64, vocab=50, max_positions=64, sequence=16)
    model = graphopt.load(zoo.model)

    ranges = integer_input_ranges(model)
    feeds = list(synthesize_feeds(model, count=20, seed=3, shapes={"input_ids": (2, 64), "attention_mask": (2, 64)}))

    assert ranges["input_ids"] == (0, 50)
    assert all(0 <= f["input_ids"].min() and f["input_ids"].max() < 50 for f in feeds)
    report = graphopt.validate(model, model, samples=4, per_layer=True)
    assert report.passed and report.per_layer.first_divergent == []


def test_encoder_validation_localizes_a_scaled_ffn_weight(tmp_path):
    zoo = build_encoder(layers=2, hidden=32, heads=2, intermediate=64, vocab=100, max_positions=64, sequence=16)
    reference = zoo.save(tmp_path / "ref")
    proto = onnx.load(reference)
    weight = next(t for t in proto.graph.initializer if "layer1" in t.name and "ffn" in t.name and len(t.dims) == 2)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    candidate = tmp_path / "cand.onnx"
    onnx.save(proto, candidate)

    report = graphopt.validate(reference, candidate, samples=3, per_layer=True)

    assert not report.passed
    first = report.per_layer.first_divergent[0]
    assert first.pair.node.startswith("layer1/ffn/") and first.pair.op == "MatMul"


def _conv_bn_conv(channels: int = 64, side: int = 48) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv with sums of ~600 terms of magnitude ~10."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((channels, channels, 3, 3)),
        "g": rng.uniform(0.5, 2.0, channels),
        "b": rng.standard_normal(channels),
        "m": rng.standard_normal(channels),
        "v": rng.uniform(0.01, 0.1, channels),
        "w2": rng.standard_normal((channels, channels, 3, 3)),
    }
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        onnx.helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
        onnx.helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        onnx.helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    shape = [1, channels, side, side]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_rounding_near_zero_after_a_lossless_fold_is_not_reported_as_drift():
    # Folding BatchNorm into the conv reorders float32 sums of ~600 terms; the output's
    # elements near zero then miss the elementwise rule (error ~1e-3 where |y| < 1), while
    # each tensor stays within rtol of its own peak (~1e4).
    reference = graphopt.load(_conv_bn_conv())
    candidate = graphopt.load(_conv_bn_conv())
    graphopt.run_pipeline(candidate, "fold")
    assert [node.op_type for node in candidate.graph] == ["Conv", "Relu", "Conv"]

    report = graphopt.validate(reference, candidate, samples=2, per_layer=True)

    (output,) = [result for _, result in report.outputs]
    assert not output.passed and output.violations > 0 and output.rel_l2 < 1e-5  # elementwise misses, rounding only
    assert "all within rtol of the peak |value|" in output.reason and output.reason.endswith("float rounding near zero?")
    assert {layer.pair.candidate for layer in report.per_layer.layers} == {"bn", "r", "y"}
    assert report.per_layer.first_divergent == []
    assert "none beyond atol=0.0001, rtol=0.001 of each tensor's peak |value|" in report.to_text()


def test_a_one_percent_weight_change_is_still_localized_to_its_conv():
    reference = graphopt.load(_conv_bn_conv(side=8))
    proto = _conv_bn_conv(side=8)
    weight = next(t for t in proto.graph.initializer if t.name == "w2")
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * np.float32(1.01), "w2"))

    report = graphopt.validate(reference, graphopt.load(proto), samples=2, per_layer=True)

    assert not report.passed
    assert [layer.pair.node for layer in report.per_layer.first_divergent] == ["conv2"]
    assert "of the peak |value|" in report.per_layer.first_divergent[0].result.reason


def test_chunks_grow_toward_the_byte_budget_and_shrink_past_it():
    from graphopt.localize import CHUNK_BYTES, next_chunk_size

    assert next_chunk_size(1024, 1 << 20) == 8 * 1024  # 1 MiB exposed: grow, by 8x at most
    assert next_chunk_size(1024, CHUNK_BYTES // 2) == 2048
    assert next_chunk_size(1024, CHUNK_BYTES * 4) == 256  # past the budget: shrink
    assert next_chunk_size(1, CHUNK_BYTES * 100) == 1
    assert next_chunk_size(16, 0) == 128  # nothing exposed (weights only): grow


def test_localize_opens_fewer_sessions_as_chunks_of_small_tensors_grow(monkeypatch):
    import graphopt.localize as localize_module

    relus = "\n".join(f"  t{i + 1} = Relu(t{i})" for i in range(40))
    model = parse(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] t0) => (float[2,4] t40) {{
{relus}
}}
""")
    opened = []

    class CountingRunner(localize_module.ModelRunner):
        def __init__(self, *args, **kwargs):
            opened.append(len(kwargs.get("extra_outputs", ())))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(localize_module, "ModelRunner", CountingRunner)
    report = localize(model, model, [{"t0": np.ones((2, 4), np.float32)}], tolerance=Tolerance(), chunk_size=4)

    # 40 tensors: chunks of 4, 32 and 4 (8x growth each time), two sessions each, instead of 10 chunks.
    assert len(report.layers) == 40 and report.first_divergent == []
    assert sorted(opened) == [4, 4, 4, 4, 32, 32]

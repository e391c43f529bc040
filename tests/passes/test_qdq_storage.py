"""int8 storage for layers the qdq pass returns to float for speed (passes/qdq/storage.py).

Such a layer's weight is stored as int8 with a scale per output channel and
widened by Cast -> Mul, which onnxruntime folds when the session opens: the
session computes the float graph with rounded weights. Error bound: only
weight rounding (half a step of max|w|/127 per channel), so outputs keep
cosine >= 0.9999 against float on these models, and a stored weight times
its input equals the float layer applied to the dequantized weight (1e-5).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import check_full, cosine, run_ort, to_proto

import model_zoo
from graphopt import load, run_pipeline
from graphopt.runtime import ModelRunner
from passes.qdq import QuantizePass, mixed, storage
from passes.qdq.quantize import QuantizationSummary

STORAGE_COSINE = 0.9999


def _session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    options.graph_optimization_level = level
    if path is not None:
        options.optimized_model_filepath = str(path)
    return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _int8_slower(sessions, candidate, feeds) -> float:
    """Latency ratio stand-in: models with Q/DQ nodes are slower than float, others as fast."""
    return 1.4 if any(node.op_type == "QuantizeLinear" for node in candidate.graph) else 1.0


def _stored_weight(node: ir.Node) -> np.ndarray | None:
    """The int8 initializer behind ``node``'s weight when it is widened by Cast -> Mul, else None."""
    multiply = node.inputs[1].producer()
    if multiply is None or multiply.op_type != "Mul":
        return None
    cast = multiply.inputs[0].producer()
    assert cast is not None and cast.op_type == "Cast" and cast.attributes.get_int("to") == ir.DataType.FLOAT
    return cast.inputs[0].const_value.numpy()


def test_an_opset_6_model_that_backs_off_stores_nothing_and_still_runs(monkeypatch):
    # onnxruntime has no Mul kernel before opset 7: the widening made such models unrunnable (exit 2).
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.setattr(mixed, "_latency_ratio", _int8_slower)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=4)
    model = load(proto)
    pass_ = QuantizePass(check_speed=True)

    result = run_pipeline(model, [pass_])

    assert result.modified is False and pass_.summary.stored == [] and pass_.summary.backed_off
    assert to_proto(result.model).SerializeToString() == to_proto(load(proto)).SerializeToString()
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(result.model, x)[0], run_ort(proto, x)[0])


def test_a_model_that_backs_off_keeps_its_kernels_float_and_its_weights_int8(monkeypatch, tmp_path):
    monkeypatch.setattr(mixed, "_latency_ratio", _int8_slower)
    zoo = model_zoo.build("mlp")
    original_bytes = len(zoo.model.SerializeToString())
    model = load(zoo.model)
    pass_ = QuantizePass(check_speed=True)

    result = run_pipeline(model, [pass_])

    check_full(result.model)
    ops = Counter(node.op_type for node in result.model.graph)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0 and ops["Cast"] == ops["Mul"] == 2
    gemms = [node for node in result.model.graph if node.op_type == "Gemm"]
    assert all(_stored_weight(node).dtype == np.int8 for node in gemms)
    assert [node.inputs[1].name for node in gemms] == ["fc1_weight", "fc2_weight"]  # names kept for validation
    assert result.model.opset_imports[""] == 17  # the model as given, not the upgraded one
    assert result.modified is True and sorted(pass_.summary.stored) == ["gemm_h", "gemm_y"]
    assert "stored as int8" in pass_.summary.line() and pass_.summary.latency_ratio == 1.0
    # Weights (and so the file, 99% weights) about 3.4x smaller; biases and scales stay float.
    assert len(to_proto(result.model).SerializeToString()) * 3.2 < original_bytes
    # onnxruntime folds the widening when the session opens: no Cast or Mul runs.
    optimized = tmp_path / "optimized.onnx"
    _session(result.model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized)
    assert not {"Cast", "Mul"} & {node.op_type for node in onnx.load(optimized).graph.node}
    want = _session(zoo.model).run(None, zoo.feeds)[0]
    got = _session(result.model).run(None, zoo.feeds)[0]
    assert cosine(want, got) >= STORAGE_COSINE


def test_slow_layers_in_an_int8_model_keep_int8_storage(monkeypatch):
    ratios = iter([0.9, 0.8, 1.0])  # full int8, the variant with the slow layer float
    monkeypatch.setattr(mixed, "_latency_ratio", lambda *args: next(ratios))
    monkeypatch.setattr(mixed, "slower_layers", lambda reference, model, layers, *args: {layers[0]: "9 us vs 4 us"})
    zoo = model_zoo.build("cnn_bn")
    pass_ = QuantizePass(check_speed=True)

    result = run_pipeline(load(zoo.model), [pass_])

    summary = pass_.summary
    (slow,) = summary.stored
    assert summary.float_layers[slow].startswith("int8 kernel slower") and slow not in summary.quantized
    layers = {node.name: node for node in result.model.graph if node.op_type in ("Conv", "Gemm")}
    assert _stored_weight(layers[slow]).dtype == np.int8
    for name in summary.quantized:
        assert layers[name].inputs[1].producer().op_type == "DequantizeLinear"
    assert summary.latency_ratio == 0.8 and "1 of them with int8-stored weights" in summary.line()
    want = _session(zoo.model).run(None, zoo.feeds)[0]
    got = _session(result.model).run(None, zoo.feeds)[0]
    assert cosine(want, got) >= 0.99  # int8 layers included: the qdq bound


def test_fallback_float_leaves_slow_layers_as_they_were(monkeypatch):
    monkeypatch.setattr(mixed, "_latency_ratio", _int8_slower)
    zoo = model_zoo.build("mlp")
    model = load(zoo.model)
    before = to_proto(model).SerializeToString()

    result = run_pipeline(model, "qdq(check_speed=true,fallback=float)")

    assert result.modified is False and to_proto(result.model).SerializeToString() == before


def test_storage_is_dropped_when_onnxruntime_runs_it_slower(monkeypatch):
    # Stands for an onnxruntime that stopped folding Cast -> Mul at load.
    monkeypatch.setattr(mixed, "_latency_ratio", lambda *args: 1.4)
    zoo = model_zoo.build("mlp")
    model = load(zoo.model)
    before = to_proto(model).SerializeToString()
    pass_ = QuantizePass(check_speed=True)

    result = run_pipeline(model, [pass_])

    assert result.modified is False and not pass_.summary.stored
    assert to_proto(result.model).SerializeToString() == before


def test_storage_is_dropped_when_it_misses_the_fidelity_target():
    zoo = model_zoo.build("mlp")
    model = load(zoo.model)
    with ModelRunner(model, threads=1) as runner:
        expected = [runner.run(zoo.feeds)]
    layers = ["gemm_h", "gemm_y"]

    summary = QuantizationSummary()
    with mixed._Sessions(model, threads=1) as sessions:
        unchanged = mixed._with_int8_storage(model, layers, summary, [zoo.feeds], expected, sessions, None, 300.0)
        stored = mixed._with_int8_storage(model, layers, summary, [zoo.feeds], expected, sessions, STORAGE_COSINE, None)

    assert unchanged is model  # no rounding reaches an SNR of 300 dB
    assert stored is not model and summary.stored == layers
    assert summary.fidelity["cosine"] >= STORAGE_COSINE and summary.weight_bytes_after * 3.5 < summary.weight_bytes_before


def _rules_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """MatMuls whose weights each break one storage rule but ``big``'s; ``given`` is also a graph input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "big": rng.standard_normal((32, 16)).astype(np.float32),
        "small": rng.standard_normal((8, 8)).astype(np.float32),  # 64 values: below MIN_ELEMENTS
        "broken": rng.standard_normal((32, 16)).astype(np.float32),
        "shared": rng.standard_normal((32, 16)).astype(np.float32),
        "given": rng.standard_normal((32, 16)).astype(np.float32),
        "starts": np.array([0], np.int64), "ends": np.array([8], np.int64), "axes": np.array([1], np.int64),
    }
    arrays["broken"][3, 4] = np.nan
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["x8"], name="slice")]
    for out, weight in (("a", "big"), ("c", "broken"), ("d", "shared"), ("e", "shared"), ("f", "given")):
        nodes.append(helper.make_node("MatMul", ["x", weight], [out], name=f"mm_{out}"))
    nodes.append(helper.make_node("MatMul", ["x8", "small"], ["b"], name="mm_b"))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 8 if o == "b" else 16]) for o in "abcdef"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]), helper.make_tensor_value_info("given", TensorProto.FLOAT, [32, 16])]
    graph = helper.make_graph(nodes, "rules", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32), "given": arrays["given"]}
    return load(proto), feeds


def test_only_private_finite_float_weights_big_enough_are_stored():
    model, feeds = _rules_model()
    want = _session(model).run(None, feeds)

    stored = storage.store_int8(model, {f"mm_{name}" for name in "abcdef"})

    assert stored.layers == ["mm_a"]
    check_full(model)
    (a,) = [node for node in model.graph if node.name == "mm_a"]
    q, scale = _stored_weight(a), a.inputs[1].producer().inputs[1].const_value.numpy()
    assert q.dtype == np.int8 and scale.shape == (1, 16) and np.abs(q).max() == 127
    x = feeds["x"].astype(np.float64)
    # Exact widening at every optimization level: the layer computes x @ (q * scale).
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _session(model, level).run(None, feeds)
        np.testing.assert_allclose(got[0], x @ (q * scale.astype(np.float64)), rtol=1e-5, atol=1e-5)
        for index in range(1, 6):  # the other layers did not change (outputs b..f)
            np.testing.assert_array_equal(got[index], want[index])


@pytest.mark.parametrize("fallback", ["int8", ""])
def test_bad_fallback_is_refused(fallback):
    with pytest.raises(ValueError, match="fallback must be storage or float"):
        QuantizePass(fallback=fallback)


def test_fold_after_qdq_keeps_the_int8_storage(monkeypatch):
    monkeypatch.setattr(mixed, "_latency_ratio", _int8_slower)
    zoo = model_zoo.build("mlp")
    model = load(zoo.model)
    run_pipeline(model, [QuantizePass(check_speed=True)])
    stored = to_proto(model).SerializeToString()

    result = run_pipeline(model, "fold")

    assert Counter(node.op_type for node in result.model.graph)["Cast"] == 2
    assert len(to_proto(result.model).SerializeToString()) <= len(stored)


@pytest.mark.parametrize(
    ("ratios", "slow_count", "message"),
    [
        ([1.2, 0.99, 1.0], 3, "int8 kernels were all slower than float"),  # the variant keeps no int8 layer
        ([1.3, 1.2, 1.0], 1, "int8 took 1.20x the float latency"),  # the variant is faster, still slower than float
    ],
    ids=["every-layer-slow", "variant-still-slower"],
)
def test_backing_off_after_the_slow_layer_variant_stores_every_layer_in_the_model_as_given(monkeypatch, ratios, slow_count, message):
    timings = iter(ratios)
    monkeypatch.setattr(mixed, "_latency_ratio", lambda *args: next(timings))
    monkeypatch.setattr(mixed, "slower_layers", lambda reference, model, layers, *args: {n: "9 us vs 4 us" for n in layers[:slow_count]})
    zoo = model_zoo.build("cnn_bn")
    pass_ = QuantizePass(check_speed=True)

    result = run_pipeline(load(zoo.model), [pass_])

    summary = pass_.summary
    assert summary.backed_off.startswith(message) and not summary.quantized
    assert sorted(summary.stored) == ["conv_c1", "conv_c2", "gemm_logits"]
    ops = Counter(node.op_type for node in result.model.graph)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0 and ops["Cast"] == 3
    assert ops["BatchNormalization"] == 2  # the model as given: qdq's BatchNorm folding is not kept
    want = _session(zoo.model).run(None, zoo.feeds)[0]
    assert cosine(want, _session(result.model).run(None, zoo.feeds)[0]) >= STORAGE_COSINE


def test_a_back_off_is_logged_for_library_callers_and_marked_as_in_the_summary(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(mixed, "_latency_ratio", _int8_slower)
    pass_ = QuantizePass(check_speed=True)
    with caplog.at_level(logging.WARNING, logger="passes.qdq.mixed"):
        run_pipeline(load(model_zoo.build("mlp").model), [pass_])

    (record,) = [r for r in caplog.records if "int8 took 1.40x the float latency" in r.getMessage()]
    assert record.graphopt_in_summary and "int8 took 1.40x the float latency" in pass_.summary.line()


def test_the_cli_hides_warnings_its_printed_summaries_repeat_and_only_while_it_runs():
    import logging

    from graphopt.cli import _summarized_warnings_hidden
    from graphopt.ledger import IN_SUMMARY

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    root, handler = logging.getLogger(), Keep(logging.WARNING)
    root.addHandler(handler)
    try:
        log = logging.getLogger("passes.qdq.mixed")
        with _summarized_warnings_hidden(True):
            log.warning("said in the summary", extra=IN_SUMMARY)
            log.warning("said only here")
        log.warning("said in the summary, library call", extra=IN_SUMMARY)
    finally:
        root.removeHandler(handler)

    assert seen == ["said only here", "said in the summary, library call"]

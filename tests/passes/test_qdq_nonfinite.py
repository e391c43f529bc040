"""qdq with NaN/Inf in weights or calibration data: no non-finite or zero scale, and the skip is reported.

A weight, bias or embedding table holding NaN/Inf stays float (its max-abs
scale would be NaN or Inf); calibration ignores non-finite activation values,
and a tensor that had no finite value keeps no Q/DQ. Every test checks that
each QuantizeLinear/DequantizeLinear scale is finite and positive.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import check_full, cosine, to_proto
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.errors import GraphoptError
from passes.qdq import QuantizePass
from passes.qdq import quantize as quantize_module
from passes.qdq.arithmetic import (
    ActivationParams,
    activation_params,
    quantize_bias,
    quantize_blockwise,
    quantize_per_channel,
)
from passes.qdq.calibration import METHODS

MIN_COSINE = 0.99
_ROWS, _FEATURES = 4, 16


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> ir.Model:
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs],
        [oh.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8))


def _float_input(name: str) -> tuple[str, int, list[int]]:
    return (name, TensorProto.FLOAT, [_ROWS, _FEATURES])


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _feeds(names: tuple[str, ...] = ("x",), count: int = 8, seed: int = 10) -> list[dict[str, np.ndarray]]:
    return [{name: _random((_ROWS, _FEATURES), seed + 100 * i + j) for j, name in enumerate(names)} for i in range(count)]


def _quantize(model: ir.Model, feeds, **options):
    pass_ = QuantizePass(data=feeds, check_speed=False, **options)
    original = to_proto(model)
    result = graphopt.run_pipeline(model, [pass_])
    return original, result, pass_


def _assert_scales_finite_and_positive(model: ir.Model) -> int:
    """Checks every Q/DQ scale initializer; returns how many Q/DQ nodes there are."""
    count = 0
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1].const_value.numpy()
            assert np.all(np.isfinite(scale)) and np.all(scale > 0), f"{node.name}: scale {scale}"
            count += 1
    return count


def _run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _weight_reader(model: ir.Model, node_name: str, index: int = 1) -> ir.Node | None:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].producer()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weight_or_bias_with_nonfinite_values_stays_float_and_the_skip_is_reported(bad):
    w2 = _random((_FEATURES, 8), 2)
    w2[0, 0] = w2[3, 5] = bad
    b3 = _random((8,), 4)
    b3[1] = bad
    model = _model(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
            oh.make_node("Add", ["h1", "b1"], ["y1"], name="add1"),
            oh.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"),
            oh.make_node("Gemm", ["x", "w3", "b3"], ["y3"], name="gemm3"),
        ],
        [_float_input("x")],
        [("y1", [_ROWS, 32]), ("y2", [_ROWS, 8]), ("y3", [_ROWS, 8])],
        {"w1": _random((_FEATURES, 32), 1), "b1": _random((32,), 5), "w2": w2, "w3": _random((_FEATURES, 8), 3), "b3": b3},
    )

    original, result, pass_ = _quantize(model, _feeds())

    details = result.ledger.rows[0].details
    assert details["float_layers"] == {"mm2": "weight w2 has 2 NaN/Inf values", "gemm3": "bias b3 has 1 NaN/Inf values"}
    assert details["quantized"] == ["mm1"] and "2 kept float" in details["summary"]
    assert _assert_scales_finite_and_positive(model) >= 4  # x's Q/DQ, w1's and b1's DQ
    assert _weight_reader(model, "mm1").op_type == "DequantizeLinear"
    assert _weight_reader(model, "mm2") is None and _weight_reader(model, "gemm3", 2) is None
    np.testing.assert_array_equal(model.graph.initializers["w2"].const_value.numpy(), w2)
    np.testing.assert_array_equal(model.graph.initializers["b3"].const_value.numpy(), b3)
    check_full(model)
    feeds = {"x": _random((_ROWS, _FEATURES), 99)}
    for want, got in zip(_run(original, feeds), _run(model, feeds)):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))  # the same NaN/Inf, nowhere else
        finite = np.isfinite(want)
        assert cosine(want[finite], got[finite]) >= MIN_COSINE


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibration_ignores_nonfinite_activation_values(method, bad):
    model = _model(
        [
            oh.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
            oh.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
            oh.make_node("Relu", ["a1"], ["h"], name="relu"),
            oh.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
            oh.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
        ],
        [_float_input("x")],
        [("y", [_ROWS, 8])],
        {"w1": _random((_FEATURES, 32), 1), "b1": _random((32,), 2), "w2": _random((32, 8), 3), "b2": _random((8,), 4)},
    )
    feeds = _feeds()
    for feed in feeds:
        feed["x"][0, 0], feed["x"][2, 5] = bad, -bad
    finite = np.concatenate([feed["x"][np.isfinite(feed["x"])] for feed in feeds])

    original, result, pass_ = _quantize(model, feeds, calibration=method)

    summary = pass_.summary
    assert summary.nonfinite_activations["x"] == 2 * len(feeds)
    assert summary.nonfinite_activations["h"] > 0  # the bad rows reach the second layer's input too
    assert sorted(summary.quantized) == ["mm1", "mm2"] and summary.float_activations == {}
    assert "NaN/Inf ignored in calibrating 2 tensors" in result.ledger.rows[0].details["summary"]
    assert _assert_scales_finite_and_positive(model) >= 6
    for value in model.graph.initializers.values():  # bias correction absorbed no NaN either
        assert np.all(np.isfinite(value.const_value.numpy().astype(np.float64))), value.name
    x_scale = float(model.graph.initializers["x_scale"].const_value.numpy())
    minmax = float(activation_params(finite.min(), finite.max()).scale)
    if method == "minmax":
        assert x_scale == pytest.approx(minmax, rel=1e-6)
    else:
        assert 0 < x_scale <= minmax * (1 + 1e-6)
    check_full(model)
    clean = {"x": _random((_ROWS, _FEATURES), 99)}
    assert cosine(_run(original, clean)[0], _run(model, clean)[0]) >= MIN_COSINE


def test_tensor_with_no_finite_calibration_value_keeps_no_qdq_and_is_reported():
    model = _model(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
            oh.make_node("MatMul", ["m", "w2"], ["h2"], name="mm2"),
            oh.make_node("Add", ["h1", "h2"], ["y"], name="sum"),
        ],
        [_float_input("x"), _float_input("m")],
        [("y", [_ROWS, 8])],
        {"w1": _random((_FEATURES, 8), 1), "w2": _random((_FEATURES, 8), 2)},
    )
    feeds = _feeds(("x", "m"))
    for feed in feeds:
        feed["m"][:] = np.nan

    original, result, pass_ = _quantize(model, feeds)

    details = result.ledger.rows[0].details
    assert details["float_activations"] == {"m": "no finite value in calibration"}
    assert details["nonfinite_activations"] == {"m": _ROWS * _FEATURES * len(feeds)}
    assert [user.op_type for user, _ in model.graph.inputs[1].uses()] == ["MatMul"]  # m: no QuantizeLinear
    assert [user.op_type for user, _ in model.graph.inputs[0].uses()] == ["QuantizeLinear"]
    assert _weight_reader(model, "mm2").op_type == "DequantizeLinear"  # its weight is still int8
    assert _assert_scales_finite_and_positive(model) >= 4
    check_full(model)
    clean = {"x": _random((_ROWS, _FEATURES), 98), "m": _random((_ROWS, _FEATURES), 99)}
    assert cosine(_run(original, clean)[0], _run(model, clean)[0]) >= MIN_COSINE


def test_embedding_table_with_nonfinite_rows_stays_float():
    table = _random((128, 64), 1)
    table[7, 3] = np.nan
    model = _model(
        [oh.make_node("Gather", ["table", "ids"], ["e"], name="gather"), oh.make_node("MatMul", ["e", "w"], ["y"], name="mm")],
        [("ids", TensorProto.INT64, [2, 3])],
        [("y", [2, 3, 8])],
        {"table": table, "w": _random((64, 8), 2)},
    )
    feeds = [{"ids": np.array([[7, 1, 2], [3, 4, 5]], np.int64)}] * 2 + [{"ids": np.array([[0, 1, 2], [3, 4, 5]], np.int64)}] * 2

    original, result, pass_ = _quantize(model, feeds)

    assert pass_.summary.float_layers == {"table": "embedding table has 1 NaN/Inf values"}
    assert pass_.summary.quantized == ["mm"] and pass_.summary.nonfinite_activations == {"e": 2}  # row 7 gathered in two samples
    assert [user.op_type for user, _ in model.graph.initializers["table"].uses()] == ["Gather"]
    np.testing.assert_array_equal(model.graph.initializers["table"].const_value.numpy(), table)
    assert _assert_scales_finite_and_positive(model) >= 3
    clean = {"ids": np.array([[0, 1, 2], [9, 10, 11]], np.int64)}
    assert cosine(_run(original, clean)[0], _run(model, clean)[0]) >= MIN_COSINE


def test_a_nonfinite_scale_that_slips_through_is_refused_with_a_graphopt_error(monkeypatch):
    matmul = oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = _model([matmul], [_float_input("x")], [("y", [_ROWS, 8])], {"w": _random((_FEATURES, 8), 1)})
    monkeypatch.setattr(quantize_module, "activation_params", lambda *a, **k: ActivationParams(np.float32(np.nan), np.uint8(0)))

    with pytest.raises(GraphoptError, match="unusable scale x_scale"):
        graphopt.run_pipeline(model, [QuantizePass(data=_feeds(), check_speed=False)])


def test_tiny_weights_get_a_usable_scale_not_a_subnormal_or_zero_one():
    weight = np.stack([np.full(8, 1e-40, np.float32), np.zeros(8, np.float32), np.linspace(-1, 1, 8, dtype=np.float32)])

    q, scales = quantize_per_channel(weight, 0)
    q4, scales4 = quantize_blockwise(weight, 1, 4)
    bias_q, bias_scales = quantize_bias(np.ones(3, np.float32), np.float32(1e-30), np.array([1e-10, 1e-10, 1], np.float32))

    tiny = np.finfo(np.float32).tiny
    for values in (scales, scales4, bias_scales):
        assert np.all(np.isfinite(values)) and np.all(values >= tiny)
    np.testing.assert_array_equal(q[:2], 0)
    np.testing.assert_array_equal(q4[:2], 0)
    assert scales[2] == pytest.approx(1 / 127) and np.abs(q[2]).max() == 127
    np.testing.assert_array_equal(bias_scales[:2], 1)  # 1e-40 would be subnormal: the fallback 1 instead
    np.testing.assert_array_equal(bias_q[:2], 1)

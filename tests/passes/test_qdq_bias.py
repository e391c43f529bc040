"""qdq and the biases of Gemm, MatMul + Add and Conv: every bias the float model adds is still added.

A bias qdq can write per output channel (a Conv's B, a Gemm's beta * C with
C the same on every row) becomes int32 and absorbs bias correction; any
other (a Gemm C of [M, 1], a shared or computed bias) stays as it is.
Dropping a bias moves each output row by beta * C, far beyond int8 rounding:
the tolerances below (cosine >= 0.999, mean error per column below 2% of
the outputs' spread) fail by an order of magnitude when that happens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import check_full, cosine, to_proto
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphopt import PassSpec, Tolerance, load, run_pipeline, validate
from passes.qdq import QuantizePass

M, K, N = 6, 64, 48
MIN_COSINE = 0.999
# Mean error of an output column, relative to the outputs' standard deviation: a lost bias gives about 1.
MAX_MEAN_SHIFT = 0.02


def _session(model, optimized: Path | None = None) -> ort.InferenceSession:
    """onnxruntime as deployed: default optimizations, so the int8 kernels are what runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(rng: np.random.Generator, shape: tuple[int, ...], count: int = 8, mean: float = 1.5) -> list[dict[str, np.ndarray]]:
    # Inputs far from zero on average, so bias correction has a shift to correct.
    return [{"x": (mean + rng.standard_normal(shape)).astype(np.float32)} for _ in range(count)]


def _gemm_model(c: np.ndarray, *, alpha=1.0, beta=1.0, trans_a=0, trans_b=0, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((N, K) if trans_b else (K, N)) / 8).astype(np.float32)
    gemm = oh.make_node("Gemm", ["x", "W", "C"], ["y"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    graph = oh.make_graph(
        [gemm], "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [K, M] if trans_a else [M, K])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], [nh.from_array(weight, "W"), nh.from_array(c, "C")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def _assert_close(original: onnx.ModelProto, model, feeds: list[dict[str, np.ndarray]]) -> None:
    want = np.concatenate([_session(original).run(None, f)[0] for f in feeds])
    got = np.concatenate([_session(model).run(None, f)[0] for f in feeds])
    assert got.shape == want.shape
    assert cosine(want, got) >= MIN_COSINE
    shift = np.abs((got - want).mean(axis=0)).max() / want.std()
    assert shift < MAX_MEAN_SHIFT, f"an output column moved by {shift:.3f} standard deviations on average"


def _quantize(proto: onnx.ModelProto, feeds, **options):
    model = load(proto)
    pass_ = QuantizePass(data=feeds, check_speed=False, **options)
    return model, run_pipeline(model, [pass_]), pass_


_RNG = np.random.default_rng(7)
# C that is the same on every row: becomes an int32 [N] bias.
_ROW_CONSTANT = {
    "scalar": np.array(0.75, np.float32),
    "one": np.array([0.5], np.float32),
    "vector": _RNG.standard_normal(N).astype(np.float32),
    "row": _RNG.standard_normal((1, N)).astype(np.float32),
}
# C that varies by row: stays the float C it was.
_ROW_VARYING = {
    "column": _RNG.standard_normal((M, 1)).astype(np.float32),
    "full": _RNG.standard_normal((M, N)).astype(np.float32),
}


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("shape", sorted(_ROW_CONSTANT))
def test_gemm_bias_same_on_every_row_becomes_int32_beta_included_when_c_is_not_a_vector(tmp_path, shape, beta, trans_b, correction):
    proto = _gemm_model(_ROW_CONSTANT[shape], beta=beta, trans_b=trans_b)
    feeds = _feeds(np.random.default_rng(1), (M, K))

    model, result, pass_ = _quantize(proto, feeds, bias_correction=correction)

    assert result.modified is True
    assert pass_.summary.quantized == ["Gemm_0"]
    assert bool(pass_.summary.corrected) is correction
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    bias = gemm.inputs[2].producer()
    assert bias.op_type == "DequantizeLinear" and bias.inputs[0].const_value.dtype.name == "INT32"
    assert bias.inputs[0].const_value.shape == (N,)
    assert "beta" not in gemm.attributes, "C now holds beta * C"
    assert "C" not in model.graph.initializers, "the original C is replaced, not left unused"
    check_full(model)
    _assert_close(proto, model, feeds)
    _session(model, tmp_path / "fused.onnx")
    assert Counter(node.op_type for node in onnx.load(tmp_path / "fused.onnx").graph.node)["QGemm"] == 1


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("shape", sorted(_ROW_VARYING))
def test_gemm_bias_that_varies_by_row_stays_as_it_is_when_the_weight_is_quantized(shape, beta, correction):
    proto = _gemm_model(_ROW_VARYING[shape], beta=beta, trans_b=1)
    feeds = _feeds(np.random.default_rng(2), (M, K))

    model, result, pass_ = _quantize(proto, feeds, bias_correction=correction)

    assert result.modified is True and pass_.summary.quantized == ["Gemm_0"]
    assert pass_.summary.corrected == [], "correcting it would replace the bias"
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    assert gemm.inputs[1].producer().op_type == "DequantizeLinear"
    assert gemm.inputs[2].name == "C" and gemm.inputs[2].const_value.shape == _ROW_VARYING[shape].shape
    assert gemm.attributes.get_float("beta", 1.0) == beta
    np.testing.assert_array_equal(gemm.inputs[2].const_value.numpy(), _ROW_VARYING[shape])
    check_full(model)
    _assert_close(proto, model, feeds)


@pytest.mark.parametrize("options", [{"alpha": 0.5}, {"trans_a": 1}, {"alpha": 2.0, "trans_a": 1, "trans_b": 1}])
@pytest.mark.parametrize("shape", ["scalar", "row", "column"])
def test_gemm_with_alpha_or_trans_a_stays_float_with_its_bias(shape, options):
    c = {**_ROW_CONSTANT, **_ROW_VARYING}[shape]
    proto = _gemm_model(c, beta=2.0, **options)
    feeds = _feeds(np.random.default_rng(3), (K, M) if options.get("trans_a") else (M, K))

    model, result, pass_ = _quantize(proto, feeds)

    assert result.modified is False
    assert pass_.summary.float_layers == {"Gemm_0": "Gemm with transA or alpha != 1"}
    check_full(model)
    for f in feeds:
        np.testing.assert_array_equal(_session(model).run(None, f)[0], _session(proto).run(None, f)[0])


@pytest.mark.parametrize("options", [{"weight_only": True}, {"weight_bits": 4}])
@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("shape", ["scalar", "row", "column", "vector"])
def test_weight_only_gemm_keeps_every_bias_shape_and_beta(shape, beta, options):
    c = {**_ROW_CONSTANT, **_ROW_VARYING}[shape]
    proto = _gemm_model(c, beta=beta, trans_b=1)
    # Zero-mean inputs: weight-only has no bias correction, and rounding then shifts no column on average.
    feeds = _feeds(np.random.default_rng(4), (M, K), mean=0.0)

    model, result, pass_ = _quantize(proto, feeds, **options)

    assert result.modified is True and pass_.summary.quantized == ["Gemm_0"]
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    assert gemm.inputs[2].name == "C" and gemm.attributes.get_float("beta", 1.0) == beta
    check_full(model)
    want = np.concatenate([_session(proto).run(None, f)[0] for f in feeds])
    got = np.concatenate([_session(model).run(None, f)[0] for f in feeds])
    # int4 blocks move outputs more than int8; a lost bias would still move a column by a standard deviation.
    assert cosine(want, got) >= (0.99 if options.get("weight_bits") == 4 else MIN_COSINE)
    assert np.abs((got - want).mean(axis=0)).max() / want.std() < 0.1


def _matmul_add_1_by_n(rng: np.random.Generator) -> onnx.ModelProto:
    """y = x @ W + B with B of shape [1, N]."""
    weight, bias = (rng.standard_normal((K, N)) / 8).astype(np.float32), rng.standard_normal((1, N)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Add", ["h", "B"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        [nh.from_array(weight, "W"), nh.from_array(bias, "B")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_fold_then_qdq_keeps_a_matmul_add_bias_of_shape_1_by_n():
    # fold turns MatMul + Add(B[1, N]) into Gemm(C=[1, N]); qdq must keep that C (was: cosine 0.888).
    rng = np.random.default_rng(5)
    proto = _matmul_add_1_by_n(rng)
    feeds = _feeds(rng, (M, K))

    model = load(proto)
    result = run_pipeline(model, [PassSpec("fold", {}), PassSpec("qdq", {"data": feeds, "check_speed": False})])

    assert result.modified is True
    assert [node.op_type for node in model.graph if node.op_type in ("Gemm", "MatMul", "Add")] == ["Gemm"]
    check_full(model)
    _assert_close(proto, model, feeds)


def test_matmul_add_bias_of_shape_1_by_n_stays_a_float_add():
    rng = np.random.default_rng(6)
    proto = _matmul_add_1_by_n(rng)
    feeds = _feeds(rng, (M, K))

    model, result, pass_ = _quantize(proto, feeds)

    assert result.modified is True and pass_.summary.quantized == ["MatMul_0"] and pass_.summary.corrected == []
    add = next(node for node in model.graph if node.op_type == "Add")
    assert add.inputs[1].name == "B" and add.inputs[1].const_value.shape == (1, N)
    check_full(model)
    _assert_close(proto, model, feeds)


def _conv_model(shared_bias: bool) -> onnx.ModelProto:
    """Two Convs reading one bias ``B``, or one Conv whose bias is a graph input ``B``.

        x -> Conv(W1, B) -> Relu -> Conv(W2, B) -> y        (shared_bias)
        x -> Conv(W1, B) -> y,  B a graph input            (otherwise)
    """
    rng = np.random.default_rng(8)
    w1 = (rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])]
    if shared_bias:
        nodes = [oh.make_node("Conv", ["x", "W1", "B"], ["a"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["a"], ["r"]),
                 oh.make_node("Conv", ["r", "W2", "B"], ["y"], pads=[1, 1, 1, 1])]
        initializers = [nh.from_array(w1, "W1"), nh.from_array(w2, "W2"), nh.from_array(bias, "B")]
    else:
        nodes = [oh.make_node("Conv", ["x", "W1", "B"], ["y"], pads=[1, 1, 1, 1])]
        initializers = [nh.from_array(w1, "W1")]
        inputs.append(oh.make_tensor_value_info("B", TensorProto.FLOAT, [8]))
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], initializers)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("shared_bias", [True, False])
def test_conv_bias_that_is_shared_or_an_input_is_kept_not_replaced_by_a_correction(shared_bias):
    proto = _conv_model(shared_bias)
    rng = np.random.default_rng(9)
    feeds = _feeds(rng, (1, 8, 10, 10))
    if not shared_bias:
        for f in feeds:
            f["B"] = rng.standard_normal(8).astype(np.float32)

    model, result, pass_ = _quantize(proto, feeds)

    assert result.modified is True and len(pass_.summary.quantized) == (2 if shared_bias else 1)
    assert pass_.summary.corrected == []
    assert all(node.inputs[2].name == "B" for node in model.graph if node.op_type == "Conv")
    check_full(model)
    _assert_close(proto, model, feeds)


def _conv_and_matmul_read_one_tensor() -> onnx.ModelProto:
    """t [N, 8, 8, 8] feeds a Conv (channels on axis 1) and a MatMul (channels on the last axis); C == W, so shapes agree."""
    rng = np.random.default_rng(0)
    offsets = (np.arange(8, dtype=np.float32) * 2).reshape(1, 8, 1, 1)  # a different mean per channel
    graph = oh.make_graph(
        [
            oh.make_node("Add", ["x", "offsets"], ["t"], name="shift"),
            oh.make_node("Conv", ["t", "W", "B"], ["y1"], pads=[1, 1, 1, 1], name="conv"),
            oh.make_node("MatMul", ["t", "W2"], ["m"], name="mm"),
            oh.make_node("Add", ["m", "B2"], ["y2"], name="mm_bias"),
        ],
        "shared",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [oh.make_tensor_value_info("y1", TensorProto.FLOAT, None), oh.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [nh.from_array(offsets, "offsets"), nh.from_array(rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32), "W"),
         nh.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B"), nh.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "W2"),
         nh.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B2")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_a_tensor_read_along_two_channel_axes_corrects_each_reader_with_its_own_means():
    # One set of means served both: the Conv was corrected with means along the width (y1 error 7.2e-3 -> 9.7e-3).
    proto = _conv_and_matmul_read_one_tensor()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)} for _ in range(8)]
    reference = [_session(load(proto)).run(None, f) for f in feeds]
    shift = {}
    for correction in (True, False):
        model, result, pass_ = _quantize(proto, feeds, bias_correction=correction)
        assert result.modified and {"conv", "mm"} <= set(pass_.summary.quantized)
        assert sorted(pass_.summary.corrected) == (["conv", "mm"] if correction else [])
        got = [_session(model).run(None, f) for f in feeds]
        # Mean error per output channel (Conv: axis 1 of y1; MatMul: last axis of y2), over samples and positions.
        shift[correction] = [
            float(np.abs(np.mean([np.moveaxis(g[i] - r[i], axis, -1).reshape(-1, 16).mean(axis=0) for g, r in zip(got, reference)], axis=0)).mean())
            for i, axis in ((0, 1), (1, -1))
        ]
    assert all(on < off / 2 for on, off in zip(shift[True], shift[False])), shift


def _gemm_and_conv(op: str) -> tuple[onnx.ModelProto, str, list[dict[str, np.ndarray]]]:
    """A Gemm with C [N] or a Conv with B (the bias's name is returned), and inputs far from zero so correction fires."""
    rng = np.random.default_rng(5)
    if op == "Gemm":
        return _gemm_model(rng.standard_normal(N).astype(np.float32)), "C", _feeds(rng, (M, K))
    proto = _conv_model(shared_bias=True)
    del proto.graph.node[1:]  # one Conv: x -> Conv(W1, B) -> y
    proto.graph.node[0].output[0] = "y"
    return proto, "B", _feeds(rng, (1, 8, 10, 10))


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_a_corrected_bias_is_not_paired_with_the_float_bias_when_validation_localizes(op):
    # Corrected on purpose, the bias was compared with the float one and listed first divergent
    # in a passing model (cnn_bn: fc_bias_dequantized at cosine 0.907, the output at 0.999995).
    proto, bias, feeds = _gemm_and_conv(op)
    for correction in (True, False):
        model, result, pass_ = _quantize(proto, feeds, bias_correction=correction)
        assert result.modified and pass_.summary.corrected == (pass_.summary.quantized if correction else [])
        check_full(model)
        report = validate(load(proto), model, feeds, tolerance=Tolerance(min_cosine=0.999), per_layer=True)
        assert report.passed
        paired = {layer.pair.reference: layer for layer in report.per_layer.layers}
        assert paired.keys() == ({"W" if op == "Gemm" else "W1", "y"} | (set() if correction else {bias}))
        assert not report.per_layer.first_divergent
        if not correction:  # the uncorrected int32 bias is its float self within a step of its scale
            assert paired[bias].pair.candidate == f"{bias}_dequantized" and paired[bias].result.passed

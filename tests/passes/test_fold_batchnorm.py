"""fold-batchnorm: inference BN folds into Conv/ConvTranspose/Gemm/MatMul, else becomes Mul + Add."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, check_full, run_ort, to_proto
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import run_pipeline
from passes.fold.batchnorm import FoldBatchNormPass

FLOAT = TensorProto.FLOAT


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _bn(x: str, y: str, channels: int, rng: np.random.Generator, prefix: str = "bn", **attrs):
    """A BN node reading ``x`` and its four parameter initializers."""
    inits = [
        _init(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels)),
        _init(f"{prefix}_B", rng.standard_normal(channels)),
        _init(f"{prefix}_mean", rng.standard_normal(channels)),
        _init(f"{prefix}_var", rng.uniform(0.5, 1.5, channels)),
    ]
    names = [x] + [t.name for t in inits]
    node = helper.make_node("BatchNormalization", names, [y], name=prefix, epsilon=1e-3, **attrs)
    return node, inits


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return graphopt.load(proto)


def _fold(model: ir.Model, **options):
    """Serializes the original first (the pass is in place), then runs the pass via the pipeline."""
    original = to_proto(model)
    result = run_pipeline(model, [FoldBatchNormPass(**options)])
    return original, result


def _check(original, result, feeds) -> None:
    check_full(result.model)
    assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))


def _conv_bn(*, bias: bool, group: int, c_out: int, c_in: int = 4, batch="N", seed: int = 0) -> ir.Model:
    #   x -> Conv(W[, b]) -> c -> BN -> y
    rng = np.random.default_rng(seed)
    inits = [_init("W", rng.standard_normal((c_out, c_in // group, 3, 3)))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(_init("b", rng.standard_normal(c_out)))
        conv_inputs.append("b")
    conv = helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "y", c_out, rng)
    x = helper.make_tensor_value_info("x", FLOAT, [batch, c_in, 5, 5])
    y = helper.make_tensor_value_info("y", FLOAT, [batch, c_out, 5, 5])
    return _model([conv, bn], [x], [y], inits + bn_inits)


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("group", "c_out"), [(1, 6), (2, 6), (4, 4), (4, 8)], ids=["g1", "g2", "depthwise", "dw-x2"])
def test_folds_into_conv_when_weight_is_owned(bias, group, c_out):
    model = _conv_bn(bias=bias, group=group, c_out=c_out)
    original, result = _fold(model)

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Conv"]
    assert graph.node(0).outputs[0].name == "y"
    assert len(graph.node(0).inputs) == 3
    # The old weight, bias and BN parameters are gone; only W' and b' remain.
    assert len(graph.initializers) == 2
    _check(original, result, {"x": _x((2, 4, 5, 5))})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("group", "c_in", "c_out"), [(1, 4, 6), (2, 4, 6), (2, 6, 4)])
def test_folds_into_conv_transpose_along_output_axis(bias, group, c_in, c_out):
    rng = np.random.default_rng(3)
    inits = [_init("W", rng.standard_normal((c_in, c_out // group, 3, 3)))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(_init("b", rng.standard_normal(c_out)))
        conv_inputs.append("b")
    conv = helper.make_node("ConvTranspose", conv_inputs, ["c"], group=group, strides=[2, 2])
    bn, bn_inits = _bn("c", "y", c_out, rng)
    x = helper.make_tensor_value_info("x", FLOAT, [1, c_in, 4, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [1, c_out, 9, 9])
    model = _model([conv, bn], [x], [y], inits + bn_inits)
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["ConvTranspose"]
    _check(original, result, {"x": _x((1, c_in, 4, 4))})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5), (3, 1), ()], ids=str)
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
def test_folds_into_gemm_honouring_trans_b_alpha_beta_and_c(trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(4)
    inits = [_init("B", rng.standard_normal((5, 4) if trans_b else (4, 5)))]
    gemm_inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(_init("C", rng.standard_normal(c_shape)))
        gemm_inputs.append("C")
    gemm = helper.make_node("Gemm", gemm_inputs, ["m"], transB=trans_b, alpha=alpha, beta=beta)
    bn, bn_inits = _bn("m", "y", 5, rng)
    a = helper.make_tensor_value_info("a", FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [3, 5])
    model = _model([gemm, bn], [a], [y], inits + bn_inits)
    original, result = _fold(model)

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Gemm"]
    assert graph.node(0).attributes.get_float("beta") == 1.0
    assert graph.node(0).attributes.get_float("alpha", 1.0) == alpha
    _check(original, result, {"a": _x((3, 4))})


@pytest.mark.parametrize("batch", [3, "N"])
def test_folds_into_2d_matmul_as_matmul_plus_add(batch):
    rng = np.random.default_rng(5)
    matmul = helper.make_node("MatMul", ["a", "B"], ["m"])
    relu = helper.make_node("Relu", ["y"], ["r"])
    bn, bn_inits = _bn("m", "y", 5, rng)
    a = helper.make_tensor_value_info("a", FLOAT, [batch, 4])
    outputs = [helper.make_tensor_value_info(n, FLOAT, [batch, 5]) for n in ("r", "y")]
    model = _model([matmul, bn, relu], [a], outputs, [_init("B", rng.standard_normal((4, 5)))] + bn_inits)
    original, result = _fold(model)

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["MatMul", "Add", "Relu"]
    # The scaled product is not the original "m"; the Add takes the BN's name.
    assert graph.node(0).outputs[0].name != "m"
    assert graph.node(1).outputs[0].name == "y"
    _check(original, result, {"a": _x((3, 4))})


@pytest.mark.parametrize("opset", [9, 17])
def test_folds_two_bns_in_a_row_into_one_conv(opset):
    #   x -> Conv(W) -> c -> BN -> m -> BN -> y
    rng = np.random.default_rng(14)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    bn1, inits1 = _bn("c", "m", 4, rng, prefix="bn1")
    bn2, inits2 = _bn("m", "y", 4, rng, prefix="bn2")
    x = helper.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", FLOAT, [1, 4, 5, 5])
    inits = [_init("W", rng.standard_normal((4, 4, 3, 3)))] + inits1 + inits2
    model = _model([conv, bn1, bn2], [x], [y], inits, opset=opset)
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Conv"]
    assert len(result.model.graph.initializers) == 2
    _check(original, result, {"x": _x((1, 4, 5, 5))})


def test_rewrites_3d_matmul_as_mul_add_when_channel_is_not_last_axis():
    rng = np.random.default_rng(6)
    matmul = helper.make_node("MatMul", ["a", "B"], ["m"])
    bn, bn_inits = _bn("m", "y", 3, rng)
    a = helper.make_tensor_value_info("a", FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 3, 5])
    model = _model([matmul, bn], [a], [y], [_init("B", rng.standard_normal((4, 5)))] + bn_inits)
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["MatMul", "Mul", "Add"]
    _check(original, result, {"a": _x((2, 3, 4))})


@pytest.mark.parametrize("shape", [["N", 4, 5, 5], [2, 4]], ids=["4d-dynamic-batch", "2d"])
def test_rewrites_standalone_bn_as_mul_add_when_input_is_a_graph_input(shape):
    rng = np.random.default_rng(7)
    bn, bn_inits = _bn("x", "y", 4, rng)
    x = helper.make_tensor_value_info("x", FLOAT, shape)
    y = helper.make_tensor_value_info("y", FLOAT, shape)
    model = _model([bn], [x], [y], bn_inits)
    original, result = _fold(model)

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Mul", "Add"]
    assert graph.node(1).outputs[0].name == "y"
    rank = len(shape)
    assert graph.node(0).inputs[1].shape.dims == (4,) + (1,) * (rank - 2)
    concrete = [3 if d == "N" else d for d in shape]
    _check(original, result, {"x": _x(concrete)})


def test_leaves_standalone_bn_when_option_is_off():
    rng = np.random.default_rng(7)
    bn, bn_inits = _bn("x", "y", 4, rng)
    x = helper.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", FLOAT, [1, 4, 5, 5])
    model = _model([bn], [x], [y], bn_inits)
    _, result = _fold(model, standalone=False)

    assert result.modified is False
    assert _ops(result.model.graph) == ["BatchNormalization"]


def test_leaves_standalone_bn_when_input_rank_is_unknown():
    rng = np.random.default_rng(7)
    bn, bn_inits = _bn("x", "y", 4, rng)
    x = helper.make_tensor_value_info("x", FLOAT, None)
    y = helper.make_tensor_value_info("y", FLOAT, None)
    model = _model([bn], [x], [y], bn_inits)
    _, result = _fold(model)

    assert result.modified is False


def _shared_weight() -> ir.Model:
    #   x -> Conv(W) -> c -> BN -> y
    #    \-> Conv(W) -> z            (W shared: must not change under the second Conv)
    rng = np.random.default_rng(8)
    conv1 = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    conv2 = helper.make_node("Conv", ["x", "W"], ["z"], pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "y", 4, rng)
    x = helper.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5])
    outputs = [helper.make_tensor_value_info(n, FLOAT, [1, 4, 5, 5]) for n in ("y", "z")]
    return _model([conv1, conv2, bn], [x], outputs, [_init("W", rng.standard_normal((4, 4, 3, 3)))] + bn_inits)


def _conv_output_also_read() -> ir.Model:
    #   x -> Conv(W) -> c -> BN -> y
    #                   \-> Relu -> z
    rng = np.random.default_rng(9)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["c"], ["z"])
    bn, bn_inits = _bn("c", "y", 4, rng)
    x = helper.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5])
    outputs = [helper.make_tensor_value_info(n, FLOAT, [1, 4, 5, 5]) for n in ("y", "z")]
    return _model([conv, relu, bn], [x], outputs, [_init("W", rng.standard_normal((4, 4, 3, 3)))] + bn_inits)


def _conv_weight_is_input() -> ir.Model:
    rng = np.random.default_rng(10)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "y", 4, rng)
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5]),
        helper.make_tensor_value_info("W", FLOAT, [4, 4, 3, 3]),
    ]
    y = helper.make_tensor_value_info("y", FLOAT, [1, 4, 5, 5])
    return _model([conv, bn], inputs, [y], bn_inits)


_NEGATIVES = {
    "shared-weight": (_shared_weight, ["Conv", "Conv", "BatchNormalization"]),
    "conv-output-also-read": (_conv_output_also_read, ["Conv", "Relu", "BatchNormalization"]),
    "weight-is-graph-input": (_conv_weight_is_input, ["Conv", "BatchNormalization"]),
}


def _negative_feeds(model: ir.Model) -> dict[str, np.ndarray]:
    return {v.name: _x(tuple(v.shape.dims), seed=i) for i, v in enumerate(model.graph.inputs)}


@pytest.mark.parametrize("case", list(_NEGATIVES))
def test_does_not_fold_into_conv_when_fold_is_illegal(case):
    build, ops = _NEGATIVES[case]
    model = build()
    _, result = _fold(model, standalone=False)

    assert result.modified is False
    assert _ops(result.model.graph) == ops


@pytest.mark.parametrize("case", list(_NEGATIVES))
def test_rewrites_unfoldable_bn_as_mul_add_and_keeps_conv(case):
    build, ops = _NEGATIVES[case]
    model = build()
    feeds = _negative_feeds(model)
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ops[:-1] + ["Mul", "Add"]
    _check(original, result, feeds)


def test_leaves_bn_in_training_mode():
    rng = np.random.default_rng(11)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "y", 4, rng, training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4, 5, 5])
    outputs = [
        helper.make_tensor_value_info("y", FLOAT, [2, 4, 5, 5]),
        helper.make_tensor_value_info("running_mean", FLOAT, [4]),
        helper.make_tensor_value_info("running_var", FLOAT, [4]),
    ]
    model = _model([conv, bn], [x], outputs, [_init("W", rng.standard_normal((4, 4, 3, 3)))] + bn_inits)
    before = to_proto(model).SerializeToString()
    _, result = _fold(model)

    assert result.modified is False
    assert to_proto(result.model).SerializeToString() == before


def _if_with_conv_bn() -> ir.Model:
    #   x ----> If(cond) -> y
    #     then: Conv(W, b) -> c -> BN -> t      (W outer-scope, BN params in the body)
    #     else: Relu(x) -> e
    rng = np.random.default_rng(12)
    conv = helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "t", 4, rng)
    shape = ["N", 4, 5, 5]
    then_graph = helper.make_graph(
        [conv, bn], "then", [], [helper.make_tensor_value_info("t", FLOAT, shape)], bn_inits
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", FLOAT, shape)]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    inputs = [
        helper.make_tensor_value_info("x", FLOAT, shape),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    y = helper.make_tensor_value_info("y", FLOAT, shape)
    inits = [_init("W", rng.standard_normal((4, 4, 3, 3))), _init("b", rng.standard_normal(4))]
    return _model([node], inputs, [y], inits)


@pytest.mark.parametrize("cond", [True, False])
def test_folds_conv_bn_inside_if_body(cond):
    model = _if_with_conv_bn()
    original, result = _fold(model)

    then_body = result.model.graph.node(0).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert _ops(then_body) == ["Conv"]
    assert [v.name for v in then_body.outputs] == ["t"]
    # The outer W and b were only read by the body Conv; nothing reads them now.
    assert list(result.model.graph.initializers) == []
    feeds = {"x": _x((2, 4, 5, 5)), "cond": np.array(cond)}
    _check(original, result, feeds)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _conv_bn(bias=True, group=2, c_out=6),
        _if_with_conv_bn,
        _shared_weight,
    ],
    ids=["conv", "if-body", "standalone"],
)
def test_second_run_changes_nothing(build):
    model = build()
    first = run_pipeline(model, [FoldBatchNormPass()])
    before = to_proto(model).SerializeToString()
    again = run_pipeline(model, [FoldBatchNormPass()])

    assert first.modified is True
    assert again.modified is False
    assert to_proto(model).SerializeToString() == before


def test_folds_when_batch_dim_is_dynamic():
    model = _conv_bn(bias=True, group=1, c_out=6, batch="batch")
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Conv"]
    for batch in (1, 5):
        feeds = {"x": _x((batch, 4, 5, 5))}
        assert_same_outputs(run_ort(original, feeds), run_ort(result.model, feeds))
    check_full(result.model)


def test_folds_conv_bn_inside_function_with_constant_nodes():
    # Functions cannot hold initializers: weights are Constant nodes there, and
    # the folded weights must be Constant nodes too.
    rng = np.random.default_rng(13)
    constants = [
        helper.make_node("Constant", [], [name], value=_init(name, array))
        for name, array in [
            ("W", rng.standard_normal((4, 4, 1, 1))),
            ("bn_scale", rng.uniform(0.5, 1.5, 4)),
            ("bn_B", rng.standard_normal(4)),
            ("bn_mean", rng.standard_normal(4)),
            ("bn_var", rng.uniform(0.5, 1.5, 4)),
        ]
    ]
    conv = helper.make_node("Conv", ["fx", "W"], ["c"])
    bn = helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["fy"])
    function = helper.make_function(
        "local", "ConvBn", ["fx"], ["fy"], [*constants, conv, bn], [helper.make_opsetid("", 17)]
    )
    graph = helper.make_graph(
        [helper.make_node("ConvBn", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 3, 3])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=8,
    )
    model = graphopt.load(proto)
    original, result = _fold(model)

    body = next(iter(result.model.functions.values()))
    assert result.modified is True
    assert sorted(_ops(body)) == ["Constant", "Constant", "Conv"]
    _check(original, result, {"x": _x((1, 4, 3, 3))})


def test_rejects_non_bool_standalone_option():
    with pytest.raises(ValueError, match="True or False"):
        FoldBatchNormPass(standalone="yes")  # type: ignore[arg-type]

"""fold-elementwise / fuse-matmul-add: constants after Conv/Gemm/MatMul fold into weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, check_full, parse, run_ort, to_proto
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import run_pipeline
from passes.fold.elementwise import FoldElementwisePass, FuseMatMulAddPass

FLOAT = TensorProto.FLOAT
CIN, COUT, HW = 3, 4, 5  # Conv: x [1,3,5,5] -> y [1,4,5,5]
ROWS, K, COLS = 2, 6, 4  # Gemm/MatMul: A [2,6] @ B [6,4] -> [2,4]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _constant_array(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    # Bounded away from zero so Div is well conditioned; mixed signs.
    rng = _rng(seed)
    magnitude = rng.uniform(0.5, 2.0, size=shape)
    sign = np.where(rng.uniform(size=shape) < 0.5, -1.0, 1.0)
    return (magnitude * sign).astype(np.float32)


def _values(array: np.ndarray) -> str:
    """Tensor literal for the onnx text syntax."""
    return ", ".join(f"{v:.6f}" for v in array.reshape(-1))


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return graphopt.load(proto)


def _out(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, shape)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _elementwise(op: str, constant_first: bool, y: str = "y", c: str = "c") -> onnx.NodeProto:
    return helper.make_node(op, [c, y] if constant_first else [y, c], ["z"])


def _run(model: ir.Model, pass_: ir.passes.PassBase):
    """Serializes the original first (the pass is in place), then runs the pass via the pipeline."""
    original = to_proto(model)
    return original, run_pipeline(model, [pass_])


def _assert_lossless(original: onnx.ModelProto, model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    check_full(model)
    assert_same_outputs(run_ort(original, feeds), run_ort(model, feeds))


def _assert_idempotent(model: ir.Model, pass_type: type) -> None:
    assert run_pipeline(model, [pass_type()]).modified is True
    before = to_proto(model).SerializeToString()
    again = run_pipeline(model, [pass_type()])
    assert again.modified is False
    assert to_proto(model).SerializeToString() == before


# ---------------------------------------------------------------- Conv


def _conv_model(
    op: str, c_shape, *, bias: bool = True, constant_first: bool = False, extra=(), extra_outputs=()
) -> ir.Model:
    #   x -> Conv(W[, B]) -> y -> op(y, c) -> z      (+ extra nodes and outputs)
    rng = _rng()
    # Small weights keep float32 rounding differences below the absolute tolerance.
    inits = [_init("W", 0.1 * rng.standard_normal((COUT, CIN, 3, 3))), _init("c", _constant_array(tuple(c_shape)))]
    if bias:
        inits.append(_init("B", rng.standard_normal(COUT)))
    conv = helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    return _model(
        [conv, _elementwise(op, constant_first), *extra],
        [helper.make_tensor_value_info("x", FLOAT, [1, CIN, HW, HW])],
        [_out("z", np.broadcast_shapes((1, COUT, HW, HW), tuple(c_shape))), *extra_outputs],
        inits,
    )


CONV_FEEDS = {"x": _rng(7).standard_normal((1, CIN, HW, HW)).astype(np.float32)}
CONV_SHAPES = [(), (1,), (COUT, 1, 1), (1, COUT, 1, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c_shape", CONV_SHAPES)
@pytest.mark.parametrize("op", ["Mul", "Div", "Add", "Sub"])
def test_folds_into_conv_when_constant_is_per_output_channel(op, c_shape, bias):
    model = _conv_model(op, c_shape, bias=bias)
    original, result = _run(model, FoldElementwisePass())

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Conv"]
    assert graph.outputs[0].name == "z" and graph.node(0).outputs[0] is graph.outputs[0]
    # Old weights and the folded constant are gone; Add/Sub create a bias if absent.
    has_bias = bias or op in ("Add", "Sub")
    assert len(graph.initializers) == 1 + has_bias
    replaced = {"c", "B"} | ({"W"} if op in ("Mul", "Div") else set())
    assert not replaced & set(graph.initializers)
    _assert_lossless(original, result.model, CONV_FEEDS)


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
@pytest.mark.parametrize("bias", [True, False])
def test_folds_into_conv_when_constant_is_the_first_operand(op, bias):
    # c * y and c + y commute; c - y negates W and b.
    model = _conv_model(op, (COUT, 1, 1), bias=bias, constant_first=True)
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Conv"]
    _assert_lossless(original, result.model, CONV_FEEDS)


@pytest.mark.parametrize(
    "op,c_shape",
    [
        ("Mul", (1, 1, HW, HW)),  # varies along the spatial axes
        ("Add", (1, 1, 1, HW)),
        ("Mul", (HW,)),  # a 1-D vector aligns with the last (width) axis, not channels
        ("Add", (2, COUT, 1, 1)),  # varies along the batch axis (and grows it)
        ("Mul", (1, 1, COUT, 1, 1)),  # higher rank than the output: grows it
    ],
)
def test_leaves_conv_when_broadcast_is_not_per_channel(op, c_shape):
    model = _conv_model(op, c_shape)
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Conv", op]
    _assert_lossless(original, result.model, CONV_FEEDS)


def test_leaves_conv_when_divisor_has_zero_or_constant_divides():
    for constant_first in (False, True):
        model = _conv_model("Div", (COUT, 1, 1), constant_first=constant_first)
        if not constant_first:
            model.graph.initializers["c"].const_value = ir.tensor(np.array([1, 0, 2, 3], np.float32).reshape(4, 1, 1))
        _, result = _run(model, FoldElementwisePass())
        assert result.modified is False
        assert _ops(result.model.graph) == ["Conv", "Div"]


def test_leaves_conv_when_weight_is_shared():
    # W also feeds a second Conv: scaling it would change that Conv too.
    second = helper.make_node("Conv", ["x", "W"], ["w2"], pads=[1, 1, 1, 1])
    model = _conv_model("Mul", (COUT, 1, 1), extra=[second], extra_outputs=[_out("w2", [1, COUT, HW, HW])])
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Conv", "Mul", "Conv"]
    _assert_lossless(original, result.model, CONV_FEEDS)


def test_leaves_conv_when_output_has_second_consumer():
    relu = helper.make_node("Relu", ["y"], ["r"])
    model = _conv_model("Mul", (COUT, 1, 1), extra=[relu], extra_outputs=[_out("r", [1, COUT, HW, HW])])
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Conv", "Mul", "Relu"]
    _assert_lossless(original, result.model, CONV_FEEDS)


def test_leaves_conv_when_its_output_is_a_graph_output():
    model = _conv_model("Add", (COUT, 1, 1), extra_outputs=[_out("y", [1, COUT, HW, HW])])
    _, result = _run(model, FoldElementwisePass())

    assert result.modified is False


def test_leaves_conv_when_other_operand_is_a_graph_input():
    conv = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    model = _model(
        [conv, _elementwise("Mul", False)],
        [
            helper.make_tensor_value_info("x", FLOAT, [1, CIN, HW, HW]),
            helper.make_tensor_value_info("c", FLOAT, [COUT, 1, 1]),
        ],
        [_out("z", [1, COUT, HW, HW])],
        [_init("W", _rng().standard_normal((COUT, CIN, 3, 3)))],
    )
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is False
    feeds = {**CONV_FEEDS, "c": _constant_array((COUT, 1, 1))}
    _assert_lossless(original, result.model, feeds)


def test_leaves_conv_when_weight_is_an_overridable_graph_input():
    # An initializer that is also a graph input can be fed at run time: not a constant.
    model = _conv_model("Mul", (COUT, 1, 1))
    model.graph.inputs.append(model.graph.initializers["W"])
    _, result = _run(model, FoldElementwisePass())
    assert result.modified is False


def test_folds_constant_nodes_and_chains_when_weights_are_constant_nodes():
    #   x -> Conv(Constant W, Constant B) -> Mul(Constant c) -> Add(initializer d) -> z
    rng = _rng()
    weight = numpy_helper.from_array(0.1 * rng.standard_normal((COUT, CIN, 3, 3)).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["W"], value=weight),
        helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(rng.standard_normal(COUT).astype(np.float32))),
        helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_constant_array((1, COUT, 1, 1)))),
        helper.make_node("Mul", ["y", "c"], ["m"]),
        helper.make_node("Add", ["d", "m"], ["z"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, [1, CIN, HW, HW])],
        [_out("z", [1, COUT, HW, HW])],
        [_init("d", _constant_array((COUT, 1, 1), seed=3))],
    )
    original, result = _run(model, FoldElementwisePass())

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Constant", "Constant", "Conv"]
    assert graph.outputs[0].name == "z" and list(graph.initializers) == []
    _assert_lossless(original, result.model, CONV_FEEDS)


def _conv_in_if_body(else_weight: str) -> ir.Model:
    #   x, cond -> If: then: Conv(x, W, B) -> Mul(s) -> o    else: Conv(x, <else_weight>) -> o2
    # W, W2, B and s are initializers of the main graph, read from the bodies.
    rng = _rng()

    w, w2 = 0.1 * rng.standard_normal((2, COUT * CIN * 9))
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,{CIN},{HW},{HW}] x, bool cond) => (float[1,{COUT},{HW},{HW}] out)
        <float[{COUT},{CIN},3,3] W = {{{_values(w)}}}, float[{COUT},{CIN},3,3] W2 = {{{_values(w2)}}},
         float[{COUT}] B = {{{_values(rng.standard_normal(COUT))}}}, float[{COUT},1,1] s = {{{_values(_constant_array((COUT,)))}}}> {{
          out = If(cond) <then_branch = t () => (float[1,{COUT},{HW},{HW}] o) {{
              y = Conv <pads = [1, 1, 1, 1]> (x, W, B)
              o = Mul(y, s)
            }}, else_branch = e () => (float[1,{COUT},{HW},{HW}] o2) {{
              o2 = Conv <pads = [1, 1, 1, 1]> (x, {else_weight})
            }}>
        }}
        """
    )


def test_leaves_if_body_conv_when_weight_is_shared_with_other_branch():
    _, result = _run(_conv_in_if_body("W"), FoldElementwisePass())
    assert result.modified is False


@pytest.mark.parametrize("cond", [True, False])
def test_folds_inside_if_body(cond):
    model = _conv_in_if_body("W2")
    original, result = _run(model, FoldElementwisePass())

    then_body = result.model.graph.node(0).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert _ops(then_body) == ["Conv"] and then_body.outputs[0].name == "o"
    assert not {"W", "B", "s"} & set(result.model.graph.initializers)
    _assert_lossless(original, result.model, {**CONV_FEEDS, "cond": np.array(cond)})


@pytest.mark.parametrize(
    "factory",
    [
        lambda: _conv_model("Mul", (COUT, 1, 1)),
        lambda: _conv_model("Sub", (1, COUT, 1, 1), bias=False, constant_first=True),
        lambda: _conv_in_if_body("W2"),
    ],
)
def test_second_run_changes_nothing_after_conv_fold(factory):
    _assert_idempotent(factory(), FoldElementwisePass)


# ---------------------------------------------------------------- Gemm / MatMul


def _gemm_model(
    op, c_shape, *, trans_b=0, alpha=1.0, beta=1.0, bias=True, constant_first=False, bias_shape=(COLS,)
) -> ir.Model:
    #   a -> Gemm(B[, C]) -> y -> op(y, c) -> z
    rng = _rng()
    b_shape = (COLS, K) if trans_b else (K, COLS)
    inits = [_init("B", rng.standard_normal(b_shape)), _init("c", _constant_array(tuple(c_shape)))]
    if bias:
        inits.append(_init("C", rng.standard_normal(bias_shape)))
    gemm = helper.make_node(
        "Gemm", ["a", "B", "C"] if bias else ["a", "B"], ["y"], transB=trans_b, alpha=alpha, beta=beta
    )
    return _model(
        [gemm, _elementwise(op, constant_first)],
        [helper.make_tensor_value_info("a", FLOAT, [ROWS, K])],
        [_out("z", np.broadcast_shapes((ROWS, COLS), tuple(c_shape)))],
        inits,
    )


GEMM_FEEDS = {"a": _rng(8).standard_normal((ROWS, K)).astype(np.float32)}


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [(), (COLS,), (1, COLS)])
@pytest.mark.parametrize("op", ["Mul", "Div", "Add", "Sub"])
def test_folds_into_gemm_when_constant_is_per_column(op, c_shape, trans_b, alpha, beta):
    model = _gemm_model(op, c_shape, trans_b=trans_b, alpha=alpha, beta=beta)
    original, result = _run(model, FoldElementwisePass())

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Gemm"] and graph.outputs[0].name == "z"
    assert graph.node(0).attributes.get_int("transB", 0) == trans_b
    _assert_lossless(original, result.model, GEMM_FEEDS)


@pytest.mark.parametrize("constant_first", [False, True])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_folds_into_gemm_without_bias(op, trans_b, constant_first):
    model = _gemm_model(op, (COLS,), trans_b=trans_b, beta=3.0, bias=False, constant_first=constant_first)
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Gemm"]
    _assert_lossless(original, result.model, GEMM_FEEDS)


@pytest.mark.parametrize("constant_first", [False, True])
@pytest.mark.parametrize("bias_shape", [(), (ROWS, 1), (ROWS, COLS)])
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_folds_into_gemm_when_bias_has_other_broadcast_shapes(op, bias_shape, constant_first):
    model = _gemm_model(op, (1, COLS), beta=0.5, bias_shape=bias_shape, constant_first=constant_first)
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Gemm"]
    _assert_lossless(original, result.model, GEMM_FEEDS)


@pytest.mark.parametrize("c_shape", [(ROWS, 1), (ROWS, COLS), (1, 1, COLS)])
def test_leaves_gemm_when_constant_varies_along_rows_or_grows_output(c_shape):
    model = _gemm_model("Mul", c_shape)
    _, result = _run(model, FoldElementwisePass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Gemm", "Mul"]


def _matmul_model(op: str, c_shape, a_shape=(ROWS, K)) -> ir.Model:
    rng = _rng()
    return _model(
        [helper.make_node("MatMul", ["a", "B"], ["y"]), _elementwise(op, False)],
        [helper.make_tensor_value_info("a", FLOAT, a_shape)],
        [_out("z", None if a_shape is None else np.broadcast_shapes((*a_shape[:-1], COLS), tuple(c_shape)))],
        [_init("B", rng.standard_normal((K, COLS))), _init("c", _constant_array(tuple(c_shape)))],
    )


@pytest.mark.parametrize("a_shape", [(ROWS, K), (3, ROWS, K)])
@pytest.mark.parametrize("c_shape", [(), (COLS,), (1, COLS)])
@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_folds_into_matmul_columns(op, c_shape, a_shape):
    model = _matmul_model(op, c_shape, a_shape)
    original, result = _run(model, FoldElementwisePass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["MatMul"]
    feeds = {"a": _rng(9).standard_normal(a_shape).astype(np.float32)}
    _assert_lossless(original, result.model, feeds)


@pytest.mark.parametrize("op,c_shape", [("Add", (COLS,)), ("Sub", (COLS,)), ("Mul", (ROWS, 1))])
def test_leaves_matmul_when_add_sub_or_row_constant(op, c_shape):
    _, result = _run(_matmul_model(op, c_shape), FoldElementwisePass())
    assert result.modified is False


def test_leaves_matmul_when_rank_unknown_and_constant_is_2d():
    _, result = _run(_matmul_model("Mul", (1, COLS), a_shape=None), FoldElementwisePass())
    assert result.modified is False


def test_leaves_custom_domain_elementwise_op():
    model = _conv_model("Mul", (COUT, 1, 1))
    model.graph.node(1).domain = "custom"
    model.opset_imports["custom"] = 1
    _, result = _run(model, FoldElementwisePass())
    assert result.modified is False


def test_folds_inside_function_with_constant_nodes():
    # Functions cannot hold initializers: the new weights are Constant nodes.
    rng = _rng()
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[1,{CIN},{HW},{HW}] x) => (float[1,{COUT},{HW},{HW}] out) {{
          out = local.Block(x)
        }}
        <domain: "local", opset_import: ["" : 17]>
        Block (x) => (z) {{
          W = Constant <value = float[{COUT},{CIN},3,3] {{{_values(0.1 * rng.standard_normal((COUT, CIN, 3, 3)))}}}> ()
          s = Constant <value = float[{COUT},1,1] {{{_values(_constant_array((COUT,)))}}}> ()
          y = Conv <pads = [1, 1, 1, 1]> (x, W)
          m = Mul(y, s)
          z = Sub(s, m)
        }}
        """
    )
    original, result = _run(model, FoldElementwisePass())

    function = next(iter(result.model.functions.values()))
    assert result.modified is True
    assert sorted(_ops(function)) == ["Constant", "Constant", "Conv"]
    assert function.outputs[0].name == "z"
    _assert_lossless(original, result.model, CONV_FEEDS)


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_second_run_changes_nothing_after_gemm_fold(op):
    _assert_idempotent(_gemm_model(op, (COLS,), trans_b=1, alpha=0.5, beta=2.0), FoldElementwisePass)


def test_options_reject_arguments():
    with pytest.raises(TypeError):
        FoldElementwisePass(True)  # type: ignore[call-arg]


# ---------------------------------------------------------------- FuseMatMulAdd


def _matmul_add_model(bias_shape, *, a_shape=(ROWS, K), bias_first=False, extra=(), extra_outputs=()) -> ir.Model:
    #   a -> MatMul(B) -> y -> Add(bias) -> z
    rng = _rng()
    add = helper.make_node("Add", ["bias", "y"] if bias_first else ["y", "bias"], ["z"])
    return _model(
        [helper.make_node("MatMul", ["a", "B"], ["y"]), add, *extra],
        [helper.make_tensor_value_info("a", FLOAT, a_shape)],
        [_out("z", None if a_shape is None else np.broadcast_shapes((*a_shape[:-1], COLS), tuple(bias_shape))), *extra_outputs],
        [_init("B", rng.standard_normal((K, COLS))), _init("bias", _constant_array(tuple(bias_shape)))],
    )


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("bias_shape", [(), (1,), (COLS,), (1, COLS)])
def test_fuses_matmul_add_into_gemm_when_a_is_2d(bias_shape, bias_first):
    model = _matmul_add_model(bias_shape, bias_first=bias_first)
    original, result = _run(model, FuseMatMulAddPass())

    graph = result.model.graph
    assert result.modified is True
    assert _ops(graph) == ["Gemm"] and graph.outputs[0].name == "z"
    assert [v.name for v in graph.node(0).inputs] == ["a", "B", "bias"]
    _assert_lossless(original, result.model, GEMM_FEEDS)


@pytest.mark.parametrize(
    "a_shape,bias_shape",
    [((3, ROWS, K), (COLS,)), (None, (COLS,)), ((ROWS, K), (ROWS, 1)), ((ROWS, K), (1, 1, COLS))],
)
def test_leaves_matmul_add_when_a_not_2d_or_bias_not_per_column(a_shape, bias_shape):
    model = _matmul_add_model(bias_shape, a_shape=a_shape)
    _, result = _run(model, FuseMatMulAddPass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["MatMul", "Add"]


def test_leaves_matmul_add_when_matmul_output_has_second_consumer():
    relu = helper.make_node("Relu", ["y"], ["r"])
    model = _matmul_add_model((COLS,), extra=[relu], extra_outputs=[_out("r", [ROWS, COLS])])
    original, result = _run(model, FuseMatMulAddPass())

    assert result.modified is False
    _assert_lossless(original, result.model, GEMM_FEEDS)


def test_leaves_matmul_add_when_bias_is_a_graph_input():
    model = _model(
        [helper.make_node("MatMul", ["a", "B"], ["y"]), helper.make_node("Add", ["y", "bias"], ["z"])],
        [helper.make_tensor_value_info("a", FLOAT, [ROWS, K]), helper.make_tensor_value_info("bias", FLOAT, [COLS])],
        [_out("z", [ROWS, COLS])],
        [_init("B", _rng().standard_normal((K, COLS)))],
    )
    _, result = _run(model, FuseMatMulAddPass())
    assert result.modified is False


@pytest.mark.parametrize("cond", [True, False])
def test_fuses_matmul_add_inside_if_body(cond):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{ROWS},{K}] a, bool cond) => (float[{ROWS},{COLS}] out)
        <float[{K},{COLS}] B = {{{", ".join(str(v) for v in range(K * COLS))}}}, float[{COLS}] b = {{1, -2, 3, 0.5}}> {{
          out = If(cond) <then_branch = t () => (float[{ROWS},{COLS}] o) {{
              y = MatMul(a, B)
              o = Add(y, b)
            }}, else_branch = e () => (float[{ROWS},{COLS}] o2) {{
              o2 = MatMul(a, B)
            }}>
        }}
        """
    )
    original, result = _run(model, FuseMatMulAddPass())

    then_body = result.model.graph.node(0).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert _ops(then_body) == ["Gemm"] and then_body.outputs[0].name == "o"
    feeds = {**GEMM_FEEDS, "cond": np.array(cond)}
    _assert_lossless(original, result.model, feeds)


def test_second_run_changes_nothing_after_matmul_add_fusion():
    _assert_idempotent(_matmul_add_model((COLS,)), FuseMatMulAddPass)


def test_fold_then_fuse_handles_matmul_mul_add_chain():
    #   a -> MatMul(B) -> Mul(s) -> Add(bias) -> z  ==>  Gemm(a, B*s, bias)
    rng = _rng()
    model = _model(
        [
            helper.make_node("MatMul", ["a", "B"], ["y"]),
            helper.make_node("Mul", ["y", "s"], ["m"]),
            helper.make_node("Add", ["m", "bias"], ["z"]),
        ],
        [helper.make_tensor_value_info("a", FLOAT, [ROWS, K])],
        [_out("z", [ROWS, COLS])],
        [_init("B", rng.standard_normal((K, COLS))), _init("s", _constant_array((COLS,))), _init("bias", rng.standard_normal(COLS))],
    )
    original = to_proto(model)
    result = run_pipeline(model, [FoldElementwisePass(), FuseMatMulAddPass()])

    assert result.modified is True
    assert _ops(result.model.graph) == ["Gemm"]
    _assert_lossless(original, result.model, GEMM_FEEDS)


def _reshaped_matmul_add_model(kind: str) -> ir.Model:
    #   x [ROWS, 2, K/2] -> Flatten | Reshape(shape) -> MatMul(B) -> Add(bias) -> z
    # No value_info: the intermediate shapes are unknown, as in most exports.
    rng = _rng()
    shapes = {"reshape_2d": [ROWS, K], "reshape_3d": [1, ROWS, K]}
    if kind == "flatten":
        head, initializers = [helper.make_node("Flatten", ["x"], ["a"])], []
    else:
        head = [helper.make_node("Reshape", ["x", "shape"], ["a"])]
        initializers = [numpy_helper.from_array(np.array(shapes[kind], dtype=np.int64), "shape")]
    out_shape = [1, ROWS, COLS] if kind == "reshape_3d" else [ROWS, COLS]
    return _model(
        [*head, helper.make_node("MatMul", ["a", "B"], ["y"]), helper.make_node("Add", ["y", "bias"], ["z"])],
        [helper.make_tensor_value_info("x", FLOAT, [ROWS, 2, K // 2])],
        [_out("z", out_shape)],
        [*initializers, _init("B", rng.standard_normal((K, COLS))), _init("bias", _constant_array((COLS,)))],
    )


@pytest.mark.parametrize("kind", ["flatten", "reshape_2d"])
def test_fuses_matmul_add_when_a_is_2d_by_its_producer(kind):
    model = _reshaped_matmul_add_model(kind)
    assert model.graph.node(0).outputs[0].shape is None
    original, result = _run(model, FuseMatMulAddPass())

    assert result.modified is True
    assert _ops(result.model.graph)[-1] == "Gemm" and "MatMul" not in _ops(result.model.graph)
    feeds = {"x": _rng(8).standard_normal((ROWS, 2, K // 2)).astype(np.float32)}
    _assert_lossless(original, result.model, feeds)


def test_leaves_matmul_add_when_a_is_reshaped_to_3d():
    _, result = _run(_reshaped_matmul_add_model("reshape_3d"), FuseMatMulAddPass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Reshape", "MatMul", "Add"]

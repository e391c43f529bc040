"""fold-constants: nodes computed only from constants become initializers of the same name."""

from __future__ import annotations

import numpy as np
import onnx.reference
import onnx_ir as ir
import pytest
from helpers import (
    assert_valid_and_equal,
    check_full,
    parse,
    run_ort,
    to_proto,
)

from graphopt import run_pipeline
from passes.fold.constants import FoldConstantsPass, _one_node_model

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3)).astype(np.float32)
C1, C2, C3 = (RNG.standard_normal((2, 3)).astype(np.float32) for _ in range(3))


def _lit(array: np.ndarray) -> str:
    return "{" + ",".join(repr(float(v)) for v in array.reshape(-1)) + "}"


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _fold(model: ir.Model, fold: FoldConstantsPass | None = None):
    """Serializes the original first (the pass is in place), then runs the pass via the pipeline."""
    original = to_proto(model)
    result = run_pipeline(model, [fold or FoldConstantsPass()])
    return original, result




def _chain(source: str) -> ir.Model:
    #   c1, c2 -> Mul -> m ; m, c3 -> Add -> k ; x, k -> Add -> y
    # The constants are initializers or Constant nodes.
    if source == "initializers":
        weights = f"<float[2,3] c1 = {_lit(C1)}, float[2,3] c2 = {_lit(C2)}, float[2,3] c3 = {_lit(C3)}>"
        constants = ""
    else:
        weights = ""
        constants = "\n".join(
            f"{name} = Constant <value = float[2,3] {_lit(arr)}> ()" for name, arr in (("c1", C1), ("c2", C2), ("c3", C3))
        )
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) {weights} {{
          {constants}
          m = Mul(c1, c2)
          k = Add(m, c3)
          y = Add(x, k)
        }}
        """
    )


@pytest.mark.parametrize("source", ["initializers", "constant_nodes"])
def test_folds_a_whole_chain_in_one_run_when_inputs_are_constants(source):
    model = _chain(source)
    original, result = _fold(model)

    graph = result.model.graph
    assert result.modified is True
    assert [op for op in _ops(graph) if op != "Constant"] == ["Add"]
    # The folded values keep their names; unused inputs are left to dce.
    assert {"m", "k"} <= set(graph.initializers)
    np.testing.assert_allclose(graph.initializers["k"].const_value.numpy(), C1 * C2 + C3, rtol=1e-6)
    assert_valid_and_equal(original, result.model, {"x": X})


def test_folds_both_outputs_when_a_multi_output_node_has_constant_inputs():
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) <float[2,3] c = {_lit(C1)}> {{
          s1, s2 = Split <axis = 0, num_outputs = 2> (c)
          y = Add(x, s1)
          z = Sub(x, s2)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add", "Sub"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    ("op", "attributes"),
    [("Shape", ""), ("Shape", "<start = 1>"), ("Shape", "<start = -1>"), ("Shape", "<start = 0, end = 1>"),
     ("Shape", "<end = -5>"), ("Size", "")],
)
def test_folds_shape_and_size_when_the_input_shape_is_static(op, attributes):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => ({"float[_]" if op == "Shape" else "float"} y) {{
          s = {op} {attributes} (x)
          y = Cast <to = 1> (s)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Cast"]
    assert result.model.graph.initializers["s"].const_value.dtype == ir.DataType.INT64
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_leaves_shape_and_size_when_the_input_shape_is_dynamic(op):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] x) => ({"float[_]" if op == "Shape" else "float"} y) {{
          s = {op}(x)
          y = Cast <to = 1> (s)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is False
    assert _ops(result.model.graph) == [op, "Cast"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    ("producer", "folds"),
    [
        ("sh = Constant <value = int64[2] {1000, 10000}> ()\n big = ConstantOfShape(sh)", False),
        ("sh = Constant <value = int64[2] {4, 4}> ()\n big = ConstantOfShape(sh)", True),
        ("lo = Constant <value = float {0.0}> ()\n hi = Constant <value = float {1e7}> ()\n"
         " st = Constant <value = float {1.0}> ()\n big = Range(lo, hi, st)", False),
        ("one = Constant <value = float[1] {1.0}> ()\n sh = Constant <value = int64[2] {1000, 10000}> ()\n"
         " big = Expand(one, sh)", False),
        ("one = Constant <value = float[1,1] {1.0}> ()\n reps = Constant <value = int64[2] {1000, 10000}> ()\n"
         " big = Tile(one, reps)", False),
    ],
)
def test_size_guard_leaves_nodes_whose_output_would_grow_the_model(producer, folds):
    #   <producer> -> big -> ReduceMax -> r ; x + r -> y
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) {{
          {producer}
          r = ReduceMax <keepdims = 0> (big)
          y = Add(x, r)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is folds
    ops = [op for op in _ops(result.model.graph) if op != "Constant"]
    big_op = producer.rsplit("= ", 1)[1].split("(")[0]
    assert ops == (["Add"] if folds else [big_op, "ReduceMax", "Add"])
    assert ("big" in result.model.graph.initializers) is folds
    assert_valid_and_equal(original, result.model, {"x": X})


def test_size_guard_options_leave_a_small_node_when_set_tighter():
    # ConstantOfShape([4, 4]) makes 64 bytes from 16: growth 4 > 1, and 64 > 0.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) <int64[2] sh = {4, 4}> {
          big = ConstantOfShape(sh)
          r = ReduceMax <keepdims = 0> (big)
          y = Add(x, r)
        }
        """
    )
    original, result = _fold(model, FoldConstantsPass(max_growth=1.0, max_output_bytes=0))

    assert result.modified is False
    assert _ops(result.model.graph) == ["ConstantOfShape", "ReduceMax", "Add"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    "options", [{"max_growth": 0}, {"max_growth": -1.0}, {"max_growth": True}, {"max_output_bytes": -1}, {"max_output_bytes": 1.5}]
)
def test_rejects_invalid_options(options):
    with pytest.raises(ValueError, match="must be"):
        FoldConstantsPass(**options)


def test_leaves_dequantize_linear_when_its_weight_is_constant():
    w = RNG.integers(-128, 127, size=(3, 3)).astype(np.int8)
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        <int8[3,3] w = {{{",".join(str(int(v)) for v in w.reshape(-1))}}}, float s = {{0.05}}, int8 z = {{3}}> {{
          wd = DequantizeLinear(w, s, z)
          y = MatMul(x, wd)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is False
    assert _ops(result.model.graph) == ["DequantizeLinear", "MatMul"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(("stored", "folds"), [("int8", False), ("uint8", False), ("int16", True), ("int32", True)])
def test_leaves_a_cast_that_widens_stored_int8_weights(stored, folds):
    # qdq's int8 storage: Cast(int8 w) * scale. Folding would bring back the float weight.
    w = RNG.integers(-100, 100, size=(3, 3)) + (100 if stored == "uint8" else 0)
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        <{stored}[3,3] w = {{{",".join(str(int(v)) for v in w.reshape(-1))}}}, float[3] s = {{0.05, 0.02, 0.01}}> {{
          wf = Cast <to = 1> (w)
          ws = Mul(wf, s)
          y = MatMul(x, ws)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is folds
    assert _ops(result.model.graph) == (["MatMul"] if folds else ["Cast", "Mul", "MatMul"])
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize(
    ("random_node", "node_count"),
    [
        ("r = RandomUniformLike(c)", 3),
        ("r = RandomNormalLike <mean = 2.0> (c)", 3),
        ("r = Bernoulli(c)", 3),
        ("m = Multinomial <sample_size = 1> (c)\n r = Cast <to = 1> (m)", 4),
    ],
)
def test_leaves_random_ops_when_their_inputs_are_constant(random_node, node_count):
    # r * 0 keeps the outputs comparable; r itself is not constant, so the Mul stays too.
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        <float[2,3] c = {_lit(np.full((2, 3), 0.5, np.float32))}, float zero = {{0.0}}> {{
          {random_node}
          q = Mul(r, zero)
          y = Add(x, q)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is False
    assert len(result.model.graph) == node_count
    assert_valid_and_equal(original, result.model, {"x": X})


def test_leaves_nodes_reading_an_initializer_that_is_also_a_graph_input():
    # The caller may feed a, so Mul(a, b) is not constant.
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x, float[2,3] a) => (float[2,3] y) <float[2,3] a = {_lit(C1)}, float[2,3] b = {_lit(C2)}> {{
          m = Mul(a, b)
          y = Add(x, m)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is False
    assert _ops(result.model.graph) == ["Mul", "Add"]
    assert_valid_and_equal(original, result.model, {"x": X, "a": C3})


def test_leaves_a_node_with_an_omitted_optional_output(caplog):
    # Unique's second output is omitted (""); the evaluator returns only the
    # named ones, so folding would have to realign them. Seen in onnx's LSTM,
    # GRU, RNN and Attention node tests (tests/passes/test_fold_backend_sweep.py).
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x) => (float[3] y) <float[4] c = {1.0, 2.0, 1.0, 3.0}> {
          u, "", inverse, counts = Unique <sorted = 1> (c)
          y = Add(x, u)
        }
        """
    )
    caplog.set_level("DEBUG", logger="passes.fold.constants")
    original, result = _fold(model)

    assert result.modified is False
    assert _ops(result.model.graph) == ["Unique", "Add"]
    assert "omitted optional output" in caplog.text
    assert_valid_and_equal(original, result.model, {"x": X[0]})


def test_leaves_a_sequence_built_from_constants_inside_an_if_branch():
    # Found by the CLI sweep (onnx's test_if_opt): the evaluator returns a list, which became
    # a float[1, 3] initializer where the branch's output is a sequence; onnxruntime refused the model.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool cond, float[3] x) => (seq(float[3]) y) <float[3] c = {1.0, 2.0, 3.0}> {
          y = If (cond) <
            then_branch = t () => (seq(float[3]) s) { q = SequenceConstruct (c)  s = Identity (q) },
            else_branch = e () => (seq(float[3]) s2) { s2 = SequenceConstruct (x) }
          >
        }
        """
    )
    original, result = _fold(model)

    assert result.modified is False
    then_branch = next(iter(result.model.graph)).attributes["then_branch"].as_graph()
    assert [node.op_type for node in then_branch] == ["SequenceConstruct", "Identity"]
    check_full(result.model)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": X[0]}
        want, got = run_ort(original, feeds)[0], run_ort(result.model, feeds)[0]
        assert len(want) == len(got) == 1
        np.testing.assert_array_equal(got[0], want[0])


def test_leaves_a_constant_node_whose_output_is_a_graph_output():
    #   c1, c2 -> Mul -> m (folds) ; m, c3 -> Add -> k (graph output: stays) ; x + k -> y
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] k)
        <float[2,3] c1 = {_lit(C1)}, float[2,3] c2 = {_lit(C2)}, float[2,3] c3 = {_lit(C3)}> {{
          m = Mul(c1, c2)
          k = Add(m, c3)
          y = Add(x, k)
        }}
        """
    )
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add", "Add"]
    assert [v.name for v in result.model.graph.outputs] == ["y", "k"]
    assert_valid_and_equal(original, result.model, {"x": X})


def _if_reading_outer_constants() -> ir.Model:
    #   x -> If(c):  then: p = Mul(a, d) [outer constants: folds into the body] ; o = Add(x, p)
    #                else: o2 = Neg(x)
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x, bool c) => (float[2,3] y) <float[2,3] a = {_lit(C1)}, float[2,3] d = {_lit(C2)}> {{
          y = If(c) <then_branch = t () => (float[2,3] o) {{
              p = Mul(a, d)
              o = Add(x, p)
            }}, else_branch = e () => (float[2,3] o2) {{
              o2 = Neg(x)
            }}>
        }}
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_folds_inside_an_if_body_when_it_reads_outer_constants(cond):
    model = _if_reading_outer_constants()
    original, result = _fold(model)

    graph = result.model.graph
    then_body = graph.node(0).attributes["then_branch"].as_graph()
    assert result.modified is True
    assert _ops(then_body) == ["Add"]
    assert list(then_body.initializers) == ["p"]
    assert sorted(graph.initializers) == ["a", "d"]
    assert_valid_and_equal(original, result.model, {"x": X, "c": np.array(cond)})


def test_falls_back_to_onnxruntime_when_the_reference_evaluator_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("simulated gap in the reference evaluator")

    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", broken)
    model = _chain("initializers")
    original, result = _fold(model)

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add"]
    assert_valid_and_equal(original, result.model, {"x": X})


@pytest.mark.parametrize("factory", [lambda: _chain("constant_nodes"), _if_reading_outer_constants])
def test_second_run_changes_nothing(factory):
    model = factory()
    run_pipeline(model, [FoldConstantsPass()])
    before = to_proto(model).SerializeToString()

    again = run_pipeline(model, [FoldConstantsPass()])

    assert again.modified is False
    assert to_proto(model).SerializeToString() == before


def test_single_node_models_carry_the_oldest_ir_version_of_their_opset():
    # onnx 1.23 writes IR version 14 by default and onnxruntime 1.31 refuses
    # it, which silently turned the onnxruntime fallback above into a no-op.
    model = _chain("initializers")
    node = model.graph.node(0)
    inputs = [value.const_value.numpy() for value in node.inputs]

    proto, feeds = _one_node_model(node, inputs, 17)

    assert proto.ir_version == 8  # the first IR version that carries opset 17
    assert sorted(feeds) == ["c1", "c2"]

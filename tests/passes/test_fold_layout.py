"""FoldTransposesPass and CollapseReshapesPass: layout-only chains fold exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import (
    assert_valid_and_equal,
    parse,
    run_through_pipeline,
    to_proto,
)

from graphopt import run_pipeline
from passes.fold.layout import CollapseReshapesPass, FoldTransposesPass

RNG = np.random.default_rng(0)
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
X4 = RNG.standard_normal((3, 3, 4, 5)).astype(np.float32)  # batch 3 for the dynamic N
X3 = RNG.standard_normal((3, 3, 4)).astype(np.float32)


def _ops(graph) -> list[str]:
    return [node.op_type for node in graph]


def _lit(array: np.ndarray) -> str:
    return "{" + ",".join(repr(float(v)) for v in array.reshape(-1)) + "}"


def _dims(dims: list) -> str:
    return ",".join(map(str, dims))


def _permuted(dims: list, perm: list[int] | None) -> list:
    return dims[::-1] if perm is None else [dims[axis] for axis in perm]


def _perm_attr(perm: list[int] | None) -> str:
    return "" if perm is None else f"<perm = [{','.join(map(str, perm))}]>"






def _assert_idempotent(model: ir.Model, pass_type: type) -> None:
    before = to_proto(model).SerializeToString()
    again = run_pipeline(model, [pass_type()])
    assert again.modified is False
    assert to_proto(model).SerializeToString() == before


# ---------------------------------------------------------------- Transposes


def _transpose_pair(p1: list[int] | None, p2: list[int] | None) -> ir.Model:
    #   x -> Relu -> r -> Transpose(p1) -> t1 -> Transpose(p2) -> t2 -> Sigmoid -> y
    y_dims = _dims(_permuted(_permuted(["N", 3, 4, 5], p1), p2))
    return parse(
        f"""
        {HEADER}
        g (float[N,3,4,5] x) => (float[{y_dims}] y) <float[N,3,4,5] r> {{
          r = Relu(x)
          t1 = Transpose{_perm_attr(p1)}(r)
          t2 = Transpose{_perm_attr(p2)}(t1)
          y = Sigmoid(t2)
        }}
        """
    )


@pytest.mark.parametrize(
    "p1, p2, expected",
    [
        ([0, 2, 3, 1], [0, 3, 1, 2], None),  # NCHW -> NHWC -> NCHW: identity
        (None, None, None),  # reverse twice: identity
        ([0, 2, 3, 1], [0, 2, 3, 1], [0, 3, 1, 2]),
        ([1, 0, 2, 3], [0, 1, 3, 2], [1, 0, 3, 2]),
        (None, [3, 2, 0, 1], [0, 1, 3, 2]),
    ],
)
def test_merges_consecutive_transposes_when_middle_has_one_reader(p1, p2, expected):
    model = _transpose_pair(p1, p2)
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    graph = result.model.graph
    if expected is None:
        assert _ops(graph) == ["Relu", "Sigmoid"]
    else:
        assert _ops(graph) == ["Relu", "Transpose", "Sigmoid"]
        assert list(graph.node(1).attributes.get_ints("perm")) == expected
    assert_valid_and_equal(original, result.model, {"x": X4})
    _assert_idempotent(result.model, FoldTransposesPass)


@pytest.mark.parametrize(
    "outputs, extra",
    [
        ("float[N,3,4,5] y, float[N,4,5,3] t1", ""),  # middle is a graph output
        ("float[N,3,4,5] y, float[N,4,5,3] y2", "w = Neg(t1)\n y2 = Identity(w)"),  # middle has a second reader
        ("float[N,3,4,5] t2", ""),  # identity pair would remove the graph output t2
    ],
)
def test_keeps_transposes_when_merging_is_not_legal(outputs, extra):
    model = parse(
        f"""
        {HEADER}
        g (float[N,3,4,5] x) => ({outputs}) {{
          t1 = Transpose<perm = [0,2,3,1]>(x)
          t2 = Transpose<perm = [0,3,1,2]>(t1)
          y = Sigmoid(t2)
          {extra}
        }}
        """
    )
    before = _ops(model.graph)
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is False
    assert _ops(result.model.graph) == before
    assert_valid_and_equal(original, result.model, {"x": X4})


W = RNG.standard_normal((2, 3, 4)).astype(np.float32)


@pytest.mark.parametrize("perm", [[2, 0, 1], [1, 0, 2], None])
def test_folds_transpose_of_initializer_into_new_initializer(perm):
    shape = np.transpose(W, perm).shape
    model = parse(
        f"""
        {HEADER}
        g (float[N,{_dims(shape)}] x) => (float[N,{_dims(shape)}] y) <float[2,3,4] w = {_lit(W)}> {{
          wt = Transpose{_perm_attr(perm)}(w)
          y = Add(x, wt)
        }}
        """
    )
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    graph = result.model.graph
    assert _ops(graph) == ["Add"]
    assert list(graph.initializers) == ["w_transposed"]
    np.testing.assert_array_equal(graph.initializers["w_transposed"].const_value.numpy(), np.transpose(W, perm))
    x = RNG.standard_normal((3, *shape)).astype(np.float32)
    assert_valid_and_equal(original, result.model, {"x": x})
    _assert_idempotent(result.model, FoldTransposesPass)


def test_keeps_shared_initializer_when_folding_its_transpose():
    #   w -> Transpose -> Add(x, .) ; w -> Mul(x2, w)   (w must not change under Mul)
    model = parse(
        f"""
        {HEADER}
        g (float[N,4,3,2] x, float[N,2,3,4] x2) => (float[N,4,3,2] y, float[N,2,3,4] y2) <float[2,3,4] w = {_lit(W)}> {{
          wt = Transpose(w)
          y = Add(x, wt)
          y2 = Mul(x2, w)
        }}
        """
    )
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add", "Mul"]
    assert sorted(result.model.graph.initializers) == ["w", "w_transposed"]
    feeds = {
        "x": RNG.standard_normal((3, 4, 3, 2)).astype(np.float32),
        "x2": RNG.standard_normal((3, 2, 3, 4)).astype(np.float32),
    }
    assert_valid_and_equal(original, result.model, feeds)


def test_folds_transpose_of_constant_node_and_removes_it():
    model = parse(
        f"""
        {HEADER}
        g (float[N,4,3,2] x) => (float[N,4,3,2] y) {{
          w = Constant<value = float[2,3,4] {_lit(W)}>()
          wt = Transpose(w)
          y = Add(x, wt)
        }}
        """
    )
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add"]
    assert_valid_and_equal(original, result.model, {"x": RNG.standard_normal((3, 4, 3, 2)).astype(np.float32)})


def test_folds_transpose_of_scalar_constant_into_a_scalar():
    # A 0-d constant stays 0-d: a [1] result would make y [1] instead of its declared [].
    model = parse(
        f"""
        {HEADER}
        g (float x) => (float y) <float c = {{2.0}}> {{
          t = Transpose(c)
          y = Add(x, t)
        }}
        """
    )
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Add"]
    (folded,) = result.model.graph.initializers.values()
    assert folded.const_value.numpy().shape == ()
    assert_valid_and_equal(original, result.model, {"x": np.array(1.5, np.float32)})


def test_keeps_transpose_when_initializer_is_also_a_graph_input():
    # An initializer listed as an input is a default the caller may override.
    model = parse(
        f"""
        {HEADER}
        g (float[N,4,3,2] x, float[2,3,4] w) => (float[N,4,3,2] y) <float[2,3,4] w = {_lit(W)}> {{
          wt = Transpose(w)
          y = Add(x, wt)
        }}
        """
    )
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is False
    assert _ops(result.model.graph) == ["Transpose", "Add"]
    x = RNG.standard_normal((3, 4, 3, 2)).astype(np.float32)
    assert_valid_and_equal(original, result.model, {"x": x, "w": W})


def _if_with_transposes() -> ir.Model:
    #   x -> If(c)
    #     then: Transpose(x) -> Transpose -> Neg -> o         (identity pair)
    #     else: Transpose(w outer initializer) -> Add(x, .) -> o2  (constant fold)
    return parse(
        f"""
        {HEADER}
        g (float[N,4,3,2] x, bool c) => (float[N,4,3,2] y) <float[2,3,4] w = {_lit(W)}> {{
          y = If(c) <then_branch = t () => (float[N,4,3,2] o) {{
              a = Transpose<perm = [0,2,3,1]>(x)
              b = Transpose<perm = [0,3,1,2]>(a)
              o = Neg(b)
            }}, else_branch = e () => (float[N,4,3,2] o2) {{
              wt = Transpose(w)
              o2 = Add(x, wt)
            }}>
        }}
        """
    )


@pytest.mark.parametrize("cond", [True, False])
def test_folds_transposes_inside_if_bodies(cond):
    model = _if_with_transposes()
    original, result = run_through_pipeline(model, FoldTransposesPass())

    assert result.modified is True
    if_node = result.model.graph.node(0)
    then_body = if_node.attributes["then_branch"].as_graph()
    else_body = if_node.attributes["else_branch"].as_graph()
    assert _ops(then_body) == ["Neg"]
    assert _ops(else_body) == ["Add"] and list(else_body.initializers) == ["w_transposed"]
    assert list(result.model.graph.initializers) == []
    feeds = {"x": RNG.standard_normal((3, 4, 3, 2)).astype(np.float32), "c": np.array(cond)}
    assert_valid_and_equal(original, result.model, feeds)
    _assert_idempotent(result.model, FoldTransposesPass)


# ------------------------------------------------------------------ Reshapes


@pytest.mark.parametrize(
    "links, inits",
    [
        ("a = Reshape(r, s1)", "int64[2] s1 = {0,12}"),
        ("a = Flatten<axis = 1>(r)", ""),
        ("u = Unsqueeze(r, ax)\n a = Squeeze(u, ax)", "int64[1] ax = {1}"),
        ("a = Reshape(r, s1)", "int64[4] s1 = {-1,1,3,4}"),
    ],
)
def test_collapses_chain_ending_in_constant_reshape_when_batch_is_dynamic(links, inits):
    #   x[N,3,4] -> Relu -> r -> <links> -> a -> Reshape(s2 = [-1,2,6]) -> z -> Sigmoid -> y
    model = parse(
        f"""
        {HEADER}
        g (float[N,3,4] x) => (float[N,2,6] y) <int64[3] s2 = {{-1,2,6}}{", " + inits if inits else ""}> {{
          r = Relu(x)
          {links}
          z = Reshape(a, s2)
          y = Sigmoid(z)
        }}
        """
    )
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is True
    graph = result.model.graph
    assert _ops(graph) == ["Relu", "Reshape", "Sigmoid"]
    assert graph.node(1).inputs[1].name == "s2" and graph.node(1).outputs[0].name == "z"
    assert_valid_and_equal(original, result.model, {"x": X3})
    _assert_idempotent(result.model, CollapseReshapesPass)


@pytest.mark.parametrize(
    "links, z_type",
    [
        ("a = Reshape(r, s1)\n z = Unsqueeze(a, ax)", "float[6,1,4] z"),
        ("a = Unsqueeze(r, ax)\n z = Flatten<axis = 3>(a)", "float[6,4] z"),
        ("a = Reshape(r, s1)\n b = Unsqueeze(a, ax)\n z = Squeeze(b, ax)", "float[6,4] z"),
        ("a = Reshape(r, s0)\n z = Reshape(a, s0)", "float[2,12] z"),  # copy-dim 0: needs the static rule
    ],
)
def test_collapses_chain_to_static_final_shape(links, z_type):
    model = parse(
        f"""
        {HEADER}
        g (float[2,3,4] x) => ({z_type.replace(" z", " y")})
          <{z_type}, int64[2] s1 = {{6,4}}, int64[2] s0 = {{0,-1}}, int64[1] ax = {{1}}> {{
          r = Relu(x)
          {links}
          y = Sigmoid(z)
        }}
        """
    )
    final = [int(d) for d in z_type.split("[")[1].split("]")[0].split(",")]
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is True
    graph = result.model.graph
    assert _ops(graph) == ["Relu", "Reshape", "Sigmoid"]
    assert graph.node(1).inputs[1].const_value.numpy().tolist() == final
    assert_valid_and_equal(original, result.model, {"x": X3[:2]})
    _assert_idempotent(result.model, CollapseReshapesPass)


def test_keeps_final_name_when_chain_ends_in_graph_output():
    model = parse(
        f"""
        {HEADER}
        g (float[N,3,4] x) => (float[N,2,6] y) <int64[3] s2 = {{-1,2,6}}> {{
          a = Flatten<axis = 1>(x)
          y = Reshape(a, s2)
        }}
        """
    )
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Reshape"]
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    assert_valid_and_equal(original, result.model, {"x": X3})


def test_removes_chain_when_input_already_has_final_shape():
    model = parse(
        f"""
        {HEADER}
        g (float[2,12] x) => (float[2,12] y) <float[2,12] r, float[2,12] z, int64[2] s1 = {{3,8}}, int64[2] s2 = {{2,12}}> {{
          r = Relu(x)
          a = Reshape(r, s1)
          z = Reshape(a, s2)
          y = Sigmoid(z)
        }}
        """
    )
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is True
    assert _ops(result.model.graph) == ["Relu", "Sigmoid"]
    assert_valid_and_equal(original, result.model, {"x": X3[:2].reshape(2, 12)})
    _assert_idempotent(result.model, CollapseReshapesPass)


@pytest.mark.parametrize(
    "body, y_type",
    [
        # s0 copies dim 0 of a changed intermediate and nothing is static.
        ("a = Reshape(x, s1)\n z = Reshape(a, s0)\n y = Sigmoid(z)", "float[M,12] y"),
        # the intermediate has a second reader.
        ("a = Reshape(x, s1)\n z = Reshape(a, s2)\n n = Neg(a)\n y = Add(z, z)", "float[N,2,6] y"),
        # a single Reshape that changes the shape: nothing to collapse.
        ("z = Reshape(x, s2)\n y = Sigmoid(z)", "float[N,2,6] y"),
    ],
)
def test_keeps_reshapes_when_collapsing_is_not_legal(body, y_type):
    model = parse(
        f"""
        {HEADER}
        g (float[N,3,4] x) => ({y_type}) <int64[3] s1 = {{-1,4,3}}, int64[2] s0 = {{0,-1}}, int64[3] s2 = {{-1,2,6}}> {{
          {body}
        }}
        """
    )
    before = _ops(model.graph)
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is False
    assert _ops(result.model.graph) == before
    assert_valid_and_equal(original, result.model, {"x": X3})


@pytest.mark.parametrize("cond", [True, False])
def test_collapses_reshapes_inside_if_body(cond):
    model = parse(
        f"""
        {HEADER}
        g (float[N,3,4] x, bool c) => (float[N,2,6] y) <int64[3] s2 = {{-1,2,6}}> {{
          y = If(c) <then_branch = t () => (float[N,2,6] o) {{
              a = Flatten<axis = 1>(x)
              b = Reshape(a, s2)
              o = Neg(b)
            }}, else_branch = e () => (float[N,2,6] o2) {{
              o2 = Reshape(x, s2)
            }}>
        }}
        """
    )
    original, result = run_through_pipeline(model, CollapseReshapesPass())

    assert result.modified is True
    then_body = result.model.graph.node(0).attributes["then_branch"].as_graph()
    assert _ops(then_body) == ["Reshape", "Neg"]
    assert_valid_and_equal(original, result.model, {"x": X3, "c": np.array(cond)})
    _assert_idempotent(result.model, CollapseReshapesPass)

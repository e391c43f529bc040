"""Property: on random valid graphs, dce, lift-constants and toposort keep every output.

Hypothesis draws a DAG of elementwise and MatMul nodes over one input, with
Constant-node operands, dead branches and an If whose bodies read outer-scope
values, then lists the nodes in a random order (still a valid ONNX graph after
toposort). After the pipeline the model must pass onnx.checker's full check
and give the same onnxruntime outputs within the lossless tolerances.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, check_full, run_ort
from hypothesis import given
from hypothesis import strategies as st

from graphopt import run_pipeline

pytestmark = pytest.mark.property  # examples bounded by the hypothesis profile (tests/conftest.py)

_UNARY = ("Relu", "Neg", "Tanh", "Sigmoid", "Abs")
_BINARY = ("Add", "Mul", "Sub", "MatMul")
_FLOAT = onnx.TensorProto.FLOAT


@st.composite
def random_models(draw) -> onnx.ModelProto:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = ["x"]
    nodes = []
    for index in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(("unary", "binary", "constant", "if")))
        out = f"v{index}"
        source = draw(st.sampled_from(values))
        if kind == "unary":
            nodes.append(onnx.helper.make_node(draw(st.sampled_from(_UNARY)), [source], [out]))
        elif kind == "binary":
            other = draw(st.sampled_from(values))
            nodes.append(onnx.helper.make_node(draw(st.sampled_from(_BINARY)), [source, other], [out]))
        elif kind == "constant":
            weight = onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32))
            nodes.append(onnx.helper.make_node("Constant", [], [f"{out}_w"], value=weight))
            nodes.append(onnx.helper.make_node(draw(st.sampled_from(_BINARY)), [source, f"{out}_w"], [out]))
        else:
            nodes.append(_if_node(source, out))
        values.append(out)
    outputs = draw(st.lists(st.sampled_from(values[1:] or ["x"]), min_size=1, max_size=3, unique=True))
    order = draw(st.permutations(range(len(nodes))))
    graph = onnx.helper.make_graph(
        [nodes[i] for i in order],
        "random",
        [onnx.helper.make_tensor_value_info("x", _FLOAT, [4, 4]), onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info(name, _FLOAT, [4, 4]) for name in outputs],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _if_node(source: str, out: str) -> onnx.NodeProto:
    """If(c): then Relu(source) + Constant, else Neg(source) with a dead Abs; outer-scope reads."""
    bias = onnx.numpy_helper.from_array(np.full((4, 4), 0.5, np.float32))
    then_body = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Constant", [], [f"{out}_b"], value=bias),
            onnx.helper.make_node("Relu", [source], [f"{out}_r"]),
            onnx.helper.make_node("Add", [f"{out}_r", f"{out}_b"], [f"{out}_t"]),
        ],
        f"{out}_then",
        [],
        [onnx.helper.make_tensor_value_info(f"{out}_t", _FLOAT, [4, 4])],
    )
    else_body = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Abs", [source], [f"{out}_dead"]),
            onnx.helper.make_node("Neg", [source], [f"{out}_e"]),
        ],
        f"{out}_else",
        [],
        [onnx.helper.make_tensor_value_info(f"{out}_e", _FLOAT, [4, 4])],
    )
    return onnx.helper.make_node("If", ["c"], [out], then_branch=then_body, else_branch=else_body)


@given(proto=random_models(), cond=st.booleans())
def test_pipeline_keeps_outputs_on_random_graphs(proto, cond):
    feeds = {"x": np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32), "c": np.array(cond)}
    model = ir.serde.deserialize_model(proto)

    result = run_pipeline(model, "toposort,lift-constants,dce")

    check_full(result.model)
    rewritten = ir.to_proto(result.model)
    assert not any(node.op_type == "Constant" for node in rewritten.graph.node)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in proto.graph.output]
    sorted_reference = ir.serde.deserialize_model(proto)
    sorted_reference.graph.sort()
    assert_same_outputs(run_ort(sorted_reference, feeds), run_ort(rewritten, feeds))

"""Unknown ops, custom domains and too-new versions: passes leave them alone, inspect and validate say so.

Numeric checks use com.microsoft ops that onnxruntime runs (Gelu,
FusedMatMul); ops nobody can run (``FooBar`` in the default domain, a
``com.example`` op) are checked by structure, and onnxruntime's refusal of
them must reach the user as one clear line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import (
    LOSSLESS_ATOL,
    LOSSLESS_RTOL,
    assert_same_outputs,
    check_full,
    run_ort,
)
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.cli import main
from graphopt.errors import UnsupportedModelError
from graphopt.runtime import ModelRunner
from graphopt.summary import summarize
from graphopt.support import runtime_limits

# The custom nodes' tensors: Gelu reads r and writes c, FusedMatMul reads f and w3 and writes z.
_EXPOSED = ["r", "c", "f", "z"]
_GELU_ATOL = 1e-5


def _mixed_model(kind: str, w3: np.ndarray | None = None) -> onnx.ModelProto:
    """Conv and MatMul layers around custom nodes.

    x -> Conv(w1, b1) -> Relu -> r -> CUSTOM -> c -> GlobalAveragePool -> Flatten -> f
    f -> MatMul(w2) -> Add(b2) -> y0 ;  f -> com.microsoft FusedMatMul(w3, alpha=0.5) -> z ;  y = y0 + z

    CUSTOM is com.microsoft Gelu (``kind="ms"``), com.example Foo(r, k) or
    the unknown FooBar(r, k) in the default domain (``"example"``, ``"unknown"``).
    """
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    custom = {
        "ms": oh.make_node("Gelu", ["r"], ["c"], domain="com.microsoft", name="custom"),
        "example": oh.make_node("Foo", ["r", "k"], ["c"], domain="com.example", name="custom", alpha=0.5),
        "unknown": oh.make_node("FooBar", ["r", "k"], ["c"], name="custom", alpha=0.5),
    }[kind]
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        oh.make_node("Relu", ["conv"], ["r"], name="relu"),
        custom,
        oh.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        oh.make_node("Flatten", ["g"], ["f"], name="flatten"),
        oh.make_node("MatMul", ["f", "w2"], ["mm"], name="mm"),
        oh.make_node("Add", ["mm", "b2"], ["y0"], name="add"),
        oh.make_node("FusedMatMul", ["f", "w3"], ["z"], domain="com.microsoft", alpha=0.5, name="fused"),
        oh.make_node("Add", ["y0", "z"], ["y"], name="sum"),
    ]
    weights = [weight("w1", (16, 3, 3, 3)), weight("b1", (16,)), weight("w2", (16, 32)), weight("b2", (32,)), weight("k", (1,))]
    weights.append(numpy_helper.from_array(w3 if w3 is not None else rng.standard_normal((16, 32)).astype(np.float32), "w3"))
    graph = oh.make_graph(
        nodes,
        "mixed",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        weights,
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)]
    if kind == "example":
        opsets.append(oh.make_opsetid("com.example", 1))
    return oh.make_model(graph, opset_imports=opsets, ir_version=8)


def _relu_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "relu",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)


def _custom_nodes(model: ir.Model | onnx.ModelProto) -> list[tuple]:
    """(domain, op, inputs, attributes) of every node outside the standard ONNX ops."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return [
        (node.domain, node.op_type, list(node.input), [oh.get_attribute_value(a) for a in node.attribute])
        for node in proto.graph.node
        if node.domain not in ("", "ai.onnx") or node.op_type == "FooBar"
    ]


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize(
    "spec", ["fold", "prune(skip=none)", "lowrank(min_gain=0,check_speed=false)", "qdq(check_speed=false)"]
)
def test_builtin_passes_leave_custom_nodes_alone_and_their_inputs_float_when_onnxruntime_runs_them(spec):
    original = _mixed_model("ms")
    model = graphopt.load(original)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}

    result = graphopt.run_pipeline(model, spec)

    assert result.modified is True  # the standard layers around the custom nodes were rewritten
    assert _custom_nodes(model) == _custom_nodes(original)
    np.testing.assert_array_equal(_initializer(model, "w3"), numpy_helper.to_array(original.graph.initializer[5]))
    producers = {value.name: value.producer() for node in model.graph for value in node.inputs if value is not None}
    assert all(producers[name] is None or producers[name].op_type != "DequantizeLinear" for name in ("r", "f", "w3"))
    check_full(model)
    # The custom nodes still compute their functions on float inputs: Gelu(r) and 0.5 * f @ w3.
    with ModelRunner(model, optimization="none", extra_outputs=_EXPOSED) as runner:
        got = runner.run(feeds)
    np.testing.assert_allclose(got["c"], _gelu(got["r"].astype(np.float64)), atol=_GELU_ATOL)
    np.testing.assert_allclose(got["z"], 0.5 * got["f"] @ _initializer(model, "w3"), rtol=1e-5, atol=1e-5)
    if spec == "fold":
        assert_same_outputs(run_ort(original, feeds), [got["y"]], rtol=LOSSLESS_RTOL, atol=LOSSLESS_ATOL)


@pytest.mark.parametrize("kind", ["example", "unknown"])
@pytest.mark.parametrize("spec", ["fold", "prune(skip=none)", "lowrank(min_gain=0,check_speed=false)"])
def test_passes_that_need_no_onnxruntime_rewrite_around_ops_nobody_can_run(kind, spec):
    original = _mixed_model(kind)
    model = graphopt.load(original)

    result = graphopt.run_pipeline(model, spec)

    assert result.modified is True
    assert _custom_nodes(model) == _custom_nodes(original)
    custom = next(node for node in model.graph if node.name == "custom")
    assert custom.inputs[0].producer().op_type == "Relu" and custom.inputs[1].const_value is not None
    np.testing.assert_array_equal(custom.inputs[1].const_value.numpy(), numpy_helper.to_array(original.graph.initializer[4]))
    assert [user.op_type for user, _ in custom.outputs[0].uses()] == ["GlobalAveragePool"]


def test_unchecked_int4_rewrites_around_a_custom_op_onnxruntime_cannot_run():
    # No calibration, fidelity or speed check: nothing needs onnxruntime.
    original = _mixed_model("example")
    model = graphopt.load(original)

    result = graphopt.run_pipeline(model, "qdq(weight_bits=4,check_speed=false,block_size=16)")

    assert _custom_nodes(model) == _custom_nodes(original)
    custom = next(node for node in model.graph if node.name == "custom")
    assert custom.inputs[1].const_value is not None  # the custom op's weight stays float
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    assert result.modified is True and matmul.inputs[1].producer().op_type == "DequantizeLinear"


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("example", "qdq", "custom op Foo of domain com.example has no kernel in onnxruntime " + ort.__version__),
        ("unknown", "qdq", r"op FooBar \(domain ai.onnx, opset 17\) is unknown to onnxruntime " + ort.__version__),
        ("unknown", "qdq(weight_bits=4,check_speed=false)", "cannot upgrade ops it does not know: FooBar"),
        ("example", "qdq(weight_bits=4)", "qdq measures the model by running it, but .*custom op Foo of domain com.example"),
    ],
)
def test_qdq_refuses_models_it_cannot_calibrate_or_upgrade_and_leaves_them_unchanged(kind, spec, message):
    model = graphopt.load(_mixed_model(kind))
    before = ir.to_proto(model).SerializeToString()

    with pytest.raises(UnsupportedModelError, match=message):
        graphopt.run_pipeline(model, spec)

    assert ir.to_proto(model).SerializeToString() == before


def test_inspect_reports_unknown_ops_custom_domains_and_nonfinite_weights(tmp_path, capsys):
    w3 = np.ones((16, 32), np.float32)
    w3[0, :3] = [np.nan, np.inf, -np.inf]
    proto = _mixed_model("unknown", w3=w3)
    path = tmp_path / "mixed.onnx"
    onnx.save(proto, path)

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    assert "unknown ops: FooBar" in text and "custom      com.microsoft" in text
    assert "NaN/Inf in weights: w3 (3)" in text
    assert data["unknown_ops"] == ["FooBar"] and data["custom_domains"] == ["com.microsoft"]
    assert data["nonfinite_weights"] == {"w3": 3}


def test_inspect_knows_ops_by_the_models_opset_and_its_own_functions():
    # Gelu joined the default domain in opset 20: at 17 it is unknown, at 20 it is not.
    for opset, unknown in ((17, ["Gelu"]), (20, [])):
        graph = oh.make_graph(
            [oh.make_node("Gelu", ["x"], ["h"]), oh.make_node("Twice", ["h"], ["y"], domain="local")],
            "g",
            [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
        body = [oh.make_node("Add", ["a", "a"], ["b"])]
        twice = oh.make_function("local", "Twice", ["a"], ["b"], body, [oh.make_opsetid("", opset)])
        opsets = [oh.make_opsetid("", opset), oh.make_opsetid("local", 1)]
        proto = oh.make_model(graph, opset_imports=opsets, functions=[twice])

        summary = summarize(graphopt.load(proto))

        assert summary.unknown_ops == unknown
        assert summary.custom_domains == ["local"] and summary.nonfinite_weights == {}


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (_mixed_model("unknown"), r"op FooBar \(domain ai.onnx, opset 17\) is unknown to onnxruntime {v}"),
        (_mixed_model("example"), r"custom op Foo of domain com.example has no kernel in onnxruntime {v}"),
        (_relu_model(opset=99), r"opset 99 of domain ai.onnx is newer than onnxruntime {v} supports \(up to opset \d+\)"),
        (_relu_model(ir_version=99), r"IR version 99 is newer than onnxruntime {v} supports \(up to \d+\)"),
    ],
    ids=["unknown-op", "custom-domain", "opset-99", "ir-99"],
)
def test_validate_names_what_onnxruntime_lacks_in_one_line_with_exit_2(tmp_path, capsys, proto, message):
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    pattern = message.format(v=ort.__version__.replace(".", r"\."))

    with pytest.raises(UnsupportedModelError, match=pattern):
        graphopt.validate(path, path, samples=1)
    code = main(["validate", str(path), str(path), "--samples", "1"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("graphopt: error: onnxruntime cannot open ")


@pytest.mark.parametrize("proto", [_relu_model(opset=99), _relu_model(ir_version=99)], ids=["opset-99", "ir-99"])
def test_sessions_map_onnxruntimes_version_refusal_to_unsupported_model_error(proto):
    # ModelRunner has no up-front check: this is onnxruntime's own message, translated.
    with pytest.raises(UnsupportedModelError, match=r"newer than onnxruntime .* supports \(up to (opset )?\d+\)"):
        ModelRunner(graphopt.load(proto))


def test_runtime_limits_are_exactly_what_onnxruntime_accepts():
    limits = runtime_limits()
    top, top_ir = limits.opsets["ai.onnx"], limits.ir_version
    feeds = {"x": np.array([[-1, 2, -3, 4]] * 2, np.float32)}

    with ModelRunner(graphopt.load(_relu_model(opset=top, ir_version=top_ir))) as runner:
        np.testing.assert_array_equal(runner.run(feeds)["y"], np.maximum(feeds["x"], 0))
    for proto in (_relu_model(opset=top + 1), _relu_model(ir_version=top_ir + 1)):
        with pytest.raises(UnsupportedModelError):
            graphopt.validate(graphopt.load(proto), graphopt.load(proto), samples=1)
    assert limits.version == ort.__version__ and top >= 21


def test_validate_warns_about_custom_ops_and_nonfinite_weights_in_text_and_json(tmp_path):
    w3 = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
    w3[3, 4], w3[5, 6] = np.nan, np.inf
    reference = tmp_path / "reference.onnx"
    onnx.save(_mixed_model("ms", w3=w3), reference)
    candidate = graphopt.load(reference)
    graphopt.run_pipeline(candidate, "fold")
    report_path = tmp_path / "report.json"

    code = main(["validate", str(reference), str(reference), "--samples", "2", "--report", str(report_path)])
    report = graphopt.validate(reference, candidate, samples=2)

    warnings = json.loads(report_path.read_text())["warnings"]
    custom = ["com.microsoft::FusedMatMul", "com.microsoft::Gelu"]
    assert [(w["model"], w["kind"], w["items"]) for w in warnings] == [
        ("reference", "custom_ops", custom),
        ("reference", "nonfinite_weights", {"w3": 2}),
        ("candidate", "custom_ops", custom),
        ("candidate", "nonfinite_weights", {"w3": 2}),
    ]
    assert code in (0, 1)  # NaN outputs: the verdict is the metrics' business, the warnings are ours
    text = report.to_text()
    assert "warning: candidate: NaN/Inf in weights: w3 (2)" in text
    assert "warning: reference: custom-domain ops" in text and "com.microsoft::Gelu" in text
    assert report.to_dict()["warnings"][1]["items"] == {"w3": 2}

"""qdq's opset upgrade on models with local functions (int4 needs opset 21, per-channel int8 opset 13).

onnx's version converter drops a model's functions; qdq upgrades each body
apart and puts it back, so the function keeps working and the checker
accepts its ops at the model's opset. A body that reads the function's
attributes cannot go through the converter (it loses the references):
that is a one-line error, exit code 2 on the command line.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import check_full, cosine, run_ort
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphopt import load, run_pipeline
from graphopt.cli import main
from graphopt.errors import UnsupportedModelError
from passes.qdq import QuantizePass


def _function_model(opset: int, body: list[onnx.NodeProto], attributes: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x -> MatMul(W) -> local:F -> y, F's body given, at ``opset`` in the model and in F.

    A second function G, which calls F, checks that calls between functions survive.
    """
    twice = oh.make_function("local", "F", ["a"], ["c"], body, opset_imports=[oh.make_opsetid("", opset)], attributes=list(attributes))
    outer = oh.make_function(
        "local", "G", ["a"], ["c"], [oh.make_node("F", ["a"], ["b"], domain="local"), oh.make_node("Relu", ["b"], ["c"])],
        opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid("local", 1)],
    )
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) / 8
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["t"]), oh.make_node("G", ["t"], ["y"], domain="local")], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [nh.from_array(weight, "W")],
    )
    model = oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid("local", 1)], functions=[twice, outer], ir_version=8
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _body_with_ops_that_changed_at_13(opset: int) -> list[onnx.NodeProto]:
    # Unsqueeze/Squeeze take axes as an input from opset 13 on; Add changed at 13 and 14.
    if opset >= 13:
        axes = oh.make_node("Constant", [], ["axes"], value=nh.from_array(np.array([0], np.int64)))
        return [axes, oh.make_node("Add", ["a", "a"], ["s"]), oh.make_node("Unsqueeze", ["s", "axes"], ["u"]),
                oh.make_node("Squeeze", ["u", "axes"], ["c"])]
    return [
        oh.make_node("Add", ["a", "a"], ["s"]),
        oh.make_node("Unsqueeze", ["s"], ["u"], axes=[0]),
        oh.make_node("Squeeze", ["u"], ["c"], axes=[0]),
    ]


def _opsets(function: onnx.FunctionProto) -> dict[str, int]:
    return {entry.domain: entry.version for entry in function.opset_import}


@pytest.mark.parametrize("opset,options,target", [(11, {}, 13), (17, {"weight_bits": 4}, 21), (11, {"weight_bits": 4}, 21)])
def test_opset_upgrade_keeps_local_functions_and_upgrades_their_bodies(opset, options, target):
    proto = _function_model(opset, _body_with_ops_that_changed_at_13(opset))
    model = load(proto)
    feeds = [{"x": np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)} for seed in range(4)]

    result = run_pipeline(model, [QuantizePass(data=feeds, check_speed=False, **options)])

    assert result.modified is True
    assert model.opset_imports[""] == target
    upgraded = {function.name: function for function in ir.to_proto(model).functions}
    assert sorted(upgraded) == ["F", "G"]
    assert _opsets(upgraded["F"])[""] == target and _opsets(upgraded["G"]) == {"": target, "local": 1}
    assert [node.op_type for node in upgraded["F"].node if node.op_type != "Constant"] == ["Add", "Unsqueeze", "Squeeze"]
    # axes moved from the attribute to an input
    assert all(len(node.input) == 2 and not node.attribute for node in upgraded["F"].node if node.op_type == "Unsqueeze")
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    assert matmul.inputs[1].producer().op_type == "DequantizeLinear"
    check_full(model)
    for f in feeds:
        assert cosine(run_ort(proto, f)[0], run_ort(model, f)[0]) >= (0.99 if options else 0.999)


def test_a_function_already_at_the_opset_is_kept_as_it_was():
    proto = _function_model(13, _body_with_ops_that_changed_at_13(13))
    model = load(proto)

    run_pipeline(model, [QuantizePass(check_speed=False, weight_only=True)])

    kept = {function.name: function for function in ir.to_proto(model).functions}
    assert model.opset_imports[""] == 13
    assert [node.SerializeToString() for node in kept["F"].node] == [node.SerializeToString() for node in proto.functions[0].node]
    check_full(model)


def _attribute_body() -> list[onnx.NodeProto]:
    leaky = oh.make_node("LeakyRelu", ["a"], ["c"])
    reference = onnx.AttributeProto(name="alpha", ref_attr_name="alpha", type=onnx.AttributeProto.FLOAT)
    leaky.attribute.append(reference)
    return [leaky]


def test_a_function_reading_its_attributes_cannot_be_upgraded_and_says_so():
    model = load(_function_model(11, _attribute_body(), attributes=("alpha",)))
    before = ir.to_proto(model).SerializeToString()

    with pytest.raises(UnsupportedModelError, match=r"opset 13 .* local function local:F has 11; its body reads the function's attributes"):
        run_pipeline(model, [QuantizePass(check_speed=False)])

    assert ir.to_proto(model).SerializeToString() == before


def test_command_line_reports_the_function_it_cannot_upgrade_in_one_line(tmp_path, capsys):
    path = tmp_path / "fn.onnx"
    onnx.save(_function_model(11, _attribute_body(), attributes=("alpha",)), path)

    code = main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--passes", "qdq(check_speed=false)"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("graphopt: error:") and "local function local:F" in err[0]
    assert not (tmp_path / "out.onnx").exists()

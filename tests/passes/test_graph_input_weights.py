"""Weights listed as graph inputs: left alone from IR version 4 on, made constants below it.

From IR version 4 a graph input with an initializer is a default a caller
may override, so no pass rewrites it. Below IR version 4 every initializer
must be a graph input and onnxruntime treats them as constants, so
run_pipeline first raises the model to IR 4 (graphopt/upgrade_ir.py) and
the passes then see ordinary weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, run_ort

from graphopt import load, run_pipeline
from graphopt.cli import main
from graphopt.upgrade_ir import UpgradeIrPass
from passes import BUILTIN_PASSES
from passes.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.prune.layer_checks import GRAPH_INPUT_WEIGHT
from passes.qdq import QuantizePass

X = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}


def _two_layers(ir_version: int, weights_are_inputs: bool) -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul with 64x64 initializers W1, W2 (opset 9), listed as graph inputs or not."""
    rng = np.random.default_rng(0)
    weights = {"W1": rng.standard_normal((64, 64)).astype(np.float32), "W2": rng.standard_normal((64, 64)).astype(np.float32)}
    h = onnx.helper
    inputs = [("x", [4, 64])] + ([("W1", [64, 64]), ("W2", [64, 64])] if weights_are_inputs else [])
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"]), h.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
        "g",
        [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in inputs],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
        [onnx.numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 9)], ir_version=ir_version)


_PASSES = [
    (lambda: QuantizePass(check_speed=False), lambda p: dict(p.summary.float_layers)),
    (lambda: PrunePass(sparsity=0.5, skip=""), lambda p: dict(p.summary.skipped)),
    (lambda: LowRankPass(ratio=0.5, check_speed=False), lambda p: dict(p.summary.skipped)),
]
_IDS = ["qdq", "prune", "lowrank"]


@pytest.mark.parametrize(("make", "reasons"), _PASSES, ids=_IDS)
def test_overridable_weights_are_left_alone_with_the_reason(make, reasons):
    proto = _two_layers(ir_version=8, weights_are_inputs=True)
    model = load(proto)
    pass_ = make()

    result = run_pipeline(model, [pass_])

    assert result.modified is False
    assert [row.name for row in result.ledger.rows] == [name for name, cls in BUILTIN_PASSES.items() if cls is type(pass_)]
    assert {reasons(pass_)[name] for name in ("fc1", "fc2")} == {GRAPH_INPUT_WEIGHT}
    np.testing.assert_array_equal(run_ort(model, X)[0], run_ort(proto, X)[0])


@pytest.mark.parametrize(("make", "reasons"), _PASSES, ids=_IDS)
def test_ir3_weights_are_rewritten_exactly_as_in_the_same_model_at_ir4(make, reasons):
    ir3 = load(_two_layers(ir_version=3, weights_are_inputs=True))
    ir4 = load(_two_layers(ir_version=4, weights_are_inputs=False))

    upgraded = run_pipeline(ir3, [make()])
    plain = run_pipeline(ir4, [make()])

    assert [row.name for row in upgraded.ledger.rows] == ["upgrade-ir", plain.ledger.rows[0].name]
    assert upgraded.ledger.rows[0].details["inputs_removed"] == 2
    assert upgraded.modified and plain.ledger.rows[0].modified
    assert ir3.ir_version == 4 and [v.name for v in ir3.graph.inputs] == ["x"]
    assert sorted(n.op_type for n in ir3.graph) == sorted(n.op_type for n in ir4.graph)
    assert_same_outputs(run_ort(ir4, X), run_ort(ir3, X), rtol=0, atol=1e-6)


def test_upgrade_alone_is_lossless_and_keeps_weights_named_as_before():
    proto = _two_layers(ir_version=3, weights_are_inputs=True)
    model = load(proto)

    result = run_pipeline(model, "upgrade-ir")

    assert [row.name for row in result.ledger.rows] == ["upgrade-ir"] and result.modified
    assert set(model.graph.initializers) == {"W1", "W2"} and model.opset_imports == {"": 9}
    assert_same_outputs(run_ort(proto, X), run_ort(model, X))
    assert run_pipeline(model, "upgrade-ir").modified is False  # IR 4 now: nothing to do


def test_upgrade_without_initializer_inputs_says_so():
    proto = _two_layers(ir_version=3, weights_are_inputs=False)  # not valid IR 3, but seen in the wild
    model = load(proto)

    result = run_pipeline(model, "upgrade-ir")

    assert result.ledger.rows[0].details["summary"] == "IR version 3 -> 4 (no initializer was a graph input)"
    assert_same_outputs(run_ort(proto, X), run_ort(model, X))


def test_models_from_ir4_on_get_no_upgrade_step():
    model = load(_two_layers(ir_version=4, weights_are_inputs=False))

    result = run_pipeline(model, "fold")

    assert [row.name for row in result.ledger.rows] == ["fold"]


def test_loop_body_inputs_stay_positional():
    """Only the main graph changes: a Loop body's inputs are its iteration number, condition and carried values."""
    text = """
    <ir_version: 3, opset_import: ["" : 9]>
    g (float[2] x, int64 n, float[2] w) => (float[2] y) {
      t = Constant <value = bool {1}> ()
      y = Loop (n, t, x) <body = body (int64 i, bool c, float[2] acc) => (bool c_out, float[2] acc_out) {
        c_out = Identity (c)
        acc_out = Add (acc, w)
      }>
    }
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0.5, -1.0], np.float32), "w"))
    model = load(proto)
    feeds = {"x": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}

    run_pipeline(model, "upgrade-ir")

    loop = next(node for node in model.graph if node.op_type == "Loop")
    assert [v.name for v in loop.attributes["body"].as_graph().inputs] == ["i", "c", "acc"]
    assert [v.name for v in model.graph.inputs] == ["x", "n"]
    assert_same_outputs(run_ort(proto, feeds), run_ort(model, feeds))


def test_cli_says_what_the_upgrade_did(tmp_path, capsys):
    source = tmp_path / "ir3.onnx"
    onnx.save(_two_layers(ir_version=3, weights_are_inputs=True), source)

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "fold"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "upgrade-ir: IR version 3 -> 4: 2 initializers are no longer graph inputs" in printed
    saved = onnx.load(tmp_path / "out.onnx")
    assert saved.ir_version == 4 and [v.name for v in saved.graph.input] == ["x"]
    assert_same_outputs(run_ort(source, X), run_ort(tmp_path / "out.onnx", X))


def test_the_pass_is_registered_under_its_pipeline_name():
    from passes import BUILTIN_PASSES

    assert BUILTIN_PASSES["upgrade-ir"] is UpgradeIrPass


def test_cli_pairs_the_users_steps_with_their_ledger_rows_after_the_upgrade(tmp_path, capsys):
    # upgrade-ir's row comes first; zipping the spec with the rows sent the quick check to fold's row.
    source = tmp_path / "ir3.onnx"
    onnx.save(_two_layers(ir_version=3, weights_are_inputs=True), source)

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "fold,qdq(check_speed=false)"])

    assert code == 0
    assert "quick check after qdq: output cosine" in capsys.readouterr().out


def test_cli_names_the_pass_that_failed_on_its_own_inputs_after_the_upgrade(tmp_path, capsys):
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32), "W")
    shape = onnx.numpy_helper.from_array(np.array([-1, 32], np.int64), "shape")
    graph = h.make_graph(
        [h.make_node("Reshape", ["x", "shape"], ["r"]), h.make_node("MatMul", ["r", "W"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N"]), h.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [32, 32]),
         h.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weight, shape],
    )
    source = tmp_path / "flat.onnx"  # N defaults to 1, which cannot be reshaped to [-1, 32]
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 9)], ir_version=3), source)

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "fold,qdq,prune"])

    assert code == 2
    assert "pass 'qdq' could not run the model on the inputs it synthesized" in capsys.readouterr().err

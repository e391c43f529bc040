"""The lossy passes synthesize their calibration inputs at the dims their ``shapes`` option gives (the CLI's --shape)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import cosine, run_ort

from graphopt import load, run_pipeline
from graphopt.cli import main
from graphopt.errors import GraphoptError
from passes.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.qdq import QuantizePass


def _runs_only_at_2_by_9() -> onnx.ModelProto:
    """ids [batch, seq] -> two 32-wide layers -> a Reshape to [18, 32] baked in: only batch 2, sequence 9 run."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 4, name)
               for name, shape in (("table", (50, 32)), ("w1", (32, 32)), ("w2", (32, 32)))]
    weights.append(onnx.numpy_helper.from_array(np.array([18, 32], np.int64), "flat"))
    h = onnx.helper
    graph = h.make_graph(
        [
            h.make_node("Gather", ["table", "ids"], ["e"]),
            h.make_node("Reshape", ["e", "flat"], ["x"]),
            h.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
            h.make_node("Relu", ["a"], ["r"]),
            h.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "g",
        [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [18, 32])],
        weights,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


PASSES = {
    "qdq": lambda **kw: QuantizePass(check_speed=False, **kw),
    "prune": lambda **kw: PrunePass(sparsity=0.5, reconstruct=True, skip="", **kw),
    "lowrank": lambda **kw: LowRankPass(ratio=0.5, data_aware=True, check_speed=False, min_gain=0.0, **kw),
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_pass_calibrates_at_the_given_shapes_and_fails_at_default_dims(name):
    proto = _runs_only_at_2_by_9()
    with pytest.raises(GraphoptError):
        run_pipeline(load(proto), [PASSES[name]()])  # sequence 16 cannot be reshaped to [18, 32]

    model = load(proto)
    result = run_pipeline(model, [PASSES[name](shapes=["ids:2x9"])])

    assert result.modified is True
    feeds = {"ids": np.random.default_rng(1).integers(0, 50, (2, 9), dtype=np.int64)}
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) >= 0.5  # changed, not broken: lossy at ratio 0.5


@pytest.mark.parametrize("value", ["ids:", "ids:2xa", ["ids2x9"], 3])
def test_malformed_shapes_are_refused_when_the_pass_is_built(value):
    with pytest.raises(ValueError, match="shapes must be NAME:DIMS items such as ids:2x9"):
        QuantizePass(shapes=value)


def test_the_cli_hands_shape_to_the_passes(tmp_path, capsys):
    source = tmp_path / "baked.onnx"
    onnx.save(_runs_only_at_2_by_9(), source)

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "qdq(check_speed=false)", "--shape", "ids:2x9"])

    out = capsys.readouterr().out
    assert code == 0 and "; changed\n" in out
    assert "quick check after qdq: output cosine" in out  # the quick check ran at those dims too

"""The quick check ``optimize`` runs after lossy passes changed a model and no --validate was asked."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_ort

import model_zoo
from graphopt import load
from graphopt import quick_check as quick_check_module
from graphopt.cli import main
from graphopt.data import synthesize_feeds


def _mlp(tmp_path: Path) -> Path:
    model_zoo.build("mlp").save(tmp_path)
    return tmp_path / "mlp.onnx"


def _optimize(capsys, source: Path, passes: str, *extra: str) -> str:
    code = main(["optimize", str(source), "-o", str(source.parent / "out.onnx"), "--passes", passes, *extra])
    assert code == 0 or "--validate" in extra  # validation may fail the lossy result: exit 1
    return capsys.readouterr().out


def _cosine_over(source: Path, result: Path, count: int) -> float:
    """The worst output cosine of the two files over the feeds validate synthesizes (seed 0)."""
    feeds = list(synthesize_feeds(load(source), count=count, seed=0))
    want = np.concatenate([run_ort(onnx.load(source), f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([run_ort(onnx.load(result), f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(want @ got / math.sqrt((want @ want) * (got @ got)))


def test_a_collapse_is_reported_with_the_measured_cosine_and_what_keeps_the_pass_closer(tmp_path, capsys):
    source = _mlp(tmp_path)

    out = _optimize(capsys, source, "lowrank(ratio=0.2,check_speed=false)")

    line = out.strip().splitlines()[-1]
    assert line.startswith("warning: lowrank moved the outputs far from the input's: output cosine "), out
    shown = float(re.search(r"output cosine (-?[0-9.]+) \(y\) against the input on 4 synthesized samples", line).group(1))
    assert shown == pytest.approx(_cosine_over(source, tmp_path / "out.onnx", 4), abs=1e-5) and shown < 0.99
    assert "closer: lowrank: target_cosine=" in line and "; changed\n" in out


def test_a_close_result_gets_one_line_with_its_cosine(tmp_path, capsys):
    source = _mlp(tmp_path)

    out = _optimize(capsys, source, "fold,qdq")

    line = out.strip().splitlines()[-1]
    shown = float(re.search(r"^quick check after qdq: output cosine ([0-9.]+) \(y\)", line).group(1))
    assert shown == pytest.approx(_cosine_over(source, tmp_path / "out.onnx", 4), abs=1e-5) and shown >= 0.99


@pytest.mark.parametrize(
    ("passes", "extra"),
    [("fold", []), ("prune(sparsity=0.5)", ["--no-quick-check"]), ("prune(sparsity=0.5)", ["--validate", "cpu"])],
    ids=["lossless", "opted-out", "validated-instead"],
)
def test_no_quick_check_without_a_lossy_change_when_opted_out_or_validated(tmp_path, capsys, passes, extra):
    out = _optimize(capsys, _mlp(tmp_path), passes, *extra)
    assert "quick check" not in out and "moved the outputs" not in out


def test_a_model_its_synthesized_inputs_cannot_run_is_reported_as_not_checked(tmp_path, capsys):
    # The Reshape's target shape is an input: random values cannot be a valid shape. The
    # second MatMul is the one prune changes (the last layer is skipped as the classifier).
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
            onnx.helper.make_node("MatMul", ["h", "w2"], ["m"]),
            onnx.helper.make_node("Reshape", ["m", "shape"], ["y"]),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64]),
            onnx.helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(first, "w1"), onnx.numpy_helper.from_array(second, "w2")],
    )
    source = tmp_path / "reshape.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), source)

    out = _optimize(capsys, source, "prune(sparsity=0.5)")

    assert out.strip().splitlines()[-1].startswith("quick check not run (onnxruntime failed running"), out
    assert (tmp_path / "out.onnx").exists()


def test_models_over_the_weight_limit_are_not_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quick_check_module, "MAX_WEIGHT_BYTES", 1024)

    out = _optimize(capsys, _mlp(tmp_path), "prune(sparsity=0.5)")

    assert out.strip().splitlines()[-1].startswith("quick check skipped: weights over "), out


def test_an_unexpected_failure_of_the_check_still_saves_the_result(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(quick_check_module, "validate", broken)

    out = _optimize(capsys, _mlp(tmp_path), "prune(sparsity=0.5)")

    assert out.strip().splitlines()[-1].startswith("quick check failed (RuntimeError: boom)"), out
    assert (tmp_path / "out.onnx").exists()


def _calibration(tmp_path: Path, files: int) -> Path:
    """Feeds far from the N(0, 1) ones the check synthesizes: all positive, scaled by 5, one batch of 3 rows per file."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for index in range(files):
        np.savez(folder / f"{index:02d}.npz", x=(5 * np.abs(rng.standard_normal((3, 64)))).astype(np.float32))
    return folder


def _cosine_on_files(source: Path, result: Path, files: list[Path]) -> float:
    feeds = [{"x": np.load(path)["x"]} for path in files]
    want = np.concatenate([run_ort(onnx.load(source), f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([run_ort(onnx.load(result), f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(want @ got / math.sqrt((want @ want) * (got @ got)))


@pytest.mark.parametrize("files", [6, 2])
def test_with_calib_data_the_check_runs_on_up_to_four_calibration_samples_and_says_what_they_are(tmp_path, capsys, files):
    source = _mlp(tmp_path)
    calib = _calibration(tmp_path, files)

    out = _optimize(capsys, source, "lowrank(ratio=0.3,check_speed=false)", "--calib-data", str(calib))

    line = out.strip().splitlines()[-1]
    used = min(files, quick_check_module.SAMPLES)
    found = re.search(rf"output cosine (-?[0-9.]+) \(y\) against the input on {used} of the calibration samples the passes fitted", line)
    assert found, line
    expected = _cosine_on_files(source, tmp_path / "out.onnx", sorted(calib.iterdir())[:used])
    assert float(found.group(1)) == pytest.approx(expected, abs=1e-5)
    assert float(found.group(1)) != pytest.approx(_cosine_over(source, tmp_path / "out.onnx", 4), abs=1e-4)  # not the synthesized figure
    assert "new inputs may land lower" in line
    assert f"graphopt validate {source} {tmp_path / 'out.onnx'} --data HELD_OUT" in line
    assert "--calib-data" not in line  # the user gave it already


def test_with_calib_data_a_model_the_check_cannot_run_points_to_held_out_validation(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise quick_check_module.GraphoptError("cannot run")

    monkeypatch.setattr(quick_check_module, "validate", broken)
    source = _mlp(tmp_path)

    out = _optimize(capsys, source, "prune(sparsity=0.5)", "--calib-data", str(_calibration(tmp_path, 2)))

    line = out.strip().splitlines()[-1]
    assert line.startswith("quick check not run (cannot run); for an unbiased figure run graphopt validate ")
    assert "--calib-data" not in line


def test_an_output_whose_shape_changed_is_reported_by_its_reason_not_as_a_cosine(tmp_path):
    def slicer(width: int) -> onnx.ModelProto:
        text = f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,10] x) => (float[2,{width}] y) {{
            starts = Constant <value = int64[1] {{0}}> ()
            ends = Constant <value = int64[1] {{{width}}}> ()
            axes = Constant <value = int64[1] {{1}}> ()
            y = Slice(x, starts, ends, axes)
        }}"""
        return onnx.parser.parse_model(text)

    source = tmp_path / "wide.onnx"
    onnx.save(slicer(10), source)

    line = quick_check_module.quick_check(source, load(slicer(5)), {"prune": "a hint"})

    assert line.startswith("warning: prune changed output y: shape") and "nan" not in line and line.endswith("closer: prune: a hint")


def test_an_input_over_the_weight_limit_is_not_checked_even_when_the_result_is_under_it(tmp_path, capsys, monkeypatch):
    # lowrank(ratio=0.2) shrinks the mlp's 37.5 KiB of weights to about 7 KiB; the check would still load the input.
    monkeypatch.setattr(quick_check_module, "MAX_WEIGHT_BYTES", 20 * 1024)

    out = _optimize(capsys, _mlp(tmp_path), "lowrank(ratio=0.2,check_speed=false)")

    assert out.strip().splitlines()[-1].startswith("quick check skipped: weights over 20.0 KiB"), out


def _scores_and_labels(weight: np.ndarray) -> onnx.ModelProto:
    """x [2, 10] -> MatMul -> scores [2, 5], and ArgMax(scores) -> label [2] (int64), as exported classifiers end."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["scores"]), h.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 10])],
        [h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [2, 5]), h.make_tensor_value_info("label", onnx.TensorProto.INT64, [2])],
        [onnx.numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_integer_outputs_are_judged_by_agreement_not_by_a_cosine_of_class_indices(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((10, 5))
    source = tmp_path / "classifier.onnx"
    onnx.save(_scores_and_labels(weight), source)
    changed = _scores_and_labels(weight + 0.8 * rng.standard_normal((10, 5)))
    feeds = list(synthesize_feeds(load(source), count=4, seed=0))
    labels = [(run_ort(onnx.load(source), f)[1], run_ort(changed, f)[1]) for f in feeds]
    agreement = float(np.mean(np.concatenate([a == b for a, b in labels])))
    assert 0 < agreement < 1  # the noise flips some labels, not all

    line = quick_check_module.quick_check(source, load(changed), {"lowrank": ""})

    assert f"{agreement:.1%} of label's values equal" in line and line.startswith("warning: lowrank moved the outputs")
    assert "(label)" not in line  # no cosine of class indices
    same = quick_check_module.quick_check(source, load(_scores_and_labels(weight)), {"lowrank": ""})
    assert same.startswith("quick check after lowrank: output cosine 1.00000 (scores), 100.0% of label's values equal")


def test_a_reference_that_is_not_a_number_is_said_so_not_blamed_on_the_pass(tmp_path):
    # NaN in the calibration samples: the input's outputs are NaN there, the int8 result's are not,
    # and the line used to warn that qdq moved the outputs, with "cosine nan".
    text = '<ir_version: 8, opset_import: ["" : 17]> g (float[2,4] x) => (float[2,4] y) { y = Relu(x) }'
    source = tmp_path / "relu.onnx"
    onnx.save(onnx.parser.parse_model(text), source)
    samples = tmp_path / "calib.npz"
    np.savez(samples, x=np.array([[np.nan, 1, 2, 3], [4, 5, 6, 7]], np.float32))
    zeroed = onnx.parser.parse_model(  # int8 Q/DQ first, as qdq writes: NaN saturates to a number
        """<ir_version: 8, opset_import: ["" : 17]> g (float[2,4] x) => (float[2,4] y) {
            s = Constant <value = float {0.1}> ()
            z = Constant <value = int8 {0}> ()
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            y = Relu(d)
        }"""
    )

    line = quick_check_module.quick_check(source, load(zeroed), {"qdq": "a hint"}, data=samples)

    assert line.startswith("quick check after qdq: the input model's own output y holds 1 NaN/Inf values on 1 of the calibration")
    assert "warning" not in line and "cosine nan" not in line


def test_the_hint_names_the_settings_already_in_use_instead_of_recommending_them():
    from graphopt.registry import resolved_options
    from passes.lowrank import LowRankPass
    from passes.prune import PrunePass

    lowrank = LowRankPass.fidelity_hint
    assert "target_cosine=" in lowrank and "data_aware=true" in lowrank  # what the rule reads

    def hint(pass_class, **given):
        return quick_check_module.hint_for_step(pass_class.fidelity_hint, resolved_options(pass_class, given))

    assert hint(LowRankPass, target_cosine=0.95, data_aware=True) == "already ran with target_cosine=0.95, data_aware=true"
    assert hint(PrunePass, reconstruct=True) == "already ran with reconstruct=true"
    # Part of the advice still open, or the recommended bool set the other way: the hint stays.
    assert hint(LowRankPass, data_aware=True) == lowrank
    assert hint(LowRankPass, target_cosine=0.95) == lowrank
    assert hint(PrunePass, reconstruct=False) == PrunePass.fidelity_hint
    assert quick_check_module.hint_for_step("a lower ratio", {"ratio": 0.5}) == "a lower ratio"


def test_advice_for_a_step_that_already_ran_as_advised_says_why_it_still_missed(tmp_path, capsys):
    source = _mlp(tmp_path)

    alone = _optimize(capsys, source, "lowrank(ratio=0.2,check_speed=false,target_cosine=0.6,data_aware=true)")
    both = _optimize(capsys, source, "prune(pattern=channel,ratio=0.5,reconstruct=true),qdq(check_speed=false,target_cosine=0.5)")

    alone, both = alone.strip().splitlines()[-1], both.strip().splitlines()[-1]
    assert alone.startswith("warning: lowrank moved the outputs far"), alone
    assert alone.endswith(
        "; closer: lowrank: already ran with target_cosine=0.6, data_aware=true; a stricter target or a milder setting keeps it closer"
    )
    assert both.startswith("warning: prune, qdq moved the outputs far"), both
    assert both.endswith(
        "; closer: prune: already ran with reconstruct=true; qdq: already ran with target_cosine=0.5; "
        "each pass's target is measured against its own input, so targets compound across passes"
    )
    assert "target_cosine=0.99" not in both and "reconstruct=true with --calib-data" not in both

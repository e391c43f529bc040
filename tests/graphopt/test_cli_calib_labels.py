"""A ``labels`` key in ``--calib-data``: the passes ignore it, and so do the quick check and, where nothing can score it, ``--validate``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_ort

from graphopt.cli import main


def _model(tmp_path: Path, output_shape: list) -> Path:
    """x [N, 4, 8] -> MatMul W [8, 8] -> Reshape -> y: a sequence output, or [N, 32] class scores."""
    weight = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    shape = np.array([0, 4, 8] if len(output_shape) == 3 else [0, 32], np.int64)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"]), onnx.helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, output_shape)],
        [onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(shape, "shape")],
    )
    path = tmp_path / "in.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _labelled_data(tmp_path: Path, files: int = 3) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(files):
        x = rng.standard_normal((2, 4, 8)).astype(np.float32)
        np.savez(folder / f"{index:02d}.npz", x=x, labels=np.array([1, 5], np.int64))
    return folder


def _cosine(source: Path, result: Path, folder: Path) -> float:
    feeds = [{"x": np.load(path)["x"]} for path in sorted(folder.iterdir())]
    want = np.concatenate([run_ort(onnx.load(source), f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([run_ort(onnx.load(result), f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(want @ got / np.sqrt((want @ want) * (got @ got)))


def test_the_quick_check_runs_on_labelled_calibration_data_and_ignores_the_labels(tmp_path, capsys):
    # It said "quick check not run (labels given, but no model output holds class scores ...)".
    source, calib = _model(tmp_path, ["N", 4, 8]), _labelled_data(tmp_path)
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(source), "-o", str(out), "--passes", "qdq(check_speed=false)", "--calib-data", str(calib)])

    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.search(r"^quick check after qdq: output cosine ([0-9.]+) \(y\) against the input on 3 of the calibration samples", line)
    assert found, line
    assert float(found.group(1)) == pytest.approx(_cosine(source, out, calib), abs=1e-5)


def test_validate_ignores_labels_with_a_warning_when_no_output_can_hold_class_scores(tmp_path, capsys):
    # Validation refused them after the output was written: exit 2 for labels the passes had ignored.
    source, calib = _model(tmp_path, ["N", 4, 8]), _labelled_data(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"

    code = main(["optimize", str(source), "-o", str(out), "--passes", "qdq(check_speed=false)", "--calib-data", str(calib),
                 "--validate", "cpu", "--min-cosine", "0.9", "--report", str(report)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    message = f"the labels in {calib} are ignored: no output of the model holds class scores ([N, C] or [N, C, 1, 1]) to score them"
    assert f"warning: {message}" in captured.out.splitlines()
    written = json.loads(report.read_text())
    assert written["data"] == {"source": str(calib), "samples": 3, "seed": 0}
    assert {"model": "reference", "kind": "labels_ignored", "items": [str(calib)], "message": message} in written["warnings"]
    assert written["task"] is None
    (output,) = written["outputs"]
    assert (output["provider"], output["output"], output["samples"]) == ("cpu", "y", 3)
    assert output["cosine"] == pytest.approx(_cosine(source, out, calib), abs=1e-5)


def test_validate_still_scores_labels_when_an_output_holds_class_scores(tmp_path, capsys):
    source, calib = _model(tmp_path, ["N", 32]), _labelled_data(tmp_path)
    report = tmp_path / "r.json"

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "qdq(check_speed=false)",
                 "--calib-data", str(calib), "--validate", "cpu", "--min-cosine", "0.9", "--report", str(report)])

    assert code == 0, capsys.readouterr().err
    written = json.loads(report.read_text())
    assert written["task"]["labelled rows"] == 6
    assert not any(warning["kind"] == "labels_ignored" for warning in written["warnings"])

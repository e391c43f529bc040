"""The graphopt command line: optimize, inspect, passes, exit codes."""

from __future__ import annotations

import io as std_io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, run_ort

from graphopt.cli import main
from graphopt.progress import StepProgress

X = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
  W = Constant <value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
  m = MatMul(x, W)
  y = Relu(m)
  dead = Neg(x)
}
"""


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(onnx.parser.parse_model(_TEXT), path)
    return path


def test_optimize_writes_result_prints_ledger_and_keeps_outputs(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "lift-constants,dce", "--ledger", str(tmp_path / "l.json")])

    assert code == 0
    printed = capsys.readouterr().out
    assert "lift-constants" in printed and "dce" in printed and f"wrote {out}" in printed
    assert model_path.read_bytes() == before
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Relu"]
    assert [row["name"] for row in json.loads((tmp_path / "l.json").read_text())] == ["lift-constants", "dce"]
    assert_same_outputs(run_ort(model_path, {"x": X}), run_ort(out, {"x": X}))


def test_optimize_quantizes_with_calibration_data_and_prints_the_summary(model_path, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        np.savez(calib / f"{index}.npz", x=rng.standard_normal((3, 4)).astype(np.float32))
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "fold,qdq(check_speed=false)", "--calib-data", str(calib),
                 "--ledger", str(tmp_path / "l.json")])

    assert code == 0
    printed = capsys.readouterr().out
    assert "qdq: 1 layer quantized" in printed
    ledger = json.loads((tmp_path / "l.json").read_text())
    assert ledger[-1]["options"]["data"] == str(calib)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    got, want = run_ort(out, {"x": X})[0], run_ort(model_path, {"x": X})[0]
    np.testing.assert_allclose(got, want, atol=0.05)  # int8: within a few quantization steps of |x| <= 3


def test_deterministic_turns_check_speed_off_in_every_pass_that_times(model_path, tmp_path, capsys, monkeypatch):
    from passes.qdq import mixed

    def no_timing(*args):
        raise AssertionError("--deterministic timed onnxruntime")

    monkeypatch.setattr(mixed, "_latency_ratio", no_timing)
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "fold,qdq,lowrank(ratio=0.5)", "--deterministic",
                 "--ledger", str(tmp_path / "l.json")])

    assert code == 0, capsys.readouterr().err
    options = {row["name"]: row["options"] for row in json.loads((tmp_path / "l.json").read_text())}
    assert options["qdq"]["check_speed"] is False and options["lowrank"]["check_speed"] is False
    assert "check_speed" not in options["fold"]


def test_deterministic_with_an_explicit_check_speed_exits_2(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "qdq(check_speed=true)", "--deterministic"])

    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "check_speed=true times onnxruntime, which --deterministic rules out" in err


def test_optimize_with_recipe_and_check_each_pass(model_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- lift-constants\n- pass: dce\n- toposort\n")

    code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--recipe", str(recipe), "--check-each-pass"])

    assert code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--passes", "dce,nope"], "unknown pass 'nope'; valid passes:"),
        (["--passes", "dce(level=3)"], "has no option 'level'"),
        (["--passes", "dce("], "unclosed"),
    ],
)
def test_bad_pipeline_is_a_one_line_usage_error(model_path, tmp_path, capsys, extra, message):
    code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), *extra])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def _aliases(path: Path) -> dict[str, Path]:
    """The input itself and other names for it: a roundabout spelling, a symbolic link, a hard link."""
    (path.parent / "sub").mkdir()
    (path.parent / "symlink.onnx").symlink_to(path.name)
    os.link(path, path.parent / "hardlink.onnx")
    return {
        "same": path,
        "spelling": path.parent / "sub" / ".." / path.name,
        "symlink": path.parent / "symlink.onnx",
        "hardlink": path.parent / "hardlink.onnx",
    }


@pytest.mark.parametrize("alias", ["same", "spelling", "symlink", "hardlink"])
def test_refuses_to_overwrite_the_input_without_in_place(model_path, capsys, alias):
    target = _aliases(model_path)[alias]
    before = sorted(p.name for p in model_path.parent.iterdir())
    data = model_path.read_bytes()

    code = main(["optimize", str(model_path), "-o", str(target), "--passes", "dce"])

    assert code == 2
    err = capsys.readouterr().err
    assert err == f"graphopt: error: output {target} is the input file; choose another output path or pass --in-place\n"
    assert model_path.read_bytes() == data and target.read_bytes() == data
    assert sorted(p.name for p in model_path.parent.iterdir()) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no output: give -o OUTPUT, or --in-place to replace the input"),
        (["--in-place", "-o", "OTHER"], "--in-place replaces the input; drop -o or give the input's path"),
        (["--in-place", "--validate", "cpu"], "--in-place cannot be combined with --validate"),
    ],
    ids=["no-output", "in-place-elsewhere", "in-place-validate"],
)
def test_in_place_usage_errors_exit_2_and_touch_nothing(model_path, tmp_path, capsys, extra, message):
    data = model_path.read_bytes()
    extra = [str(tmp_path / "other.onnx") if arg == "OTHER" else arg for arg in extra]

    code = main(["optimize", str(model_path), "--passes", "dce", *extra])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"graphopt: error: {message}") and err.count("\n") == 1
    assert model_path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("spelled", ["omitted", "same"])
def test_in_place_replaces_the_input_with_the_result(model_path, spelled):
    expected = run_ort(model_path, {"x": X})
    output = [] if spelled == "omitted" else ["-o", str(model_path.parent / "sub" / ".." / model_path.name)]
    (model_path.parent / "sub").mkdir()

    code = main(["optimize", str(model_path), "--in-place", *output, "--passes", "lift-constants,dce"])

    assert code == 0
    assert [n.op_type for n in onnx.load(model_path).graph.node] == ["MatMul", "Relu"]
    assert_same_outputs(expected, run_ort(model_path, {"x": X}))
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["in.onnx", "sub"]


def test_refuses_an_output_whose_data_file_the_input_reads_before_running_passes(tmp_path, capsys):
    weights = onnx.numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(4, 64), "W")  # 1 KiB
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [weights],
    )
    source = tmp_path / "in.onnx"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save_model(model, source, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    data = (tmp_path / "out.onnx.data").read_bytes()

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "dce"])

    assert code == 2
    assert capsys.readouterr().err.startswith(f"graphopt: error: refusing to overwrite {tmp_path / 'out.onnx.data'}")
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx.data"]


def test_missing_and_corrupt_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage\xff\xff")

    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert main(["optimize", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("graphopt: error: no such file")
    assert err[1].startswith("graphopt: error:") and len(err) == 2


def test_debug_flag_shows_the_traceback(tmp_path):
    from graphopt.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_inspect_reports_ops_parameters_and_dynamic_inputs(model_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    text = capsys.readouterr().out
    assert "x: float[N, 4]  (dynamic)" in text
    assert "parameters  16 (64 B)" in text
    assert "MatMul" in text and "weights     all finite" in text

    assert main(["inspect", "--json", str(model_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ops"] == {"Constant": 1, "MatMul": 1, "Relu": 1, "Neg": 1}
    assert summary["opsets"] == {"": 17}
    assert summary["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 4], "dynamic": True}]


def test_inspect_shows_unnamed_dims_as_a_question_mark_and_json_null(tmp_path, capsys):
    # They printed as Python's None: float[None, 1, None, None], and "None" strings in JSON.
    path = tmp_path / "unnamed.onnx"
    value = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 1, "h", None])
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1, "h", None])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["image"], ["y"])], "g", [value], [output])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)

    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "input       image: float[?, 1, h, ?]  (dynamic)" in lines and "output      y: float[?, 1, h, ?]  (dynamic)" in lines

    assert main(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inputs"] == [{"name": "image", "dtype": "float", "shape": [None, 1, "h", None], "dynamic": True}]


def test_inspect_flags_nan_and_inf_weights(tmp_path, capsys):
    weights = np.ones((4, 4), np.float32)
    weights[0, 0], weights[1, 1] = np.nan, np.inf
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(weights, "W")],
    )
    path = tmp_path / "nan.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)

    assert main(["inspect", str(path)]) == 0

    assert "NaN/Inf in weights: W (2)" in capsys.readouterr().out


def test_passes_lists_every_builtin_with_options(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in ("dce", "lift-constants", "toposort", "min_elements"):
        assert name in text
    # A summary wrapped over two docstring lines is printed whole, not cut after its first line.
    (noops,) = [line for line in text.splitlines() if line.startswith("eliminate-noops ")]
    assert "full Slice, " in noops and not noops.endswith(", [subgraphs too]")


def test_progress_bar_draws_only_when_enabled():
    stream = std_io.StringIO()
    StepProgress(stream, enabled=True)(1, 2, "dce")
    StepProgress(stream, enabled=True)(2, 2, "done")
    assert "1/2 dce" in stream.getvalue() and stream.getvalue().endswith("\n")

    quiet = std_io.StringIO()
    StepProgress(quiet)(1, 2, "dce")  # StringIO is not a TTY
    assert quiet.getvalue() == ""


def test_console_script_runs(model_path, tmp_path):
    script = Path(sys.executable).with_name("graphopt")
    completed = subprocess.run([str(script), "optimize", str(model_path), "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True, check=False)

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""  # no progress bar when stderr is not a terminal


_SPLIT_TO_SEQUENCE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[5] x) => (seq(float) parts) {
  parts = SplitToSequence <axis = 0> (x, sizes)
  sizes = Constant <value = int64[2] {2, 3}> ()
}
"""


@pytest.mark.parametrize("kind", ["strings", "sequence"])
def test_validate_passes_identical_models_when_outputs_are_strings_or_sequences(tmp_path, capsys, kind):
    # Found by tests/graphopt/test_cli_node_sweep.py: string outputs raised ValueError in the
    # metrics (cast to float64), sequence outputs (lists of unequal arrays) raised in validate.
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    if kind == "strings":
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("StringConcat", ["x", "x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.STRING, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.STRING, [2])],
        )
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), path)
        np.savez(data, x=np.array(["ab", "c"]))
    else:
        onnx.save(onnx.parser.parse_model(_SPLIT_TO_SEQUENCE), path)
        np.savez(data, x=np.arange(5, dtype=np.float32))

    code = main(["validate", str(path), str(path), "--data", str(data)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PASS" in captured.out.upper()


def test_validate_failing_on_synthesized_feeds_says_so_in_exactly_one_line(tmp_path, capfd):
    # Random integer divisors hit zero. onnxruntime logged the kernel error to stderr
    # (twice) before graphopt's own line, and the line did not say real data would help.
    path = tmp_path / "mod.onnx"
    text = '<ir_version: 8, opset_import: ["" : 17]> g (int32[8] a, int32[8] b) => (int32[8] y) { y = Mod(a, b) }'
    onnx.save(onnx.parser.parse_model(text), path)

    code = main(["validate", str(path), str(path)])

    err = capfd.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("graphopt: error: onnxruntime failed running mod.onnx")
    assert err.rstrip().endswith("(on synthesized feeds: pass --data with real inputs)")




def test_a_reader_that_leaves_early_ends_the_output_quietly(model_path):
    # `graphopt inspect --json | head` printed a BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "graphopt", "inspect", str(model_path), "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, check=False, cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        os.close(write_end)

    assert completed.returncode == 141 and completed.stderr == ""

"""Bad command-line values are one-line usage errors found before any work; pass options mean what they say."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, run_ort

import model_zoo
from graphopt import cli, io, registry
from graphopt.cli import main
from graphopt.data import parse_shape_overrides, synthesize_feeds
from graphopt.runtime import ModelRunner


@pytest.fixture()
def mlp(tmp_path: Path) -> Path:
    """Gemm, Relu, Gemm; input x [batch, 64]."""
    model_zoo.build("mlp").save(tmp_path)
    return tmp_path / "mlp.onnx"


def _usage_error(capsys, argv: list[str]) -> str:
    """Runs the command line, asserts exit 2 with exactly one ``graphopt: error:`` line and no traceback, returns it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("graphopt: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _no_pipeline(monkeypatch) -> None:
    """Makes running a pass a test failure: what is checked here must be checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(cli, "run_pipeline", refuse)


# Bool and numeric pass options


@pytest.mark.parametrize(
    ("spec", "same_as", "unlike"),
    [
        ("prune(reconstruct=no)", "prune(reconstruct=false)", "prune(reconstruct=true)"),
        ("prune(reconstruct=yes)", "prune(reconstruct=true)", "prune(reconstruct=false)"),
        ("qdq(symmetric=off,check_speed=false)", "qdq(symmetric=false,check_speed=false)", "qdq(symmetric=true,check_speed=false)"),
    ],
)
def test_bool_option_synonyms_write_the_bytes_of_the_value_they_mean(mlp, capsys, spec, same_as, unlike):
    def written(passes: str, name: str) -> bytes:
        out = mlp.parent / f"{name}.onnx"
        assert main(["optimize", str(mlp), "-o", str(out), "--passes", passes, "--no-quick-check"]) == 0, capsys.readouterr().err
        return out.read_bytes()

    assert written(spec, "given") == written(same_as, "same")
    assert written(spec, "given") != written(unlike, "unlike")  # the option does change this model


def test_ledger_records_the_typed_value(mlp, tmp_path, capsys):
    code = main(["optimize", str(mlp), "-o", str(tmp_path / "out.onnx"), "--passes", "prune(reconstruct=no)", "--no-quick-check",
                 "--ledger", str(tmp_path / "l.json")])

    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "l.json").read_text())[0]["options"]["reconstruct"] is False


def test_deterministic_accepts_check_speed_off(mlp, tmp_path, capsys):
    code = main(["optimize", str(mlp), "-o", str(tmp_path / "out.onnx"), "--passes", "qdq(check_speed=off)", "--deterministic",
                 "--ledger", str(tmp_path / "l.json")])

    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "l.json").read_text())[0]["options"]["check_speed"] is False


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prune(reconstruct=maybe)", "pass 'prune': option reconstruct got 'maybe'; it takes true or false (also yes/no, on/off, 1/0)"),
        ("qdq(symmetric=2)", "pass 'qdq': option symmetric got 2; it takes true or false"),
        ("prune(ratio=abc)", "pass 'prune': option ratio got 'abc'; it takes a number"),
        ("qdq(threads=1.5)", "pass 'qdq': option threads got 1.5; it takes an integer, or none"),
        ("fold,lowrank(target_cosine=high)", "pass 'lowrank': option target_cosine got 'high'; it takes a number, or none"),
    ],
)
def test_a_pass_option_of_the_wrong_type_fails_before_the_model_is_read(tmp_path, capsys, spec, message):
    missing = tmp_path / "missing.onnx"  # reading it would be another error

    err = _usage_error(capsys, ["optimize", str(missing), "-o", str(tmp_path / "out.onnx"), "--passes", spec])

    assert err.startswith(f"graphopt: error: {message}")


# Values argparse or the file system would otherwise turn into tracebacks


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--threads", "-2"], "argument --threads: must be at least 1, got -2"),
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["--samples", "0"], "argument --samples: must be at least 1, got 0"),
        (["--samples", "abc"], "argument --samples: expected an integer, got 'abc'"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "optimize"])
def test_out_of_range_numbers_are_one_line_usage_errors(mlp, tmp_path, capsys, monkeypatch, command, extra, message):
    _no_pipeline(monkeypatch)
    out = tmp_path / "out.onnx"
    argv = ["validate", str(mlp), str(mlp)] if command == "validate" else ["optimize", str(mlp), "-o", str(out), "--validate", "cpu"]

    err = _usage_error(capsys, [*argv, *extra])

    assert err == f"graphopt: error: {message} (see graphopt {command} --help)\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{tmp}", "cannot write {tmp}: it is a folder"),
        ("{tmp}/afile/r.json", "cannot write {tmp}/afile/r.json: {tmp}/afile is not a folder"),
        ("{tmp}/mlp.onnx", "{tmp}/mlp.onnx is one of the models"),
    ],
    ids=["folder", "parent-is-a-file", "the-model"],
)
@pytest.mark.parametrize("option", ["--report", "--report-md", "--report-html"])
def test_report_paths_that_cannot_be_written_fail_before_validation(mlp, tmp_path, capsys, monkeypatch, option, target, message):
    (tmp_path / "afile").write_text("x")
    data = mlp.read_bytes()
    monkeypatch.setattr(cli, "validate", lambda *args, **kwargs: pytest.fail("validation ran"))
    path = target.format(tmp=tmp_path)

    err = _usage_error(capsys, ["validate", str(mlp), str(mlp), option, path])

    assert err.startswith(f"graphopt: error: {option}") and message.format(tmp=tmp_path) in err
    assert mlp.read_bytes() == data and (tmp_path / "afile").read_text() == "x"


def test_optimize_checks_its_ledger_and_report_paths_before_the_pipeline(mlp, tmp_path, capsys, monkeypatch):
    _no_pipeline(monkeypatch)
    (tmp_path / "afile").write_text("x")

    err = _usage_error(capsys, ["optimize", str(mlp), "-o", str(tmp_path / "out.onnx"), "--ledger", str(tmp_path / "afile" / "l.json")])

    assert f"--ledger: cannot write {tmp_path / 'afile' / 'l.json'}: {tmp_path / 'afile'} is not a folder" in err
    assert not (tmp_path / "out.onnx").exists()


def test_a_report_that_cannot_be_written_is_a_usage_error_even_when_found_late(mlp, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "check_writable", lambda path: None)  # as if the folder appeared during validation
    (tmp_path / "afile").write_text("x")

    err = _usage_error(capsys, ["validate", str(mlp), str(mlp), "--report", str(tmp_path / "afile" / "r.json")])

    assert f"cannot write {tmp_path / 'afile' / 'r.json'}" in err


# Argparse usage errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", "IN", "--bogus"], "unrecognized arguments: --bogus (see graphopt --help)"),
        (["optimize", "IN", "--external-data", "maybe"], "argument --external-data: invalid choice: 'maybe'"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
        ([], "the following arguments are required: COMMAND (see graphopt --help)"),
        (["validate", "IN"], "the following arguments are required: candidate (see graphopt validate --help)"),
    ],
)
def test_argparse_usage_errors_are_one_line(capsys, argv, message):
    err = _usage_error(capsys, argv)

    assert message in err and "usage:" not in err


def test_help_still_prints_the_usage(capsys):
    assert main(["optimize", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: graphopt optimize") and "--external-data" in out


# Validation options without --validate


@pytest.mark.parametrize(
    "extra",
    [
        ["--report", "r.json"], ["--report-md", "r.md"], ["--report-html", "r.html"], ["--per-layer"], ["--latency"],
        ["--min-cosine", "0.99"], ["--min-snr", "30"], ["--atol", "1e-3"], ["--rtol", "1e-2"], ["--samples", "4"], ["--seed", "1"],
        ["--exact"], ["--tf32"], ["--require-providers"], ["--bisect"],
    ],
    ids=lambda extra: extra[0],
)
def test_validation_options_without_validate_are_refused_not_ignored(mlp, tmp_path, capsys, monkeypatch, extra):
    _no_pipeline(monkeypatch)
    out = tmp_path / "out.onnx"

    err = _usage_error(capsys, ["optimize", str(mlp), "-o", str(out), "--passes", "prune", *extra])

    assert err.startswith(f"graphopt: error: {extra[0]} needs --validate")
    assert not out.exists() and not (tmp_path / extra[-1]).exists()


def test_every_validation_option_given_without_validate_is_named(mlp, tmp_path, capsys):
    err = _usage_error(capsys, ["optimize", str(mlp), "-o", str(tmp_path / "o.onnx"), "--report", "r.json", "--per-layer", "--min-cosine", "0.9"])

    assert err.startswith("graphopt: error: --report, --per-layer, --min-cosine need --validate")


@pytest.mark.parametrize(("extra", "expected"), [([], "quick check not run (onnxruntime failed"), (["--shape", "x:3x64"], "against the input on 4 synthesized samples")])
def test_shape_and_threads_stay_valid_without_validate_for_the_quick_check(tmp_path, capsys, extra, expected):
    source = _fixed_batch_model(tmp_path)  # the quick check runs it only with --shape

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "prune(skip=)", "--threads", "1", *extra])

    assert code == 0, capsys.readouterr().err
    assert expected in capsys.readouterr().out.strip().splitlines()[-1]


# --external-data no


def _external(mlp: Path) -> Path:
    source = mlp.parent / "ext.onnx"
    onnx.save_model(onnx.load(mlp), source, save_as_external_data=True, location="ext.weights", size_threshold=0)
    return source


def test_external_data_no_embeds_the_inputs_external_weights_in_one_file(mlp, tmp_path, capsys):
    source = _external(mlp)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    out = tmp_path / "out" / "inline.onnx"

    code = main(["optimize", str(source), "-o", str(out), "--external-data", "no", "--passes", "fold"])

    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in out.parent.iterdir()) == ["inline.onnx"]
    saved = onnx.load(out, load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in saved.graph.initializer) and saved.graph.initializer
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert_same_outputs(run_ort(mlp, {"x": x}), run_ort(saved, {"x": x}))  # from bytes: nothing left to read elsewhere
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_external_data_no_is_refused_before_the_pipeline_when_the_weights_cannot_fit(mlp, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "PROTO_WEIGHT_LIMIT_BYTES", 1024)
    _no_pipeline(monkeypatch)
    out = tmp_path / "out.onnx"

    err = _usage_error(capsys, ["optimize", str(_external(mlp)), "-o", str(out), "--external-data", "no", "--passes", "fold"])

    assert err.startswith("graphopt: error: --external-data no: the weights (") and "use --external-data auto or yes" in err
    assert not out.exists()


def test_external_data_no_after_a_lossy_pipeline_is_judged_on_the_result(mlp, tmp_path, capsys, monkeypatch):
    # qdq could shrink the weights below the limit, so the input's size alone does not refuse the run.
    limit = io.stats.param_bytes(io.load(mlp)) // 2
    monkeypatch.setattr(io, "PROTO_WEIGHT_LIMIT_BYTES", limit)
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(_external(mlp)), "-o", str(out), "--external-data", "no", "--passes", "qdq(check_speed=false)",
                 "--no-quick-check"])

    assert code == 0, capsys.readouterr().err
    assert io.stats.param_bytes(io.load(out)) <= limit and sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".weights") == [
        "ext.onnx", "mlp.onnx", "out.onnx"]


def test_an_output_data_file_that_is_a_folder_is_named(mlp, tmp_path, capsys, monkeypatch):
    _no_pipeline(monkeypatch)
    (tmp_path / "out.onnx.data").mkdir()

    err = _usage_error(capsys, ["optimize", str(_external(mlp)), "-o", str(tmp_path / "out.onnx"), "--passes", "dce"])

    assert err == f"graphopt: error: cannot write {tmp_path / 'out.onnx.data'}: it is a folder\n"


# --shape and the inputs passes synthesize


def _fixed_batch_model(tmp_path: Path) -> Path:
    """x [N, 64] -> MatMul -> Reshape to [3, 8, 8]: runs only when N is 3 (graphopt synthesizes N = 1)."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"]), onnx.helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(np.array([3, 8, 8], np.int64), "shape")],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("nosuch:1x64", "shape given for unknown input 'nosuch'; the model's inputs are: x"),
        ("x:3", r"shape (3,) given for input 'x' does not fit the model's (N, 64) (rank and static dims must match)"),
        ("x:3x65", r"shape (3, 65) given for input 'x' does not fit the model's (N, 64) (rank and static dims must match)"),
        ("x3x64", "bad shape 'x3x64': expected name:DIMxDIM..., e.g. x:1x3x224x224"),
    ],
)
@pytest.mark.parametrize("passes", ["fold", "prune(pattern=channel,ratio=0.3)", "qdq(check_speed=false)"])
@pytest.mark.parametrize("with_data", [False, True])
def test_a_shape_that_does_not_fit_the_model_is_refused_before_any_pass_runs(tmp_path, capsys, monkeypatch, shape, message, passes, with_data):
    # Passes that synthesize nothing ignored --shape (exit 0); qdq blamed its own synthesized inputs.
    _no_pipeline(monkeypatch)
    source, out = _fixed_batch_model(tmp_path), tmp_path / "out.onnx"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((3, 64), np.float32))
    data = ["--calib-data", str(calib)] if with_data else []

    err = _usage_error(capsys, ["optimize", str(source), "-o", str(out), "--passes", passes, "--shape", shape, *data])

    assert err == f"graphopt: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("spec", ["qdq(check_speed=false)", "prune(reconstruct=true,skip=)", "lowrank(data_aware=true,check_speed=false)"])
def test_a_pass_that_cannot_run_its_synthesized_inputs_says_so_and_runs_at_the_given_shape(tmp_path, capsys, spec):
    source = _fixed_batch_model(tmp_path)
    out = tmp_path / "out.onnx"

    err = _usage_error(capsys, ["optimize", str(source), "-o", str(out), "--passes", spec])

    name = spec.split("(")[0]
    assert err.startswith(f"graphopt: error: pass '{name}' could not run the model on the inputs it synthesized for itself")
    assert "(at default dims; --shape NAME:DIMS sets them)" in err and "--calib-data PATH" in err and "onnxruntime failed running" in err
    assert not out.exists()
    # --shape reaches the pass's own synthesized inputs.
    assert main(["optimize", str(source), "-o", str(out), "--passes", spec, "--shape", "x:3x64"]) == 0 and out.exists()


def test_with_calib_data_the_same_pass_runs(tmp_path, capsys):
    source = _fixed_batch_model(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "qdq(check_speed=false)",
                 "--calib-data", str(calib), "--shape", "x:3x64"])

    assert code == 0, capsys.readouterr().err
    assert "QuantizeLinear" in [node.op_type for node in onnx.load(tmp_path / "out.onnx").graph.node]


class _SynthesizingPass(ir.passes.InPlacePass):
    """A plug-in that runs the model once on inputs it synthesizes, at the dims of its ``shapes`` option."""

    got: list = []

    def __init__(self, *, data: Any = None, shapes: list[str] | None = None) -> None:
        super().__init__()
        self.data, self.shapes = data, shapes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _SynthesizingPass.got.append(self.shapes)
        feeds = next(synthesize_feeds(model, count=1, shapes=parse_shape_overrides(self.shapes or [])))
        with ModelRunner(model) as runner:
            runner.run(feeds)
        return ir.passes.PassResult(model, False)


@pytest.fixture()
def synthesizing_plugin(monkeypatch):
    class _EntryPoint:
        name, value = "synth", "plugin:SynthesizingPass"

        def load(self):
            return _SynthesizingPass

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [_EntryPoint()] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    monkeypatch.setattr(_SynthesizingPass, "got", [])
    return _SynthesizingPass


def test_shape_reaches_a_pass_that_takes_a_shapes_option(tmp_path, capsys, synthesizing_plugin):
    source = _fixed_batch_model(tmp_path)

    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "dce,synth", "--shape", "x:3x64"])

    assert code == 0, capsys.readouterr().err
    assert synthesizing_plugin.got == [["x:3x64"]]


@pytest.mark.parametrize(
    ("spec", "where"),
    [("synth", "at default dims; --shape NAME:DIMS sets them"), ("synth(shapes=[x:2x64])", "at the given --shape dims")],
)
def test_a_pass_with_a_shapes_option_that_fails_on_its_inputs_says_which_dims_it_used(tmp_path, capsys, synthesizing_plugin, spec, where):
    err = _usage_error(capsys, ["optimize", str(_fixed_batch_model(tmp_path)), "-o", str(tmp_path / "out.onnx"), "--passes", spec])

    assert err.startswith(f"graphopt: error: pass 'synth' could not run the model on the inputs it synthesized for itself ({where}): ")
    assert "--calib-data PATH" in err


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("validate", ["--samples", "3"]),
        ("validate", ["--seed", "2"]),
        ("optimize", ["--samples", "3", "--seed", "2"]),
    ],
    ids=["validate-samples", "validate-seed", "optimize-both"],
)
def test_samples_and_seed_with_real_data_are_refused_rather_than_ignored(mlp, tmp_path, capsys, monkeypatch, command, flags):
    # Before: `validate A B --data D --samples 3` used every sample in D, silently.
    data = tmp_path / "data"
    data.mkdir()
    for index in range(5):
        np.savez(data / f"{index}.npz", x=np.ones((2, 64), np.float32))
    _no_pipeline(monkeypatch)
    if command == "validate":
        argv = ["validate", str(mlp), str(mlp), "--data", str(data), *flags]
    else:
        argv = ["optimize", str(mlp), "-o", str(tmp_path / "out.onnx"), "--calib-data", str(data), "--validate", "cpu", *flags]

    err = _usage_error(capsys, argv)

    assert "synthesized samples; with --" in err and f"every sample in {data} is used" in err
    assert not (tmp_path / "out.onnx").exists()

"""Never lose data: atomic output with external data, --in-place, failures and Ctrl-C.

Every test checks the same three things after a failure: no partial output
appears, a previous output (model and ``.data``) is byte-identical, and no
temporary file or folder is left in the output folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import check_full, run_ort

import graphopt
import passes
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.runtime import ModelRunner

REPO = Path(__file__).resolve().parents[2]
X = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
ROWS = 64  # 64x8 float32 weights: 2 KiB each, above the 1 KiB external data threshold


def _external_model(path: Path, *, scale: float = 1.0) -> Path:
    """x -> Gemm(W) -> y, plus an unused initializer stored before W in ``<name>.data``.

    Dropping the unused one (dce) moves W to another offset in the new data
    file, so reading new data at old offsets, or old data at new ones, shows.
    """
    rng = np.random.default_rng(0)
    unused = onnx.numpy_helper.from_array(rng.standard_normal((ROWS, 8)).astype(np.float32), "Unused")
    weight = onnx.numpy_helper.from_array(scale * rng.standard_normal((ROWS, 8)).astype(np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", ROWS])],
        [unused, weight],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save_model(proto, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return path


def _source(folder: Path) -> Path:
    """The input, in a folder of its own so that the output folder holds only outputs."""
    (folder / "src").mkdir()
    return _external_model(folder / "src" / "in.onnx")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def _strays(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if "tmp" in path.name or path.name.startswith("."))


def _previous_output(folder: Path) -> Path:
    """A complete earlier result at ``folder/out.onnx`` with ``out.onnx.data``."""
    out = graphopt.save(graphopt.load(_external_model(folder / "old.onnx", scale=2.0)), folder / "out.onnx")
    (folder / "old.onnx").unlink()
    (folder / "old.onnx.data").unlink()
    assert (folder / "out.onnx.data").exists()
    return out


# --- (b) interrupted save --------------------------------------------------------------------


def test_ctrl_c_while_writing_keeps_previous_output_and_data_byte_identical(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = _previous_output(tmp_path)
    before, expected = _snapshot(tmp_path), run_ort(out, {"x": X})[0]
    real_save = ir.save

    def save_then_interrupt(model, path, **kwargs):
        real_save(model, path, **kwargs)  # both staged files are complete ...
        Path(path).write_bytes(b"half a model")  # ... then one is cut short
        Path(path).with_name(kwargs["external_data"]).write_bytes(b"half the data")
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        graphopt.save(graphopt.load(source), out)

    assert _snapshot(tmp_path) == before
    assert _strays(tmp_path) == []
    np.testing.assert_array_equal(run_ort(out, {"x": X})[0], expected)


@pytest.mark.parametrize(
    ("failure", "raised"),
    [(KeyboardInterrupt(), KeyboardInterrupt), (OSError(5, "Input/output error"), GraphoptError)],
    ids=["ctrl-c", "oserror"],
)
def test_failure_between_data_and_model_rename_puts_previous_data_back(tmp_path, monkeypatch, failure, raised):
    source = _source(tmp_path)
    out = _previous_output(tmp_path)
    before, expected = _snapshot(tmp_path), run_ort(out, {"x": X})[0]
    real_replace = os.replace
    renamed = []

    def replace(src, dst, **kwargs):
        if Path(dst) == out:  # the data file is already in place: the worst moment
            raise failure
        renamed.append(Path(dst).name)
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(raised):
        graphopt.save(graphopt.load(source), out)

    assert "out.onnx.data" in renamed
    assert _snapshot(tmp_path) == before
    assert _strays(tmp_path) == []
    np.testing.assert_array_equal(run_ort(out, {"x": X})[0], expected)


def test_failure_before_a_first_output_leaves_no_file(tmp_path, monkeypatch):
    source = _external_model(tmp_path / "in.onnx")
    before = _snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst).name == "out.onnx":
            raise KeyboardInterrupt
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        graphopt.save(graphopt.load(source), tmp_path / "out.onnx")

    assert _snapshot(tmp_path) == before  # not even the data file that was renamed first
    assert _strays(tmp_path) == []


# --- (a) a pass that fails mid-pipeline ------------------------------------------------------


class _ExplodingPass(ir.passes.InPlacePass):
    """Changes the model, then fails: what reaches disk must not be this half-done model."""

    error: BaseException = RuntimeError("bug in a pass")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.initializers["W"].const_value = ir.tensor(np.zeros((ROWS, 8), np.float32))
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    # A bug in a pass is exit 2 too (exit 1 means a failed check), with one line asking for a report.
    [(GraphoptError("bad input"), 2), (KeyboardInterrupt(), 130), (RuntimeError("bug in a pass"), 2)],
    ids=["graphopt-error", "ctrl-c", "bug"],
)
@pytest.mark.parametrize("previous", [False, True], ids=["new-output", "previous-output"])
def test_pass_failing_mid_pipeline_writes_nothing(tmp_path, monkeypatch, capsys, error, code, previous):
    source = _source(tmp_path)
    if previous:
        _previous_output(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(_ExplodingPass, "error", error)
    monkeypatch.setitem(passes.BUILTIN_PASSES, "explode", _ExplodingPass)
    argv = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "dce,explode,toposort"]

    assert main(argv) == code
    assert capsys.readouterr().err.count("\n") == 1

    assert _snapshot(tmp_path) == before
    assert _strays(tmp_path) == []


# --- (c) a real SIGINT or SIGTERM ------------------------------------------------------------------------

_SLOW_PASS = '''
"""Test-only pass: says it started, then waits to be interrupted."""
import os
import time
from pathlib import Path

import onnx_ir as ir


class SlowPass(ir.passes.InPlacePass):
    def call(self, model):
        Path(os.environ["SLOW_PASS_STARTED"]).write_text("started")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return ir.passes.PassResult(model, False)
'''


def _default_signals() -> None:
    """Undoes an inherited SIG_IGN in the child, as a terminal would have it.

    A shell that starts the test run in the background without job control
    (``nohup sh -c "make test" &``) ignores SIGINT in it, and Python keeps an
    inherited ignore rather than raising KeyboardInterrupt: the CLI would
    then rightly never see the Ctrl-C this test sends.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _slow_pass_plugin(folder: Path) -> Path:
    """A module plus a dist-info folder: importlib.metadata finds the entry point on PYTHONPATH."""
    folder.mkdir()
    (folder / "slow_pass_plugin.py").write_text(textwrap.dedent(_SLOW_PASS))
    dist = folder / "slow_pass_plugin-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slow-pass-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nslow = slow_pass_plugin:SlowPass\n")
    return folder


@pytest.mark.parametrize(
    ("sent", "code", "said"),
    [(signal.SIGINT, 130, "graphopt: interrupted\n"), (signal.SIGTERM, 143, "graphopt: terminated\n")],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize("mode", ["new-output", "previous-output", "in-place"])
def test_signal_during_pipeline_exits_and_leaves_no_trace(tmp_path, mode, sent, code, said):
    work = tmp_path / "work"
    work.mkdir()
    source = _external_model(work / "in.onnx")
    if mode == "previous-output":
        _previous_output(work)
    before = _snapshot(work)
    started = tmp_path / "started"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_slow_pass_plugin(tmp_path / "plugin")), str(REPO)]),
        "SLOW_PASS_STARTED": str(started),
    }
    target = ["--in-place"] if mode == "in-place" else ["-o", str(work / "out.onnx")]
    command = [sys.executable, "-m", "graphopt", "optimize", str(source), *target, "--passes", "dce,slow"]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), process.communicate(timeout=10)
        process.send_signal(sent)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == code
    assert err == said
    assert _snapshot(work) == before
    assert _strays(work) == []


# --- in place -------------------------------------------------------------------------------


def test_in_place_replaces_model_and_data_and_computes_the_same(tmp_path, capsys):
    source = _external_model(tmp_path / "in.onnx")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(source, copy / "in.onnx")
    shutil.copy(tmp_path / "in.onnx.data", copy / "in.onnx.data")
    old_data_size = (tmp_path / "in.onnx.data").stat().st_size

    assert main(["optimize", str(source), "--in-place", "--passes", "dce"]) == 0

    assert f"wrote {source}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "in.onnx", "in.onnx.data"]
    saved = onnx.load(source, load_external_data=False)
    assert [init.name for init in saved.graph.initializer] == ["W"]
    assert {e.key: e.value for e in saved.graph.initializer[0].external_data}["location"] == "in.onnx.data"
    assert (tmp_path / "in.onnx.data").stat().st_size == old_data_size // 2
    check_full(source)
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(copy / "in.onnx", {"x": X})[0])


def test_in_place_through_a_symlink_replaces_the_real_file_and_keeps_the_link(tmp_path):
    source = _external_model(tmp_path / "in.onnx")
    expected = run_ort(source, {"x": X})[0]
    link = tmp_path / "link.onnx"
    link.symlink_to(source.name)

    assert main(["optimize", str(link), "-o", str(link), "--in-place", "--passes", "dce"]) == 0

    assert link.is_symlink() and link.resolve() == source
    assert len(onnx.load(source, load_external_data=False).graph.initializer) == 1
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], expected)
    assert _strays(tmp_path) == []


def test_in_place_save_leaves_the_loaded_model_reading_its_old_bytes(tmp_path):
    source = _external_model(tmp_path / "in.onnx")
    expected = run_ort(source, {"x": X})[0]
    model = graphopt.load(source)
    graphopt.run_pipeline(model, "dce")

    graphopt.save(model, source, in_place=True)

    # W moved from offset 2048 to 0 in the new data file; the model still maps the old one.
    assert {e.key: e.value for e in onnx.load(source, load_external_data=False).graph.initializer[0].external_data}["offset"] == "0"
    with ModelRunner(model, threads=1) as runner:
        np.testing.assert_allclose(runner.run({"x": X})["y"], expected, rtol=1e-6, atol=1e-6)
    again = graphopt.save(model, tmp_path / "again.onnx")
    np.testing.assert_array_equal(run_ort(again, {"x": X})[0], expected)
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], expected)


def test_external_data_file_is_named_after_the_output(tmp_path):
    source = _external_model(tmp_path / "in.onnx")

    assert main(["optimize", str(source), "-o", str(tmp_path / "sub" / "result.onnx"), "--passes", "dce", "--external-data", "yes"]) == 0

    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["result.onnx", "result.onnx.data"]
    saved = onnx.load(tmp_path / "sub" / "result.onnx", load_external_data=False)
    assert {e.key: e.value for e in saved.graph.initializer[0].external_data}["location"] == "result.onnx.data"
    np.testing.assert_array_equal(run_ort(tmp_path / "sub" / "result.onnx", {"x": X})[0], run_ort(source, {"x": X})[0])

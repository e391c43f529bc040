"""optimize when a pass crashes or breaks the model: one line, exit 2, nothing written; plug-in warnings once."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

import passes
from graphopt import registry
from graphopt.cli import main
from graphopt.pipeline import PassFailedError

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) {
  W = Constant <value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
  m = MatMul(x, W)
  y = Relu(m)
}
"""


class _BoomPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise RuntimeError("boom from plugin")


class _LookupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, model.graph.initializers["nosuch"] is None)


class _BreakerPass(ir.passes.InPlacePass):
    """Removes the first node (the Constant), leaving the MatMul reading a value nothing defines."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.remove(next(iter(model.graph)), safe=False)
        return ir.passes.PassResult(model, True)


class _EntryPoint:
    def __init__(self, name: str, loaded: object) -> None:
        self.name, self.value, self.loaded = name, f"plug:{name}", loaded

    def load(self) -> object:
        if self.loaded is None:
            raise ImportError("No module named 'plug'")
        return self.loaded


@pytest.fixture()
def model_path(tmp_path: Path, monkeypatch) -> Path:
    """A model, with the plug-ins above installed as entry points and no plug-in warning given yet."""
    entries = [
        _EntryPoint("boom", _BoomPass),
        _EntryPoint("lookup", _LookupPass),
        _EntryPoint("breaker", _BreakerPass),
        _EntryPoint("broken", None),
    ]
    real = metadata.entry_points
    monkeypatch.setattr(
        metadata, "entry_points", lambda **kw: entries if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw)
    )
    monkeypatch.setattr(registry, "_warned", set())
    path = tmp_path / "in.onnx"
    onnx.save(onnx.parser.parse_model(_TEXT), path)
    return path


@pytest.mark.parametrize(
    ("step", "error"),
    [("boom", "RuntimeError: boom from plugin"), ("lookup", "KeyError: 'nosuch'")],
    ids=["runtime-error", "key-error"],
)
def test_a_plugin_pass_that_raises_exits_2_with_one_line_naming_it(model_path, tmp_path, capsys, step, error):
    out = tmp_path / "out.onnx"

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", f"dce,{step}"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"graphopt: error: pass {step!r} (step 2 of 2) failed: {error} "
        f"(the pass comes from plug-in module {__name__}; --debug prints the traceback)\n"
    )
    assert not out.exists()


def test_debug_shows_the_plugin_pass_failure_with_its_original_exception(model_path, tmp_path):
    with pytest.raises(PassFailedError) as caught:
        main(["--debug", "optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes", "boom"])

    assert isinstance(caught.value.__cause__, RuntimeError) and str(caught.value.__cause__) == "boom from plugin"


def test_a_crash_in_a_builtin_pass_exits_2_and_asks_for_a_report(model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(passes.BUILTIN_PASSES, "explode", _BoomPass)

    code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes", "explode"])

    assert code == 2
    assert capsys.readouterr().err == (
        "graphopt: error: pass 'explode' (step 1 of 1) failed: RuntimeError: boom from plugin "
        "(a bug in graphopt: please report it with the traceback that --debug prints)\n"
    )


@pytest.mark.parametrize("previous", [False, True], ids=["new-output", "previous-output"])
def test_a_pass_that_leaves_an_invalid_model_writes_nothing_and_is_named(model_path, tmp_path, capsys, previous):
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(model_path.read_bytes())
    files_before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "toposort,breaker,toposort"])

    assert code == 2
    assert capsys.readouterr().err == (
        "graphopt: error: the model is invalid after pass 'breaker', the last that changed it, so nothing was written: "
        "node 'MatMul' reads 'W', whose producer 'Constant' was removed "
        "(--check-each-pass names the pass that broke it)\n"
    )
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files_before


def test_plugin_warnings_are_given_once_per_run(model_path, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="graphopt.registry"):
        code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes", "fold,dce"])

    assert code == 0
    assert [record.getMessage() for record in caplog.records] == [
        "cannot load pass 'broken' from plug:broken: No module named 'plug'"
    ]

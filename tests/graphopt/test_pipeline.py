"""run_pipeline: registry lookup, ledger, check-each-pass, plug-ins, error surfacing."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, parse, run_ort, to_proto

from graphopt import PassSpec, progress, registry, run_pipeline
from graphopt.errors import GraphoptError, PassCheckError, PipelineSpecError

X = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)


def _model() -> ir.Model:
    #   x -> MatMul(W: Constant 4x4) -> Relu -> y ;  Neg(x) dead
    return parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y) {
          W = Constant <value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
          m = MatMul(x, W)
          y = Relu(m)
          dead = Neg(x)
        }
        """
    )


class _BreakOutputPass(ir.passes.InPlacePass):
    """Points the graph output at a value with the wrong shape: ORT must reject it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        node = ir.node("Concat", [model.graph.outputs[0], model.graph.outputs[0]], {"axis": 5})
        model.graph.append(node)
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        model.graph.outputs[0] = node.outputs[0]
        return ir.passes.PassResult(model, True)


class _NeedsOpset99Pass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 99:
            raise ir.passes.PreconditionError("needs opset 99")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_ledger_has_one_row_per_pass_with_counts_and_options():
    model = _model()
    original = to_proto(model)

    result = run_pipeline(model, "lift-constants(min_elements=2),dce,toposort")

    rows = result.ledger.rows
    assert [row.name for row in rows] == ["lift-constants", "dce", "toposort"]
    assert [row.modified for row in rows] == [True, True, False]
    assert [(row.nodes_before, row.nodes_after) for row in rows] == [(4, 3), (3, 2), (2, 2)]
    # Constant tensors count as parameters, so lifting them moves no bytes.
    assert all(row.param_bytes_before == row.param_bytes_after == 64 for row in rows)
    assert rows[0].options == {"min_elements": 2}
    assert all(row.seconds >= 0 for row in rows)
    assert result.modified is True
    assert "lift-constants" in result.ledger.to_table()
    assert result.ledger.to_dicts()[1]["name"] == "dce"
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(result.model, {"x": X}))


def test_accepts_pass_specs_and_pass_instances():
    from passes.dce import EliminateDeadCodePass

    result = run_pipeline(_model(), [PassSpec("lift-constants"), EliminateDeadCodePass()])

    assert [row.name for row in result.ledger.rows] == ["lift-constants", "EliminateDeadCodePass"]


def test_check_each_pass_names_the_pass_that_broke_the_model():
    with pytest.raises(PassCheckError, match=r"'_BreakOutputPass' \(step 2 of 3\) produced an invalid model"):
        run_pipeline(_model(), [PassSpec("dce"), _BreakOutputPass(), PassSpec("toposort")], check_each_pass=True)


def test_without_check_each_pass_the_broken_model_is_returned():
    result = run_pipeline(_model(), [_BreakOutputPass()])

    assert result.model.graph.outputs[0].producer().op_type == "Concat"


def test_precondition_errors_surface_unwrapped():
    with pytest.raises(ir.passes.PreconditionError, match="needs opset 99"):
        run_pipeline(_model(), [_NeedsOpset99Pass()])


class _FailsOnTheUsersModelPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            raise RuntimeError("onnxruntime said no")
        except RuntimeError as exc:
            raise GraphoptError("the model cannot run") from exc


def test_a_pass_error_surfaces_unwrapped_with_its_own_cause_for_debug_tracebacks():
    with pytest.raises(GraphoptError, match="the model cannot run") as caught:
        run_pipeline(_model(), [_FailsOnTheUsersModelPass()])

    assert isinstance(caught.value.__cause__, RuntimeError) and str(caught.value.__cause__) == "onnxruntime said no"
    assert caught.value.__suppress_context__  # the pass manager's PassError wrapper is not shown


def test_unknown_pass_and_option_list_valid_choices():
    with pytest.raises(PipelineSpecError, match="unknown pass 'nope'; valid passes: collapse-reshapes, cse, dce, .*, toposort, upgrade-ir$"):
        run_pipeline(_model(), "dce,nope")
    with pytest.raises(PipelineSpecError, match="valid options: min_elements"):
        run_pipeline(_model(), "lift-constants(size=3)")


def test_progress_callback_sees_every_step_then_done():
    seen = []

    run_pipeline(_model(), "dce,toposort", progress=lambda i, n, label: seen.append((i, n, label)))

    assert seen == [(0, 2, "dce"), (1, 2, "toposort"), (2, 2, "done")]



class _Counting(ir.passes.InPlacePass):
    """Reports ``units`` units of work done, one at a time, as a long pass would."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.units = units

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for done in range(self.units + 1):
            progress.report(done, self.units, "units")
        return ir.passes.PassResult(model, False)


def test_a_pass_reports_its_own_progress_as_the_step_label(monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL_SECONDS", 0.0)
    seen = []

    run_pipeline(_model(), [_Counting(0), _Counting(3)], progress=lambda i, n, label: seen.append((i, n, label)))

    inside = [entry for entry in seen if entry[0] == 1]
    assert inside[1:] == [(1, 2, f"_Counting: units {done}/3") for done in range(4)], seen
    assert seen[-1] == (2, 2, "done")


def test_progress_reports_are_throttled_but_the_last_one_is_drawn(monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL_SECONDS", 3600.0)
    seen = []

    run_pipeline(_model(), [_Counting(50)], progress=lambda i, n, label: seen.append(label))

    assert [label for label in seen if "units" in label] == ["_Counting: units 0/50", "_Counting: units 50/50"]


def test_reports_outside_a_pipeline_go_nowhere():
    progress.report(1, 2, "units")  # no pipeline, no callback: nothing to call, nothing raised

def test_fixed_point_group_from_onnx_ir_pass_manager_runs_as_one_step():
    # A registry entry may be a factory returning onnx_ir's PassManager; this is how fold groups work.
    from passes.dce import EliminateDeadCodePass
    from passes.lift_constants import LiftConstantsPass

    def cleanup() -> ir.passes.PassBase:
        return ir.passes.PassManager([LiftConstantsPass(), EliminateDeadCodePass()], steps=5, early_stop=True)

    result = run_pipeline(_model(), "cleanup", passes={"cleanup": cleanup})

    assert [row.name for row in result.ledger.rows] == ["cleanup"]
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu"]


def test_entry_point_passes_are_registered(monkeypatch):
    class _EntryPoint:
        name = "plugin-noop"
        value = "plugin:NoopPass"

        def load(self):
            return _NeedsOpset99Pass

    real = metadata.entry_points

    def fake_entry_points(**kwargs):
        if kwargs.get("group") == registry.ENTRY_POINT_GROUP:
            return [_EntryPoint()]
        return real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)

    assert registry.available_passes()["plugin-noop"] is _NeedsOpset99Pass
    assert "dce" in registry.available_passes()


def test_functional_pass_result_is_adopted_into_the_callers_model():
    class _CloneAndRename(ir.passes.FunctionalPass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            copy = model.clone()
            copy.graph.name = "renamed"
            return ir.passes.PassResult(copy, True)

    model = _model()
    result = run_pipeline(model, [_CloneAndRename()])

    assert result.model is model
    assert model.graph.name == "renamed"

"""run_pipeline: registry lookup, ledger, check-each-pass, plug-ins, error surfacing."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, parse, run_ort, to_proto

from graphopt import PassSpec, progress, registry, run_pipeline
from graphopt.errors import GraphoptError, PassCheckError, PipelineSpecError
from graphopt.pipeline import PassFailedError, build_steps

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

    result = run_pipeline(_model(), [PassSpec("lift-constants"), EliminateDeadCodePass(), _Noop()])

    # A registered pass class's instance is named as in a spec; an unregistered one by its class.
    assert [row.name for row in result.ledger.rows] == ["lift-constants", "dce", "_Noop"]


class _Noop(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_a_spec_string_in_a_list_is_parsed_and_may_hold_several_steps():
    from passes.toposort import SortTopologicallyPass

    model = _model()
    original = to_proto(model)

    result = run_pipeline(model, ["lift-constants(min_elements=2),dce", SortTopologicallyPass()])

    assert [row.name for row in result.ledger.rows] == ["lift-constants", "dce", "toposort"]
    assert result.ledger.rows[0].options == {"min_elements": 2}
    assert [node.op_type for node in model.graph] == ["MatMul", "Relu"]
    assert_same_outputs(run_ort(original, {"x": X}), run_ort(model, {"x": X}))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (_Noop, "pipeline step _Noop is a class, not a pass: give _Noop() or its name"),
        (3, "pipeline step of type int is not a spec string, PassSpec or onnx_ir pass instance"),
        (None, "pipeline step of type NoneType is not a spec string"),
    ],
    ids=["pass-class", "int", "none"],
)
def test_a_list_item_that_is_no_step_is_a_one_line_spec_error_naming_its_type(item, message):
    model = _model()
    before = to_proto(model).SerializeToString()

    with pytest.raises(PipelineSpecError) as caught:
        run_pipeline(model, ["dce", item])

    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert to_proto(model).SerializeToString() == before  # refused before any pass ran


@pytest.mark.parametrize("pipeline", [[], "", " , ", ()], ids=["list", "string", "commas", "tuple"])
def test_an_empty_pipeline_is_a_spec_error(pipeline):
    with pytest.raises(PipelineSpecError, match="empty"):
        run_pipeline(_model(), pipeline)


def test_an_instance_row_takes_the_registered_name_and_the_options_the_instance_holds():
    from passes.prune import PrunePass
    from passes.qdq import QuantizePass

    spec = build_steps("prune(pattern=channel,ratio=0.3,align=1)")[0]
    feeds = [{"x": X}]

    pruned, quantized = build_steps(
        [PrunePass(pattern="channel", ratio=0.3, align=1), QuantizePass(data=feeds, seed=3, calibration="minmax", activations="s8")]
    )

    assert pruned.label == "prune" and quantized.label == "qdq"
    # Every option PrunePass keeps under its own name, with the value a spec gives it.
    assert pruned.options == {key: value for key, value in spec.options.items() if key in pruned.options}
    assert {"pattern", "ratio", "align", "sparsity", "reconstruct"} <= set(pruned.options)
    assert pruned.options["ratio"] == 0.3 and pruned.options["pattern"] == "channel" and pruned.options["align"] == 1
    # Feeds are not JSON: left out, as is ``exclude`` (stored as a set); the scalars are there.
    assert "data" not in quantized.options and "exclude" not in quantized.options
    assert quantized.options["seed"] == 3 and quantized.options["check_speed"] is True
    assert (quantized.options["calibration"], quantized.options["activations"]) == ("minmax", "s8")
    json.dumps(quantized.options, allow_nan=False)


class _Boom(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise RuntimeError("boom from a plug-in\nsecond line")


def test_a_pass_raising_another_exception_is_named_with_the_step_and_keeps_its_cause():
    with pytest.raises(PassFailedError) as caught:
        run_pipeline(_model(), [PassSpec("dce"), _Boom(), PassSpec("toposort")])

    assert str(caught.value) == "pass '_Boom' (step 2 of 3) failed: RuntimeError: boom from a plug-in"
    assert caught.value.pass_name == "_Boom"
    assert isinstance(caught.value, ir.passes.PassError)  # what callers caught before
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_errors_inside_a_fixed_point_group_surface_as_they_would_alone():
    def group() -> ir.passes.PassBase:
        return ir.passes.PassManager([_Noop(), _FailsOnTheUsersModelPass()], steps=2)

    def buggy_group() -> ir.passes.PassBase:
        return ir.passes.PassManager([_Noop(), _Boom()], steps=2)

    with pytest.raises(GraphoptError, match="^the model cannot run$"):
        run_pipeline(_model(), "group", passes={"group": group})
    with pytest.raises(PassFailedError, match=r"^pass 'buggy' \(step 1 of 1\) failed: RuntimeError: boom from a plug-in$"):
        run_pipeline(_model(), "buggy", passes={"buggy": buggy_group})


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

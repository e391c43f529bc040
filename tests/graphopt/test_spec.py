"""Pipeline spec strings and recipe files, and the typing of their option values by each pass's options."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from graphopt import registry
from graphopt.errors import PipelineSpecError
from graphopt.registry import (
    checked_pipeline,
    create_pass,
    pass_options,
    resolved_options,
    typed_options,
    with_input_shapes,
)
from graphopt.spec import PassSpec, load_recipe, parse_spec, parse_value


def test_parses_names_options_and_value_types():
    specs = parse_spec("fold, prune(pattern=channel,ratio=0.3), qdq(calibration=entropy, per_channel=true, bits=8, skip=[conv1,'fc,2'], name='8')")

    assert specs == [
        PassSpec("fold"),
        PassSpec("prune", {"pattern": "channel", "ratio": 0.3}),
        PassSpec("qdq", {"calibration": "entropy", "per_channel": True, "bits": 8, "skip": ["conv1", "fc,2"], "name": "8"}),
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("none", None), ("abc", "abc"), ('"x y"', "x y"), ("[]", [])],
)
def test_parse_value_types(text, value):
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_spec_string_roundtrips_through_str():
    text = "dce,prune(pattern=channel,ratio=0.3,skip=[a,'1'],on=true)"

    specs = parse_spec(text)

    assert parse_spec(",".join(str(s) for s in specs)) == specs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty pipeline"),
        ("dce,,fold", "empty step"),
        ("qdq(bits=8", "unclosed"),
        ("qdq(bits)", "not key=value"),
        ("qdq(bits=8,bits=4)", "given twice"),
        ("9lives", "bad pass name"),
        ("qdq)", "unbalanced"),
    ],
)
def test_malformed_specs_raise_with_a_reason(text, message):
    with pytest.raises(PipelineSpecError, match=message):
        parse_spec(text)


def test_yaml_recipe_with_names_and_options(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- lift-constants\n- pass: prune\n  options: {pattern: channel, ratio: 0.3}\n- pass: dce\n")

    assert load_recipe(recipe) == [
        PassSpec("lift-constants"),
        PassSpec("prune", {"pattern": "channel", "ratio": 0.3}),
        PassSpec("dce"),
    ]


def test_json_recipe_under_pipeline_key(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"pipeline": [{"pass": "qdq", "options": {"calibration": "entropy"}}]}))

    assert load_recipe(recipe) == [PassSpec("qdq", {"calibration": "entropy"})]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "non-empty list"),
        ("- {options: {a: 1}}", "expected a pass name"),
        ("- {pass: dce, opts: {}}", "unknown keys"),
        ("- {pass: dce, options: [1]}", "must be a mapping"),
        ("- pass:", "step 1: 'pass' must be a pass name, got None"),
        ("- {pass: 3}", "'pass' must be a pass name, got 3"),
        ("- [unclosed", "cannot parse recipe"),
        # Both parsers keep the last of two equal keys: the step would run at sparsity 0.9 unasked.
        ("- {pass: prune, options: {sparsity: 0.5, sparsity: 0.9}}", r"cannot parse recipe .*: key 'sparsity' given twice \(line 1\)"),
        ("- pass: dce\n  pass: fold", "key 'pass' given twice"),
        # Unknown top-level keys were ignored while unknown step keys were refused.
        ("pipeline: [fold]\nfoo: 1", r"^recipe .*r\.yaml: unknown top-level keys \['foo'\]; allowed: pipeline$"),
        ("passes: [fold]", r"unknown top-level keys \['passes'\]; allowed: pipeline$"),
        ("{}", "non-empty list"),
    ],
)
def test_malformed_recipes_raise_with_a_reason(tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)

    with pytest.raises(PipelineSpecError, match=message):
        load_recipe(recipe)


def test_a_json_recipe_naming_an_option_twice_is_refused(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text('[{"pass": "prune", "options": {"sparsity": 0.5, "sparsity": 0.9}}]')

    with pytest.raises(PipelineSpecError, match="cannot parse recipe .*: key 'sparsity' given twice"):
        load_recipe(recipe)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PipelineSpecError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


class _TypedPass(ir.passes.InPlacePass):
    """A pass whose options cover every scalar annotation the registry types."""

    def __init__(
        self, *, flag: bool = False, count: int = 1, limit: int | None = None, ratio: float = 0.5, target: float | None = None, name: str = ""
    ) -> None:
        super().__init__()
        self.options = {"flag": flag, "count": count, "limit": limit, "ratio": ratio, "target": target, "name": name}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def _built(text: str) -> dict:
    (spec,) = parse_spec(text)
    return create_pass(spec, {"typed": _TypedPass}).options


@pytest.mark.parametrize(
    ("word", "meaning"),
    [("true", True), ("false", False), ("yes", True), ("no", False), ("On", True), ("OFF", False), ("1", True), ("0", False), ("'no'", False)],
)
def test_bool_options_take_true_false_and_synonyms_that_mean_what_they_say(word, meaning):
    assert _built(f"typed(flag={word})")["flag"] is meaning


def test_numeric_options_are_checked_and_quoted_numbers_converted():
    options = _built("typed(count='3', limit=none, ratio=1, target='0.25', name=7)")
    assert options == {"flag": False, "count": 3, "limit": None, "ratio": 1, "target": 0.25, "name": 7}  # name: str, the pass checks it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("typed(flag=maybe)", "pass 'typed': option flag got 'maybe'; it takes true or false (also yes/no, on/off, 1/0)"),
        ("typed(flag=2)", "option flag got 2; it takes true or false"),
        ("typed(flag=none)", "option flag got None"),
        ("typed(count=1.5)", "pass 'typed': option count got 1.5; it takes an integer"),
        ("typed(count=true)", "option count got True; it takes an integer"),
        ("typed(limit=abc)", "option limit got 'abc'; it takes an integer, or none"),
        ("typed(ratio=abc)", "pass 'typed': option ratio got 'abc'; it takes a number"),
        ("typed(target=[1])", "option target got [1]; it takes a number, or none"),
    ],
)
def test_values_that_do_not_fit_the_option_type_name_the_pass_option_and_accepted_values(text, message):
    with pytest.raises(PipelineSpecError) as caught:
        _built(text)
    assert message in str(caught.value) and str(caught.value).startswith("pass 'typed': ")


def test_recipe_values_are_typed_like_spec_values(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"pass": "typed", "options": {"flag": "no", "count": "4"}}]))

    (spec,) = load_recipe(recipe)

    assert create_pass(spec, {"typed": _TypedPass}).options["flag"] is False
    assert typed_options("typed", _TypedPass, spec.options) == {"flag": False, "count": 4}


def test_annotations_as_runtime_types_and_bool_defaults_are_typed_too():
    def factory(*, flag=True, count=1, loose=None):  # flag: no annotation, a bool default
        return _TypedPass()

    factory.__annotations__ = {"count": int}
    assert pass_options(factory)["count"].annotation == "int"
    assert typed_options("f", factory, {"flag": "off", "count": "2", "loose": "anything"}) == {"flag": False, "count": 2, "loose": "anything"}
    with pytest.raises(PipelineSpecError, match="option count got 'x'; it takes an integer"):
        typed_options("f", factory, {"count": "x"})


def test_resolved_options_record_the_typed_value():
    assert resolved_options(_TypedPass, {"flag": "no"})["flag"] is False


@pytest.mark.parametrize(("value", "refused"), [("off", False), ("no", False), ("true", True), ("yes", True)])
def test_without_timing_reads_check_speed_synonyms_by_their_meaning(value, refused):
    from graphopt.registry import without_timing

    spec = [PassSpec("qdq", {"check_speed": value})]
    if refused:
        with pytest.raises(PipelineSpecError, match="check_speed=true times onnxruntime"):
            without_timing(spec)
    else:
        assert without_timing(spec)[0].options["check_speed"] is False


def test_checked_pipeline_types_every_step_and_builds_each_pass():
    steps = checked_pipeline(parse_spec("dce,qdq(symmetric=no,samples='8')"))

    assert steps == [PassSpec("dce"), PassSpec("qdq", {"symmetric": False, "samples": 8})]
    with pytest.raises(PipelineSpecError, match="pass 'prune': option reconstruct got 'maybe'"):
        checked_pipeline(parse_spec("dce,prune(reconstruct=maybe)"))


def test_with_input_shapes_hands_shape_to_passes_that_take_it_unless_the_spec_sets_it(monkeypatch):
    class _Shaped(_TypedPass):
        def __init__(self, *, shapes: list[str] | None = None) -> None:
            super().__init__()

    monkeypatch.setattr(registry, "available_passes", lambda: {"typed": _TypedPass, "shaped": _Shaped})
    pipeline = [PassSpec("typed"), PassSpec("shaped"), PassSpec("shaped", {"shapes": ["x:1x2"]})]

    assert with_input_shapes(pipeline, ["x:3x4", "y:5"]) == [
        PassSpec("typed"), PassSpec("shaped", {"shapes": ["x:3x4", "y:5"]}), PassSpec("shaped", {"shapes": ["x:1x2"]})]
    assert with_input_shapes(pipeline, []) is pipeline

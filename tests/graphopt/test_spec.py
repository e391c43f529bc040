"""Pipeline spec strings and recipe files."""

from __future__ import annotations

import json

import pytest

from graphopt.errors import PipelineSpecError
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
        ("- [unclosed", "cannot parse recipe"),
    ],
)
def test_malformed_recipes_raise_with_a_reason(tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)

    with pytest.raises(PipelineSpecError, match=message):
        load_recipe(recipe)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PipelineSpecError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")

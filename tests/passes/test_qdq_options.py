"""qdq's options are checked when the pass is built: a bad value is a ValueError naming it, never a later traceback.

Spec strings hand values over as parsed (``symmetric=no`` arrives as the
string "no", which is truthy), so a yes/no option takes only True or False.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_full, cosine, one_input_model, run_ort
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphopt import PassSpec, load, run_pipeline
from graphopt.errors import GraphoptError
from passes.qdq import QuantizePass
from passes.qdq.options import BOOL_OPTIONS


def test_every_yes_no_option_of_the_signature_is_checked():
    defaults = QuantizePass.__init__.__kwdefaults__
    assert sorted(BOOL_OPTIONS) == sorted(name for name, value in defaults.items() if isinstance(value, bool))


@pytest.mark.parametrize("value", ["no", "off", "false", "yes", 0, 1, None, 1.0])
@pytest.mark.parametrize("name", BOOL_OPTIONS)
def test_yes_no_options_refuse_anything_but_true_or_false(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be true or false, got {value!r}$"):
        QuantizePass(**{name: value})


@pytest.mark.parametrize("name", BOOL_OPTIONS)
def test_yes_no_options_take_true_and_false(name):
    for value in (True, False):
        assert getattr(QuantizePass(**{name: value}), name) is value


@pytest.mark.parametrize(
    "options,message",
    [
        ({"threads": 0}, "threads must be a positive integer or None"),
        ({"threads": -2}, "threads must be a positive integer or None"),
        ({"threads": 1.5}, "threads must be a positive integer or None"),
        ({"threads": "2"}, "threads must be a positive integer or None"),
        ({"threads": True}, "threads must be a positive integer or None"),
        ({"samples": 0}, "samples must be an integer of at least 1"),
        ({"samples": 2.5}, "samples must be an integer of at least 1"),
        ({"samples": "many"}, "samples must be an integer of at least 1"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 0.5}, "seed must be a non-negative integer"),
        ({"weight_bits": 8.0}, "weight_bits must be 8 or 4"),
        ({"weight_bits": "8"}, "weight_bits must be 8 or 4"),
        ({"block_size": 32.0}, "block_size must be a power of 2"),
        ({"block_size": "32"}, "block_size must be a power of 2"),
        ({"block_size": 8}, "block_size must be a power of 2"),
        ({"percentile": "high"}, "percentile must be in"),
        ({"percentile": float("nan")}, "percentile must be in"),
        ({"percentile": True}, "percentile must be in"),
        ({"target_cosine": "0.99"}, "target_cosine must be in"),
        ({"target_cosine": 1.5}, "target_cosine must be in"),
        ({"target_snr": "30"}, "target_snr must be a finite number"),
        ({"target_snr": float("inf")}, "target_snr must be a finite number"),
        ({"exclude": 3}, "exclude must be comma-separated"),
        ({"exclude": ["Conv", 3]}, "exclude must be comma-separated"),
        ({"calibration": ["minmax"]}, "calibration must be one of"),
        ({"rounding": "best"}, "rounding must be nearest or gptq"),
        ({"fallback": None}, "fallback must be storage or float"),
    ],
)
def test_numeric_and_choice_options_refuse_values_that_would_fail_later(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizePass(**options)


@pytest.mark.parametrize(
    "options",
    [{"threads": None}, {"threads": np.int64(2)}, {"samples": np.int64(4)}, {"percentile": 99}, {"target_snr": 20},
     {"exclude": ["Conv", "MatMul"]}, {"exclude": None}, {"target_cosine": np.float64(0.9)}],
)
def test_valid_values_of_other_numeric_types_are_taken(options):
    pass_ = QuantizePass(**options)
    for name in ("threads", "samples", "seed", "weight_bits", "block_size"):
        value = getattr(pass_, name)
        assert value is None or type(value) is int
    assert pass_.exclude == (frozenset({"Conv", "MatMul"}) if options.get("exclude") else frozenset())


def test_a_pipeline_spec_with_an_unusable_value_fails_before_the_model_changes():
    model = load(_matmul_model())
    with pytest.raises(GraphoptError, match="threads must be a positive integer or None"):
        run_pipeline(model, "qdq(check_speed=false,threads=0)")
    assert [node.op_type for node in model.graph] == ["MatMul"]


def test_options_checked_at_build_still_quantize_when_valid():
    proto = _matmul_model()
    model = load(proto)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)}

    result = run_pipeline(model, [PassSpec("qdq", {"check_speed": False, "threads": np.int64(1), "symmetric": False})])

    assert result.modified is True
    assert [node.op_type for node in model.graph].count("DequantizeLinear") == 2
    check_full(model)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) >= 0.999


def _matmul_model():
    weight = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    return one_input_model([oh.make_node("MatMul", ["x", "W"], ["y"])], [nh.from_array(weight, "W")], [4, 32], [4, 16])

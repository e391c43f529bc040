"""Property: the lossy passes (prune, lowrank, qdq) keep random valid graphs valid and usable.

Lossy passes change outputs by design, so the properties are about
everything else: the rewritten model passes onnx.checker's full check, opens
in onnxruntime with graph optimizations off and on, keeps its inputs and
outputs (names, element types, declared shapes), gives outputs of the
original's shapes and types, and finite outputs for finite inputs. Options
are drawn too, and go through ``graphopt.run_pipeline`` as pass specs, with
small calibration data where a pass takes some.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import run_ort
from hypothesis import event, given
from hypothesis import strategies as st
from properties.outcomes import assert_same_interface, assert_valid
from properties.strategies import LAYER_KINDS, Drawn, models

from graphopt import PassSpec, run_pipeline

pytestmark = pytest.mark.property

# Layers wide enough to prune 2:4 and to factor with a gain.
_LAYER_MODELS = models(LAYER_KINDS, min_steps=2, max_steps=6, widths=(8, 16))
# Stands for calibration feeds in drawn options (so failure reports stay short); see _calibration.
_CALIBRATION = "<calibration feeds>"


def _calibration(drawn: Drawn, count: int = 4) -> list[dict[str, np.ndarray]]:
    """Feeds like the drawn ones (same inputs, shapes and dtypes), from a fixed seed."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        samples.append(
            {
                name: rng.standard_normal(array.shape).astype(array.dtype) if array.dtype != bool else np.array(rng.random() < 0.5)
                for name, array in drawn.feeds.items()
            }
        )
    return samples


def _assert_valid_lossy(drawn: Drawn, spec: PassSpec, fold_first: bool) -> None:
    if spec.options.get("data") == _CALIBRATION:
        spec = PassSpec(spec.name, {**spec.options, "data": _calibration(drawn)})
    # Half the time after fold, as a deployment pipeline runs them; alone, the pass meets
    # Constant-node and Transpose-behind weights, shared weights, and BatchNorms.
    pipeline = [PassSpec("fold"), spec] if fold_first else [spec]
    result = run_pipeline(ir.serde.deserialize_model(drawn.proto), pipeline)
    rewritten = ir.to_proto(result.model)
    event(f"modified={result.modified}")

    expected = run_ort(drawn.proto, drawn.feeds)
    plain, optimized = assert_valid(drawn.proto, rewritten, drawn.feeds)
    assert_same_interface(drawn.proto, rewritten)
    assert all(np.isfinite(e).all() for e in expected), "the drawn model itself gives non-finite outputs"
    for got in [plain] if optimized is None else [plain, optimized]:
        assert [(g.shape, g.dtype) for g in got] == [(e.shape, e.dtype) for e in expected]
        assert all(np.isfinite(g).all() for g in got)


@st.composite
def _prune_options(draw, pattern: str) -> dict:
    options: dict = {"pattern": pattern, "skip": draw(st.sampled_from(("", "default")))}
    if pattern == "unstructured":
        options["sparsity"] = draw(st.sampled_from((0.3, 0.5, 0.9)))
        options["scope"] = draw(st.sampled_from(("layer", "global")))
    if pattern == "channel":
        options["ratio"] = draw(st.sampled_from((0.25, 0.5)))
        options["align"] = draw(st.sampled_from((1, 4)))
        options["norm"] = draw(st.sampled_from(("l1", "l2", "activation")))
    if pattern != "channel" and draw(st.booleans()):
        options["reconstruct"] = True
    if options.get("reconstruct") or options.get("norm") == "activation":
        options["data"] = _CALIBRATION
    return options


@st.composite
def _lowrank_options(draw, conv: str) -> dict:
    # MatMul and Gemm layers are factored by SVD in both conv modes.
    options: dict = {"check_speed": False, "conv": conv}
    size = draw(st.sampled_from(("ratio", "rank", "energy", "target_cosine")))
    options[size] = {"ratio": 0.5, "rank": draw(st.sampled_from((1, 2, 4))), "energy": 0.9, "target_cosine": 0.95}[size]
    # A negative min_gain factors layers even where the factors are larger: more rewrites to check.
    options["min_gain"] = draw(st.sampled_from((0.1, -10.0)))
    options["data_aware"] = draw(st.booleans())
    options["reconstruct"] = draw(st.booleans())
    options["data"] = _CALIBRATION
    return options


@st.composite
def _qdq_options(draw, weight_bits: int) -> dict:
    options: dict = {"check_speed": False, "data": _CALIBRATION, "weight_bits": weight_bits}
    if weight_bits == 8:
        options["calibration"] = draw(st.sampled_from(("minmax", "percentile", "entropy", "mse")))
        options["activations"] = draw(st.sampled_from(("u8", "s8")))
        options["symmetric"] = draw(st.booleans())
        options["reduce_range"] = draw(st.booleans())
        options["bias_correction"] = draw(st.booleans())
        if draw(st.booleans()):
            options["target_cosine"] = 0.999
    else:
        options["block_size"] = 16
    return options


# Each pattern, conv mode and weight width is its own test, so each gets the profile's examples.
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "channel"])
@given(data=st.data(), fold_first=st.booleans())
def test_prune_keeps_random_graphs_valid(pattern, data, fold_first):
    drawn = data.draw(_LAYER_MODELS, label="drawn")
    _assert_valid_lossy(drawn, PassSpec("prune", data.draw(_prune_options(pattern), label="options")), fold_first)


@pytest.mark.parametrize("conv", ["tucker", "channel"])
@given(data=st.data(), fold_first=st.booleans())
def test_lowrank_keeps_random_graphs_valid(conv, data, fold_first):
    drawn = data.draw(_LAYER_MODELS, label="drawn")
    _assert_valid_lossy(drawn, PassSpec("lowrank", data.draw(_lowrank_options(conv), label="options")), fold_first)


@pytest.mark.parametrize("weight_bits", [8, 4])
@given(data=st.data(), fold_first=st.booleans())
def test_qdq_keeps_random_graphs_valid(weight_bits, data, fold_first):
    drawn = data.draw(_LAYER_MODELS, label="drawn")
    _assert_valid_lossy(drawn, PassSpec("qdq", data.draw(_qdq_options(weight_bits), label="options")), fold_first)

"""Quantization arithmetic: scales, zero points and round-trip error bounds."""

from __future__ import annotations

import numpy as np
import pytest

from passes.qdq.arithmetic import activation_params, dequantize, quantize_bias, quantize_blockwise, quantize_per_channel


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    "low,high,scale,zero_point",
    [(0.0, 6.0, 6 / 255, 0), (-1.0, 3.0, 4 / 255, 64), (1.0, 2.0, 2 / 255, 0), (-4.0, -1.0, 4 / 255, 255)],
)
def test_uint8_asymmetric_params_cover_the_range_and_zero(low, high, scale, zero_point):
    params = activation_params(low, high)

    assert params.dtype == np.uint8
    assert params.scale == pytest.approx(scale, rel=1e-6)
    assert int(params.zero_point) == zero_point
    # Zero is exact, and both ends of the widened range are within half a step.
    assert dequantize(np.array([params.zero_point]), params.scale, params.zero_point)[0] == 0.0
    ends = np.array([min(low, 0.0), max(high, 0.0)], dtype=np.float32)
    q = np.clip(np.rint(ends / params.scale) + int(params.zero_point), 0, 255).astype(np.uint8)
    assert np.max(np.abs(dequantize(q, params.scale, params.zero_point) - ends)) <= params.scale / 2 + 1e-7


def test_int8_symmetric_params_have_zero_point_zero_and_cover_the_larger_side():
    params = activation_params(-2.0, 3.0, signed=True, symmetric=True)

    assert params.dtype == np.int8 and int(params.zero_point) == 0
    assert params.scale == pytest.approx(6 / 255, rel=1e-6)


def test_reduce_range_uses_seven_bits():
    assert activation_params(0.0, 1.27, reduce_range=True).scale == pytest.approx(0.01, rel=1e-6)


def test_degenerate_range_gets_a_positive_scale():
    params = activation_params(0.0, 0.0)
    assert params.scale > 0 and int(params.zero_point) == 0


@pytest.mark.parametrize("low,high", [(np.nan, 1.0), (2.0, 1.0), (0.0, np.inf)])
def test_bad_activation_range_raises(low, high):
    with pytest.raises(ValueError, match="activation range"):
        activation_params(low, high)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_weights_round_trip_within_half_a_step(axis):
    weight = _rng().standard_normal((6, 5, 3, 3)).astype(np.float32)
    weight[2] = 0.0 if axis == 0 else weight[2]

    q, scales = quantize_per_channel(weight, axis)

    assert q.dtype == np.int8 and q.shape == weight.shape and scales.shape == (weight.shape[axis],)
    assert q.min() >= -127 and q.max() <= 127
    shape = [1] * 4
    shape[axis] = -1
    error = np.abs(dequantize(q, scales, axis=axis) - weight)
    assert np.all(error <= scales.reshape(shape) / 2 + 1e-7)
    assert np.all(scales > 0)


def test_per_channel_quantization_is_odd_and_uses_the_full_narrow_range():
    weight = _rng(1).standard_normal((4, 8)).astype(np.float32)
    q, _ = quantize_per_channel(weight, 0)
    q_neg, _ = quantize_per_channel(-weight, 0)

    np.testing.assert_array_equal(q_neg, -q)
    assert np.all(np.max(np.abs(q), axis=1) == 127)


def test_reduce_range_weights_stay_within_63():
    q, _ = quantize_per_channel(_rng(2).standard_normal((3, 10)), 0, reduce_range=True)
    assert np.max(np.abs(q)) == 63


@pytest.mark.parametrize("rows,block", [(64, 32), (70, 32), (16, 16)])
def test_blockwise_int4_has_one_scale_per_block_and_round_trips(rows, block):
    weight = _rng(3).standard_normal((rows, 5)).astype(np.float32)

    q, scales = quantize_blockwise(weight, 0, block)

    assert scales.shape == (-(-rows // block), 5)
    assert q.min() >= -7 and q.max() <= 7
    expanded = np.repeat(scales, block, axis=0)[:rows]
    assert np.all(np.abs(q * expanded - weight) <= expanded / 2 + 1e-7)


def test_bias_is_int32_with_input_times_weight_scale():
    bias = np.array([0.5, -1.25, 0.0], dtype=np.float32)
    weight_scales = np.array([0.01, 0.02, 0.04], dtype=np.float32)

    q, scales = quantize_bias(bias, np.float32(0.1), weight_scales)

    assert q.dtype == np.int32
    np.testing.assert_allclose(scales, 0.1 * weight_scales, rtol=1e-6)
    assert np.all(np.abs(q * scales - bias) <= scales / 2 + 1e-9)

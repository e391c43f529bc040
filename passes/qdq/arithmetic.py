"""Quantization arithmetic: activation scales and zero points, quantized weights and biases.

Everything here is numpy on arrays; the ``qdq`` pass decides where the
results go in the graph. The conventions follow what onnxruntime's CPU
kernels expect (see shared/ORT_QDQ.md):

- weights are symmetric (zero point 0) and use the narrow range [-q, q]
  with q = 2**(bits-1) - 1, so that ``-w`` quantizes to ``-q(w)``;
- ``reduce_range`` drops one bit (7-bit weights and activations), for x86
  CPUs without VNNI where u8 x s8 products can saturate int16;
- a bias becomes int32 with scale ``x_scale * w_scale`` per output channel,
  the only bias scale the fused kernels accept.
"""

from __future__ import annotations

__all__ = [
    "ActivationParams",
    "activation_params",
    "quantize_per_channel",
    "quantize_blockwise",
    "quantize_bias",
    "dequantize",
]

from dataclasses import dataclass

import numpy as np

_INT32 = np.iinfo(np.int32)
# A channel or range of all zeros still needs a positive scale.
_FALLBACK_SCALE = np.float32(1.0)
# Below this a float32 scale is subnormal or 0 (values of ~1e-36 and less):
# x / scale overflows, and such values quantize to 0 with the fallback scale anyway.
_SMALLEST_SCALE = np.finfo(np.float32).tiny


def usable_scales(scales: np.ndarray) -> np.ndarray:
    """Scales with the zero, subnormal or NaN ones replaced by the fallback (callers reject NaN/Inf data first)."""
    return np.where(scales >= _SMALLEST_SCALE, scales, _FALLBACK_SCALE).astype(np.float32)


@dataclass(frozen=True)
class ActivationParams:
    """Scale and zero point of one activation tensor, and its storage type."""

    scale: np.float32
    zero_point: np.integer

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.zero_point).dtype


def _levels(signed: bool, bits: int) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def activation_params(
    low: float, high: float, *, signed: bool = False, symmetric: bool = False, reduce_range: bool = False
) -> ActivationParams:
    """Scale and zero point that map ``[low, high]`` onto the 8-bit (7 with reduce_range) levels.

    The range is first widened to contain 0, so that zero (padding, ReLU
    outputs) is exact. Symmetric ranges are centred on 0: zero point 0 for
    int8 and 128 (64 with reduce_range) for uint8.
    """
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"activation range must be finite with low <= high, got [{low}, {high}]")
    qmin, qmax = _levels(signed, 7 if reduce_range else 8)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    dtype = np.int8 if signed else np.uint8
    if symmetric:
        bound = max(-low, high)
        scale = np.float32(2 * bound / (qmax - qmin)) if bound > 0 else _FALLBACK_SCALE
        return ActivationParams(scale, dtype((qmin + qmax + 1) // 2))
    if high == low:
        return ActivationParams(_FALLBACK_SCALE, dtype(0 if signed or qmin == 0 else qmin))
    scale = np.float32((high - low) / (qmax - qmin))
    zero_point = int(np.clip(np.round(qmin - low / float(scale)), qmin, qmax))
    return ActivationParams(scale, dtype(zero_point))


def quantize_per_channel(weight: np.ndarray, axis: int, *, bits: int = 8, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel quantization along ``axis``.

    Returns:
        ``(q, scales)``: int8 values in [-q, q] with the weight's shape, and
        one float32 scale per channel (``weight.shape[axis]``).
    """
    effective_bits = bits - 1 if reduce_range else bits
    qmax = (1 << (effective_bits - 1)) - 1
    w = np.asarray(weight, dtype=np.float32)
    axis = axis % w.ndim
    reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
    absmax = np.max(np.abs(w), axis=reduce_axes) if reduce_axes else np.abs(w)
    scales = usable_scales(absmax / np.float32(qmax))
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scales


def quantize_blockwise(weight: np.ndarray, axis: int, block_size: int, *, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization: one scale per ``block_size`` elements along ``axis``.

    This is DequantizeLinear's ``block_size`` layout (opset 21): the scale
    has the weight's shape with ``axis`` shrunk to ``ceil(n / block_size)``.
    A last, partial block gets its own scale.

    Returns:
        ``(q, scales)``: int8 values in [-q, q] (q = 7 for 4 bits) and the
        float32 scales.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    qmax = (1 << (bits - 1)) - 1
    w = np.asarray(weight, dtype=np.float32)
    axis = axis % w.ndim
    n = w.shape[axis]
    blocks = -(-n // block_size)
    padded = np.moveaxis(w, axis, 0)
    padded = np.concatenate([padded, np.zeros((blocks * block_size - n, *padded.shape[1:]), np.float32)])
    grouped = padded.reshape(blocks, block_size, *padded.shape[1:])
    absmax = np.max(np.abs(grouped), axis=1)
    scales = usable_scales(absmax / np.float32(qmax))
    expanded = np.repeat(scales, block_size, axis=0)[:n]
    q = np.clip(np.rint(np.moveaxis(w, axis, 0) / expanded), -qmax, qmax).astype(np.int8)
    return np.moveaxis(q, 0, axis), np.moveaxis(scales, 0, axis)


def quantize_bias(bias: np.ndarray, input_scale: np.float32, weight_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``input_scale * weight_scales``, as QLinearConv/QGemm require.

    Returns:
        ``(q, scales)``. Values beyond int32 (a tiny scale) are clipped; the
        caller can compare ``dequantize(q, scales)`` with the bias to notice.
    """
    scales = (np.float32(input_scale) * np.asarray(weight_scales, dtype=np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, np.shape(bias)).astype(np.float32)
    scales = usable_scales(scales)
    q = np.clip(np.rint(np.asarray(bias, dtype=np.float64) / scales), _INT32.min, _INT32.max).astype(np.int32)
    return q, scales


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0, axis: int | None = None) -> np.ndarray:
    """The float32 values DequantizeLinear gives for ``q`` (per-tensor, or per-channel along ``axis``)."""
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero_point, dtype=np.int32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zero = scale.reshape(shape), np.broadcast_to(zero, scale.shape).reshape(shape)
    return ((q.astype(np.int32) - zero) * scale).astype(np.float32)

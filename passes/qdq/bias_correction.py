"""Bias correction: cancel the mean output shift that rounding the weights causes.

With quantized weights W_q = W + D, a layer's output moves by D E[x] on
average. Given the per-channel mean of each layer's float input over the
calibration samples, the bias absorbs that shift: b' = b - D E[x]. Zero
padding in a Conv makes the true shift slightly smaller near the borders;
the correction ignores that. NaN/Inf activations are left out of the means,
and a channel with no finite value leaves its layer uncorrected, so a bias
never absorbs a NaN.
"""

from __future__ import annotations

__all__ = ["channel_axis", "channel_axes", "input_means", "output_shift"]

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from passes.qdq.calibration import TensorStatistics


def channel_axis(node: ir.Node) -> int:
    """Where ``node``'s first input holds its channels: axis 1 for a Conv, the last axis for MatMul and Gemm."""
    return 1 if node.op_type == "Conv" else -1


def channel_axes(nodes: Sequence[ir.Node]) -> dict[str, tuple[int, ...]]:
    """The channel axes along which each node's first input is read, by tensor name.

    Calibration keeps these tensors' per-channel means in its own pass
    (calibration.collect's ``channel_axes``), so correction costs no run.
    A tensor that a Conv and a MatMul both read keeps means along both
    axes: one set for both corrected one of them with the wrong values.
    Constant inputs are left out: they vary with no sample.
    """
    axes: dict[str, tuple[int, ...]] = {}
    for node in nodes:
        value = node.inputs[0] if node.inputs else None
        if value is None or not value.name or value.is_initializer():
            continue
        axes[value.name] = tuple(dict.fromkeys([*axes.get(value.name, ()), channel_axis(node)]))
    return axes


def input_means(stats: Mapping[str, TensorStatistics]) -> dict[tuple[str, int], np.ndarray]:
    """The per-channel means calibration kept, by (tensor name, axis); a channel of no finite value leaves its entry out."""
    means = {(name, axis): s.channel_means(axis) for name, s in stats.items() for axis in s.channel_axes}
    return {key: mean for key, mean in means.items() if mean is not None}


def output_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Per-output-channel mean shift ``D E[x]`` of ``node`` for weight error ``delta``, or None if unsupported."""
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean.shape != (per_group * groups,):
            return None
        spatial = delta.reshape(out_channels, per_group, -1).sum(axis=2)  # [M, C/g]
        group_of = np.arange(out_channels) // (out_channels // groups)
        means = mean.reshape(groups, per_group)[group_of]  # [M, C/g]
        return (spatial * means).sum(axis=1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return delta @ mean if mean.shape == (delta.shape[1],) else None
    if node.op_type in ("MatMul", "Gemm"):
        return mean @ delta if mean.shape == (delta.shape[0],) else None
    return None

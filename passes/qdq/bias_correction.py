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

__all__ = ["input_means", "output_shift"]

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from graphopt.runtime import stream_tensors


def input_means(model: ir.Model, nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None) -> dict[str, np.ndarray]:
    """Mean of the finite values of each node's first input per channel (axis 1 for Conv, else the last axis), by tensor name.

    A tensor with a channel that held no finite value is left out.
    """
    inputs = {node.inputs[0].name: node.op_type for node in nodes if node.inputs and node.inputs[0] is not None}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensors in stream_tensors(model, [name for name in inputs if name], feeds, threads=threads):
        for name, array in tensors.items():
            if array.ndim < 2:
                continue
            channels = np.moveaxis(np.asarray(array, dtype=np.float64), 1 if inputs[name] == "Conv" else -1, -1)
            flat = channels.reshape(-1, channels.shape[-1])
            finite = np.isfinite(flat)
            sums[name] = sums.get(name, 0) + np.where(finite, flat, 0.0).sum(axis=0)
            counts[name] = counts.get(name, 0) + finite.sum(axis=0)
    return {name: sums[name] / counts[name] for name in sums if np.all(counts[name] > 0)}


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

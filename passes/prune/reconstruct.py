"""Layer-wise reconstruction: refit pruned weights so each layer's outputs match the original's.

For a layer y = x W (+ b) whose weight was pruned to a mask, every output
column j is refit on its kept inputs by ridge regression against the
original layer's outputs on calibration activations (the original model is
the teacher):

    w_j = argmin ||X_k w - X W_j||^2 + lambda ||w||^2  =  (G_kk + lambda I)^-1 (G W_j)_k

with G = X^T X accumulated over the samples (with a column of ones when the
layer has a bias, so the bias is refit too). Only G is kept: memory is
K x K per layer whatever the number of samples. The inputs are the original
model's activations, so each layer is fitted independently (closed form,
numpy only). MatMul and Gemm (transA=0) are supported; Conv is not yet.
"""

from __future__ import annotations

__all__ = ["input_gram", "refit"]

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from graphopt.runtime import ModelRunner

# Ridge strength relative to the mean of G's diagonal: enough to keep nearly
# collinear inputs solvable, small enough not to shrink the weights visibly.
RELATIVE_DAMPING = 1e-4


def input_gram(model: ir.Model, nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None) -> dict[str, np.ndarray]:
    """``X^T X`` of each node's first input over all samples (rows = all leading dims), by tensor name.

    Tensors get a trailing column of ones, so G[-1, -1] counts the rows and
    G[:-1, -1] sums the inputs (what a bias needs).
    """
    names = list(dict.fromkeys(node.inputs[0].name for node in nodes if node.inputs[0] is not None))
    graph_inputs = {value.name for value in model.graph.inputs}
    exposed = [name for name in names if name not in graph_inputs]
    grams: dict[str, np.ndarray] = {}
    with ModelRunner(model, threads=threads, extra_outputs=exposed) as runner:
        for sample in feeds:
            outputs = runner.run({k: v for k, v in sample.items() if k in runner.input_names}, exposed)
            for name in names:
                array = outputs[name] if name in outputs else sample.get(name)
                if array is None:
                    continue
                rows = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
                rows = np.hstack([rows, np.ones((rows.shape[0], 1))])
                grams[name] = grams.get(name, 0) + rows.T @ rows
    return grams


def refit(gram: np.ndarray, original: np.ndarray, bias: np.ndarray | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Refit a [K, N] weight (columns = outputs) under ``mask``; returns the new weight and bias.

    Args:
        gram: (K+1) x (K+1) from :func:`input_gram` (last row/column: ones).
        original: The unpruned [K, N] weight.
        bias: The [N] bias, or None (then the ones column is not used).
        mask: [K, N] booleans, True where a weight is kept.
    """
    k, n = original.shape
    with_bias = bias is not None
    size = k + 1 if with_bias else k
    g = gram[:size, :size]
    target = original.astype(np.float64)
    if with_bias:
        target = np.vstack([target, np.asarray(bias, dtype=np.float64)[None, :]])
    right = g @ target  # X^T y_j for every output j
    damping = RELATIVE_DAMPING * float(np.mean(np.diag(g))) if size else 0.0
    weight, new_bias = np.zeros((k, n)), np.zeros(n) if with_bias else None
    for j in range(n):
        kept = np.flatnonzero(mask[:, j])
        index = np.append(kept, k) if with_bias else kept
        if index.size == 0:
            continue
        system = g[np.ix_(index, index)] + damping * np.eye(index.size)
        solution = np.linalg.solve(system, right[index, j])
        weight[kept, j] = solution[: kept.size]
        if with_bias:
            new_bias[j] = solution[-1]  # type: ignore[index]
    return weight.astype(original.dtype), None if new_bias is None else new_bias.astype(np.asarray(bias).dtype)

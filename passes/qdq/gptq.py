"""GPTQ rounding of int8 and int4 weights: the layer's outputs, not its weights, stay close.

Rounding each weight to its nearest level moves every output by the sum of
independent rounding errors. GPTQ (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", 2023)
rounds the columns of W [N outputs, K inputs] one at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the
inverse of H = X^T X, the second moment of the layer's inputs on calibration
data. int8 per channel keeps the scale nearest rounding would give each
output channel (max|w| / 127), so the stored format, the int32 bias and
onnxruntime's kernels are unchanged; only which level each weight gets
differs; its columns go in order of decreasing H diagonal ("act-order").
int4 blocks along K take their scale from the weights as they stand when
GPTQ reaches the block, in column order.

Measured: the real MiniLM, weight-only, sentences it never saw: rel L2 int4
0.266 -> 0.173, int8 0.114 -> 0.031 (bench/weight_only.py); the zoo's
random-weight resnet50, int8 weights alone: cosine 0.963 -> 0.987 (with int8
activations too, 0.954 -> 0.955: activations dominate there). H comes from
prune's ``input_gram`` (Conv patches subsampled to 2048 a sample), for the
even and the odd calibration samples apart; it is collected a chunk of
layers at a time, so memory stays within :data:`GRAM_BUDGET_BYTES` plus one
chunk's work.
"""

from __future__ import annotations

__all__ = ["gptq_round", "round_targets", "in_weight_layout", "GRAM_BUDGET_BYTES"]

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from passes.qdq.arithmetic import quantize_blockwise, quantize_per_channel, usable_scales
from passes.qdq.placement import Target

logger = logging.getLogger(__name__)

# Damping added to H's diagonal, relative to its mean: GPTQ's default.
RELATIVE_DAMPING = 0.01
# Columns rounded between two matrix updates of the remaining ones (GPTQ's "lazy batch").
BLOCK = 32
# The input second moments held at once (float32 K x K, two per layer: even and odd samples).
GRAM_BUDGET_BYTES = 512 << 20


def gptq_round(
    weight: np.ndarray, gram: np.ndarray, scales: np.ndarray | None, qmax: int, *, group: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Levels in [-qmax, qmax] for ``weight`` [N, K], rounded by GPTQ against ``gram`` [K, K], and their scales.

    ``scales`` [N] fixes one scale per row (int8 per channel). With ``group``,
    each row has one scale per ``group`` consecutive columns instead ([N, G],
    int4 blocks), taken from the weights as they stand when the group's turn
    comes, as GPTQ does; columns then go in their own order, so groups stay
    contiguous.

    Raises:
        np.linalg.LinAlgError: ``gram`` is not positive definite even damped.
    """
    work = np.array(weight, dtype=np.float64)
    n, k = work.shape
    hessian = np.array(gram, dtype=np.float64)
    silent = np.diag(hessian) <= 0  # inputs that were always zero: plain rounding, nothing to spread
    hessian[silent, silent] = 1.0
    hessian[np.diag_indices(k)] += RELATIVE_DAMPING * float(np.mean(np.diag(hessian)))
    order = np.arange(k) if group else np.argsort(-np.diag(hessian), kind="stable")
    work, hessian = work[:, order], hessian[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads onto the later ones.
    # float32 halves the two O(K^3) factorizations; the damping keeps H well conditioned.
    spread = np.linalg.cholesky(np.linalg.inv(hessian.astype(np.float32))).T.astype(np.float64)
    if group:
        step_of = np.empty((n, -(-k // group)), dtype=np.float32)
        block_size = group  # a group's scale is read when its block starts, with every update applied
    else:
        step = np.asarray(scales, dtype=np.float64).reshape(-1)
        block_size = BLOCK
    levels = np.empty(work.shape, dtype=np.int8)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = work[:, start:end].copy()
        if group:
            step_of[:, start // group] = usable_scales(np.abs(block).max(axis=1) / np.float32(qmax))
            step = step_of[:, start // group].astype(np.float64)
        errors = np.empty_like(block)
        for i in range(end - start):
            column = block[:, i]
            q = np.clip(np.rint(column / step), -qmax, qmax)
            levels[:, start + i] = q
            error = (column - q * step) / spread[start + i, start + i]
            block[:, i + 1 :] -= np.outer(error, spread[start + i, start + i + 1 : end])
            errors[:, i] = error
        work[:, end:] -= errors @ spread[start:end, end:]
    restored = np.empty_like(levels)
    restored[:, order] = levels
    return restored, (step_of if group else np.asarray(scales, dtype=np.float32))


def round_targets(
    model: ir.Model,
    targets: Sequence[Target],
    feeds: Callable[[], Iterable[Feeds]],
    threads: int | None,
    *,
    bits: int = 8,
    reduce_range: bool = False,
    group: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GPTQ levels [N, K] and scales ([N], or [N, G] with ``group``) of each target's weight, by weight name.

    N is the weight's output-channel axis, K everything else in the weight's
    order (a Conv's C, kh, kw). A layer keeps GPTQ only where, fitted on the
    even calibration samples, it beats nearest rounding on the odd ones; it
    is then fitted on all of them. With fewer rows than inputs GPTQ can fit
    the samples' subspace and lose elsewhere (the zoo mlp: 32 rows for 64
    and 128 inputs). Targets it cannot serve keep nearest rounding (left
    out): grouped Convs, weights of other ranks, a singular second moment.
    ``feeds`` gives a fresh pass over the calibration samples.
    """
    from passes.prune.reconstruct import input_gram  # X^T X with Conv patches, as prune's refits use

    effective_bits = bits - 1 if reduce_range else bits  # as quantize_per_channel
    qmax = (1 << (effective_bits - 1)) - 1
    served = [t for t in targets if _servable(t)]
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for chunk in _chunks(served):
        nodes = [t.node for t in chunk]
        even = input_gram(model, nodes, itertools.islice(feeds(), 0, None, 2), threads, np.float32)
        odd = input_gram(model, nodes, itertools.islice(feeds(), 1, None, 2), threads, np.float32)
        for target in chunk:
            if target.node not in even:
                continue
            # input_gram appends a column of ones (for a bias): not an input of the weight.
            halves = [gram[:-1, :-1] for gram in (even[target.node], odd.get(target.node)) if gram is not None]
            result = _round_one(target, halves, bits, qmax, reduce_range, group)
            if result is not None:
                rounded[target.weight.name or ""] = result
        del even, odd
    logger.info("qdq: GPTQ rounded %d of %d weights (the others: nearest)", len(rounded), len(targets))
    return rounded


def in_weight_layout(target: Target, levels: np.ndarray) -> np.ndarray:
    """[N, K] levels back in the target weight's own layout."""
    shape = target.weight.const_value.shape.numpy()  # type: ignore[union-attr]
    moved = levels.reshape(np.moveaxis(np.empty(shape, dtype=np.int8), target.weight_axis, 0).shape)
    return np.moveaxis(moved, 0, target.weight_axis)


def _round_one(
    target: Target, halves: list[np.ndarray], bits: int, qmax: int, reduce_range: bool, group: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """GPTQ's levels and scales for one weight, or None where nearest rounding does as well on held-out samples."""
    array = target.weight.const_value.numpy()  # type: ignore[union-attr]
    rows = np.moveaxis(array, target.weight_axis, 0).reshape(array.shape[target.weight_axis], -1)
    if rows.shape[1] != halves[0].shape[0]:
        logger.debug("qdq: GPTQ skips %s: %d inputs, second moment of %d", target.node.name, rows.shape[1], halves[0].shape[0])
        return None
    if group:
        nearest, nearest_scales = quantize_blockwise(rows, 1, group, bits=bits)
    else:
        nearest, nearest_scales = quantize_per_channel(rows, 0, reduce_range=reduce_range)
    scales = None if group else nearest_scales
    try:
        if len(halves) == 2:
            fitted = gptq_round(rows, halves[0], scales, qmax, group=group)
            if _output_error(rows, *fitted, halves[1], group) >= _output_error(rows, nearest, nearest_scales, halves[1], group):
                logger.debug("qdq: GPTQ loses to nearest rounding on held-out samples for %s", target.node.name)
                return None
        return gptq_round(rows, sum(halves), scales, qmax, group=group)
    except np.linalg.LinAlgError:
        logger.info("qdq: GPTQ skips %s: its input second moment is singular", target.node.name)
        return None


def _output_error(rows: np.ndarray, levels: np.ndarray, scales: np.ndarray, gram: np.ndarray, group: int | None) -> float:
    """Squared output error of the rounded weight over the samples ``gram`` sums: trace(D G D^T), D = W - dequantized."""
    if group:
        steps = np.repeat(scales.astype(np.float64), group, axis=1)[:, : rows.shape[1]]
    else:
        steps = scales.astype(np.float64).reshape(-1, 1)
    difference = rows.astype(np.float64) - levels * steps
    return float(np.sum((difference @ gram) * difference))


def _servable(target: Target) -> bool:
    node, value = target.node, target.weight.const_value
    if value is None:
        return False
    rank = len(value.shape)
    if node.op_type == "Conv":
        return rank == 4 and node.attributes.get_int("group", 1) == 1 and node.attributes.get_string("auto_pad", "NOTSET") == "NOTSET"
    return rank == 2


def _chunks(targets: Sequence[Target]) -> Iterable[list[Target]]:
    """Consecutive targets whose second moments fit :data:`GRAM_BUDGET_BYTES` together (at least one each)."""
    chunk: list[Target] = []
    used = 0
    for target in targets:
        shape = target.weight.const_value.shape  # type: ignore[union-attr]
        inputs = int(np.prod([int(d) for d in shape])) // int(shape[target.weight_axis]) + 1
        size = 2 * 4 * inputs * inputs  # float32, the even and the odd samples' apart
        if chunk and used + size > GRAM_BUDGET_BYTES:
            yield chunk
            chunk, used = [], 0
        chunk.append(target)
        used += size
    if chunk:
        yield chunk

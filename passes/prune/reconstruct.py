"""Layer-wise reconstruction: refit pruned weights so each layer's outputs match the original's.

For a layer y = x W (+ b) whose weight was pruned to a mask, every output
column j is refit on its kept inputs by ridge regression against the
original layer's outputs on calibration activations (the original model is
the teacher):

    w_j = argmin ||X_k w - X W_j||^2 + lambda ||w - P_kj||^2  =  (G_kk + lambda I)^-1 ((G W_j)_k + lambda P_kj)

(P: the pruned weight)

with G = X^T X accumulated over the samples (with a column of ones when the
layer has a bias, so the bias is refit too). Only G is kept: memory is
K x K per layer whatever the number of samples. The inputs are the original
model's activations, so each layer is fitted independently (closed form,
numpy only). Unstructured masks are refit for MatMul and Gemm (transA=0),
shrunk toward the pruned weight and kept only where held-out samples say
it helps (refit_masked.py).

After channel pruning the layers downstream of the cuts are refit
*sequentially*, in graph order (refit_channels.py), on the inputs the
pruned model really computes (X_p, with the layers before already refit),
against the original layer's outputs on the original inputs (X_o W), shrunk
toward the pruned weight W_p (:func:`tuned_fit`)::

    W' = argmin ||X_p W' - X_o W||^2 + lambda ||W' - W_p||^2
       = (X_p^T X_p + lambda I)^-1 (X_p^T X_o W + lambda W_p)

Fitting each layer to the original activations alone made resnet50 worse
(logit error 0.57 -> 0.62 over 32 refit layers): each refit is exact only
for inputs the earlier pruned layers no longer produce, so the errors
compound. The cross-Gram X_p^T X_o lets each layer absorb the error
upstream of it (``cross_grams``). lambda is chosen per layer on held-out
samples: a fixed one (RELATIVE_DAMPING) overfits layers with more inputs
than calibration rows.
"""

from __future__ import annotations

__all__ = [
    "Grams",
    "ancestors",
    "conv_patches",
    "cross_grams",
    "damping",
    "fit_error",
    "gram_refusal",
    "independent_prefix",
    "input_gram",
    "input_gram_halves",
    "output_grams",
    "ridge_solve",
    "checked_fit",
    "fit_toward",
    "tuned_fit",
    "tuned_strength",
]

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from graphopt.runtime import stream_tensors

logger = logging.getLogger(__name__)

# A layer's Gram matrices (own and cross, both halves) may take this many bytes; beyond it the
# layer is not refit. Dense (K+1)^2 float64 grams and O(K^3) solves: alexnet's fc6 (9,217 inputs)
# took 7.4 GB and 247 s, zfnet512's (18,433) all 23 GB of the machine, vgg19's a MemoryError.
MAX_GRAM_BYTES = 1 << 30

# Ridge strength relative to the mean of G's diagonal: enough to keep nearly
# collinear inputs solvable, small enough not to shrink the weights visibly.
RELATIVE_DAMPING = 1e-2


def input_gram(
    model: ir.Model, nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None, dtype: type = np.float64
) -> dict[ir.Node, np.ndarray]:
    """``X^T X`` of each node's first input over all samples, by node, accumulated in ``dtype``.

    Rows are all leading dims for MatMul/Gemm, and input patches (im2col,
    at most ``MAX_PATCHES`` a sample, drawn with a fixed seed) for Conv.
    Rows get a trailing column of ones, so G[-1, -1] counts the rows and
    G[:-1, -1] sums the inputs (what a bias needs). Keyed by the node, not
    its name: names may be empty or repeated. float32 halves the time of
    the products (GPTQ's second moments, as GPTQ itself keeps them); the
    refits solve least squares with them and keep float64.
    """
    grams: dict[ir.Node, np.ndarray] = {}
    for _, node, rows in _input_rows(model, nodes, feeds, threads, dtype):
        grams[node] = grams.get(node, 0) + rows.T @ rows
    return grams


def input_gram_halves(model: ir.Model, nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None) -> dict[ir.Node, list[np.ndarray]]:
    """:func:`input_gram` over the even samples and over the odd ones, in one run (only the first with one sample)."""
    halves: dict[ir.Node, list[np.ndarray]] = {}
    for index, node, rows in _input_rows(model, nodes, feeds, threads, np.float64):
        parts = halves.setdefault(node, [])
        if len(parts) <= index % 2:
            parts.append(rows.T @ rows)
        else:
            parts[index % 2] = parts[index % 2] + rows.T @ rows
    return halves


def _input_rows(
    model: ir.Model, nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None, dtype: type
) -> Iterator[tuple[int, ir.Node, np.ndarray]]:
    """(sample index, node, rows of its first input with a ones column) over one run of the samples."""
    names = [node.inputs[0].name or "" for node in nodes if node.inputs[0] is not None]
    for index, tensors in enumerate(stream_tensors(model, names, feeds, threads=threads)):
        for node in nodes:
            array = tensors.get(node.inputs[0].name or "") if node.inputs[0] is not None else None
            if array is not None:
                yield index, node, _rows(node, array, dtype)


Grams = tuple[np.ndarray, np.ndarray]  # (X_p^T X_p, X_p^T X_o), or (H^T H, H^T Y)
RowPairs = Callable[[ir.Node, dict[str, np.ndarray], dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def cross_grams(
    student: ir.Model, teacher_tensors: Iterable[dict[str, np.ndarray]], nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None
) -> dict[ir.Node, list[Grams]]:
    """``(X_p^T X_p, X_p^T X_o)`` of each of ``student``'s ``nodes``, for even and odd samples apart.

    X_p is the node's first input as ``student`` computes it on ``feeds``; X_o
    is the same-named tensor in ``teacher_tensors`` (one dict per sample, in
    the same order). Both get a trailing column of ones (for the bias) and
    the same rows (patches for Conv, drawn with the same seed). The two
    halves let a refit be checked on samples it was not fitted to.
    """

    def rows(node: ir.Node, pruned: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        name = node.inputs[0].name or ""
        return _rows(node, pruned[name]), _rows(node, original[name])

    return _half_grams(student, teacher_tensors, nodes, feeds, threads, rows)


def output_grams(
    student: ir.Model, teacher_tensors: Iterable[dict[str, np.ndarray]], nodes: Sequence[ir.Node], feeds: Iterable[Feeds], threads: int | None
) -> dict[ir.Node, list[Grams]]:
    """``(H^T H, H^T Y)`` of each node, even and odd samples apart, for refitting a layer to a teacher's outputs.

    H is the node's first input as ``student`` computes it; Y is the
    teacher's tensor of the same name as the node's output (the layer the
    node stands in for). Rows are positions: all leading dims for MatMul and
    Gemm, N*H*W for a 1x1 stride-1 Conv, whose outputs line up with its
    inputs. H gets a trailing column of ones (for the bias).
    """

    def rows(node: ir.Node, student_tensors: dict[str, np.ndarray], teacher: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        inputs = _positions(student_tensors[node.inputs[0].name or ""], node)
        return np.hstack([inputs, np.ones((inputs.shape[0], 1))]), _positions(teacher[node.outputs[0].name or ""], node)

    return _half_grams(student, teacher_tensors, nodes, feeds, threads, rows)


def _half_grams(
    student: ir.Model,
    teacher_tensors: Iterable[dict[str, np.ndarray]],
    nodes: Sequence[ir.Node],
    feeds: Iterable[Feeds],
    threads: int | None,
    row_pairs: RowPairs,
) -> dict[ir.Node, list[Grams]]:
    """``(L^T L, L^T R)`` per node for the (L, R) rows ``row_pairs`` gives each sample, even and odd samples summed apart."""
    names = [node.inputs[0].name or "" for node in nodes]
    grams: dict[ir.Node, list[Grams]] = {}
    for index, (student_tensors, teacher) in enumerate(zip(stream_tensors(student, names, feeds, threads=threads), teacher_tensors)):
        for node in nodes:
            left, right = row_pairs(node, student_tensors, teacher)
            halves = grams.setdefault(node, [])
            pair = (left.T @ left, left.T @ right)
            if len(halves) <= index % 2:
                halves.append(pair)
            else:
                halves[index % 2] = (halves[index % 2][0] + pair[0], halves[index % 2][1] + pair[1])
    return grams


def gram_refusal(inputs: int, cross_inputs: int) -> str | None:
    """Why a layer with ``inputs`` rows in its grams (ones column included) is not refit, or None.

    ``cross_inputs``: the width of its cross Gram (0 when there is none).
    Checked before any Gram is built. Few calibration rows alone are no
    reason: resnet50's classifier, 4 rows a half for 2,049 inputs, took rel L2
    from 0.52 to 0.24, and the held-out check refuses refits that do not help.
    """
    need = 2 * 8 * inputs * (inputs + cross_inputs)  # float64, two halves
    if need > MAX_GRAM_BYTES:
        return f"its Gram matrices would need {need / 2**30:.1f} GiB (limit {MAX_GRAM_BYTES / 2**30:g} GiB)"
    return None


def _positions(array: np.ndarray, node: ir.Node) -> np.ndarray:
    """[positions, channels] in float64: channels are axis 1 of a Conv's NCHW tensors, the last axis otherwise."""
    array = np.asarray(array, np.float64)
    if node.op_type == "Conv":
        array = np.moveaxis(array, 1, -1)
    return array.reshape(-1, array.shape[-1])


def fit_error(grams: Grams, weight: np.ndarray, target: np.ndarray | None = None) -> float:
    """``||L A - R T||^2`` up to a term that does not depend on A.

    A (and T) carry a bias row when the grams' ones column is used; without
    ``target`` the grams' right side is the goal itself (output_grams).
    """
    own, cross = grams
    kp = weight.shape[0]
    right = cross[:kp] if target is None else cross[:kp, : target.shape[0]] @ target
    return float(np.sum(weight * (own[:kp, :kp] @ weight)) - 2 * np.sum(weight * right))


def checked_fit(
    halves: list[Grams], plain: np.ndarray, fit: Callable[[np.ndarray, np.ndarray], np.ndarray], target: np.ndarray | None = None
) -> np.ndarray | None:
    """``fit(own, cross)`` on all samples, or None when its fit on the even samples loses to ``plain`` on the odd ones.

    An underdetermined refit (few rows per input, as on resnet50's 7x7 stage)
    matches its calibration samples and drifts on any others; the held-out
    half catches it. ``plain`` and ``fit``'s result are in the layout
    :func:`fit_error` takes, with ``target`` as there.
    """
    if len(halves) == 2 and fit_error(halves[1], fit(*halves[0]), target) >= fit_error(halves[1], plain, target):
        return None
    own, cross = (sum(parts) for parts in zip(*halves))
    return fit(own, cross)


# Ridge strengths tried by tuned_fit, relative to the mean of the Gram diagonal.
# The top ones all but keep the plain weight; measured on resnet50 (8 samples), the
# held-out best ranged from 1e-2 (narrow layers, many rows) to 10 (1585 to 3169
# inputs, 196 rows a half), where the fixed 1e-2 fit was 2-3x worse than none.
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def tuned_fit(halves: list[Grams], plain: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Ridge refit on the even samples, shrunk toward ``plain``, its strength chosen on the odd ones; None when none beats ``plain``.

    For each relative strength r in RIDGE_GRID (lambda = r * mean diag(L^T L))::

        W(lambda) = argmin ||L W - R T||^2 + lambda ||W - plain||^2 = (L^T L + lambda I)^-1 (L^T R T + lambda plain)

    is fitted on the even half and scored on the odd one (:func:`fit_error`,
    same layouts), and the best is returned (:func:`tuned_strength`).
    Shrinking toward the plain (pruned) weight rather than toward 0 matters
    when the layer has more inputs than calibration rows: directions the
    samples do not reach keep their weights instead of losing them. The odd
    samples never enter a fit, so in a sequence of refits they stay held out
    for the later layers too (refit_channels.py). With one half only (one
    sample), r = RELATIVE_DAMPING is used unchecked.
    """
    relative = tuned_strength(halves, plain, target)
    return None if relative is None else fit_toward(halves[:1], plain, target, relative)


def tuned_strength(halves: list[Grams], plain: np.ndarray, target: np.ndarray) -> float | None:
    """The r in RIDGE_GRID whose :func:`tuned_fit` on the even half does best on the odd one; None when none beats ``plain``.

    RELATIVE_DAMPING with one half only. Once the choice is made on held-out
    samples, :func:`fit_toward` on both halves gives the final weight.
    """
    kp = plain.shape[0]
    plain = np.asarray(plain, np.float64)
    if len(halves) < 2:
        return RELATIVE_DAMPING
    (own0, right0), (own1, right1) = (_fit_parts(grams, kp, target) for grams in halves)
    if not np.any(np.diag(own0) > 0):  # no calibration input reaches the layer: nothing to fit
        return None

    def held_error(weight: np.ndarray) -> float:
        return float(np.sum(weight * (own1 @ weight)) - 2 * np.sum(weight * right1))

    errors = {r: held_error(_toward(own0, right0, plain, r)) for r in RIDGE_GRID}
    best = min(RIDGE_GRID, key=errors.__getitem__)  # the first of equals: deterministic
    # A gain below 1e-9 of the output's energy is rounding: plain pruning was already exact.
    if errors[best] >= held_error(plain) - 1e-9 * float(np.sum(plain * (own1 @ plain))):
        return None
    logger.debug("relative ridge %s chosen (held-out errors %s)", best, errors)
    return best


def fit_toward(halves: list[Grams], plain: np.ndarray, target: np.ndarray, relative: float) -> np.ndarray:
    """The ridge fit of :func:`tuned_fit` at strength ``relative`` on all ``halves`` together."""
    own, right = (sum(parts) for parts in zip(*(_fit_parts(grams, plain.shape[0], target) for grams in halves)))
    return _toward(own, right, np.asarray(plain, np.float64), relative)


def _fit_parts(grams: Grams, kp: int, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(L^T L, L^T R T)`` restricted to the ``kp`` kept inputs."""
    own, cross = grams
    return own[:kp, :kp], cross[:kp, : target.shape[0]] @ target


def _toward(own: np.ndarray, right: np.ndarray, plain: np.ndarray, relative: float) -> np.ndarray:
    """``(own + lambda I)^-1 (right + lambda plain)`` with lambda = :func:`damping` of own at ``relative``."""
    ridge = damping(own, relative)
    return np.linalg.solve(own + ridge * np.eye(own.shape[0]), right + ridge * plain)


def ridge_solve(own: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``(own + lambda I)^-1 right`` with lambda from :func:`damping`."""
    return np.linalg.solve(own + damping(own) * np.eye(own.shape[0]), right)


def damping(gram: np.ndarray, relative: float = RELATIVE_DAMPING) -> float:
    """``relative`` times the mean of the Gram matrix's diagonal, or 1 when that is 0.

    The diagonal is all 0 when the layer's inputs were 0 on every calibration
    sample (a dead branch, an If whose other side ran); the damped system
    is then still solvable, and its solution (all zeros) loses the held-out
    check, so the layer is left as it is.
    """
    scale = float(np.mean(np.diag(gram))) if gram.size else 0.0
    return relative * scale if scale > 0 else 1.0


def _rows(node: ir.Node, array: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    rows = conv_patches(node, array, dtype) if node.op_type == "Conv" else np.asarray(array, dtype).reshape(-1, array.shape[-1])
    return np.hstack([rows, np.ones((rows.shape[0], 1), dtype)])


MAX_PATCHES = 2048


def conv_patches(node: ir.Node, array: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Input patches of a 2-D Conv as rows [P, C*kh*kw] (C-major, like the weight), subsampled."""
    weight_shape = node.inputs[1].const_value.shape.numpy()  # type: ignore[union-attr]
    kh, kw = int(weight_shape[2]), int(weight_shape[3])
    strides = node.attributes.get_ints("strides", [1, 1])
    dilations = node.attributes.get_ints("dilations", [1, 1])
    pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
    x = np.pad(np.asarray(array, dtype), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]  # N, C, Ho, Wo, kh, kw
    positions = (windows.shape[0], windows.shape[2], windows.shape[3])
    if math.prod(positions) <= MAX_PATCHES:
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)
    # Draw the positions first and copy only their windows: all rows of a 3x3 conv over 64 channels at 1024x1024 take 4.8 GB.
    pick = np.random.default_rng(0).choice(math.prod(positions), MAX_PATCHES, replace=False)
    n, h, w = np.unravel_index(pick, positions)
    return windows[n, :, h, w].reshape(MAX_PATCHES, x.shape[1] * kh * kw)


def independent_prefix(pending: list[ir.Node]) -> list[ir.Node]:
    """The longest prefix of ``pending`` (in graph order) in which no node feeds another."""
    level: list[ir.Node] = []
    for node in pending:
        if any(earlier in ancestors(node) for earlier in level):
            break
        level.append(node)
    return level


def ancestors(node: ir.Node) -> set[ir.Node]:
    """Every node that ``node``'s inputs depend on."""
    seen: set[ir.Node] = set()
    stack = [value.producer() for value in node.inputs if value is not None]
    while stack:
        current = stack.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        stack.extend(value.producer() for value in current.inputs if value is not None)
    return seen

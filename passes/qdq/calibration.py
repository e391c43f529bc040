"""Activation calibration for ``qdq``: streaming statistics and clipping ranges.

Statistics come from one onnxruntime pass over the calibration feeds, with the
wanted intermediate tensors exposed as extra outputs; on large models they are
exposed a chunk at a time and the feeds are read once per chunk. Graph inputs
are read from the feeds themselves. Every chunk opens a session on the whole
model, so a fixed tensor count per chunk made calibration quadratic in the
graph (a 25k-node chain of small tensors: ~50 sessions). The first chunk holds
:data:`FIRST_CHUNK` tensors; the values it saw per sample then size the
others to hold about :data:`CHUNK_BYTES` per sample (never fewer tensors
than the first), so small tensors share one session and large ones stay
bounded as before.

The same pass can also keep per-channel means of chosen tensors
(``channel_axes``), for bias correction, so that it needs no run of its own.

Memory is bounded whatever the number of samples: each tensor keeps its
running min, max and counts, and a histogram with a fixed, even number of bins
over a symmetric range ``[-R, R]``. R starts at the first batch's max ``|x|``;
when a later batch goes beyond it, R doubles as often as needed. Doubling maps
every old bin wholly into one new bin (pairs of bins merge into the central
half), so re-binning is exact and needs no interpolation.

Clipping ranges (``choose_range``) are widened to contain 0, so that zero is
exactly representable, and to at least ``DEGENERATE_WIDTH`` (all-zero tensors):

- ``minmax``: the observed min and max.
- ``percentile`` p: the (100 - p)th and p-th percentiles of the values,
  interpolated inside their histogram bin and kept within [min, max].
- ``entropy``: TensorRT's KL-divergence threshold T on the histogram of
  ``|x|`` (folded around 0, exact zeros left out since they quantize exactly):
  P is the first i bins with the clipped mass added to the last one; Q
  quantizes those i bins (without the clipped mass, as TensorRT does) into
  ``levels // 2`` buckets, each spread evenly over its bins that are non-empty
  in P; T is the upper edge of the i minimizing KL(P||Q).
- ``mse``: the T, among 200 geometrically spaced candidates up to max ``|x|``,
  minimizing the expected squared error of clipping (exact per bin centre)
  plus rounding to ``levels`` uniform levels (step**2 / 12 per kept value).

Entropy and mse give ``(max(min, -T), min(max, T))``. Their resolution is the
histogram's: with outliers at 1000x the bulk, the bulk falls in a few of the
2048 bins, and entropy never keeps fewer than ``levels // 2`` bins of ``|x|``.
"""

from __future__ import annotations

__all__ = [
    "METHODS", "DEFAULT_BINS", "DEFAULT_PERCENTILE", "DEGENERATE_WIDTH", "TensorStatistics", "choose_range", "collect",
]

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.runtime import ModelRunner

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.999
# Width given to ranges narrower than this (all-zero or empty tensors), so
# that low < high and the scale is a positive, normal float32.
DEGENERATE_WIDTH = 1e-6
# Histogram radius when the first batch is all zeros; doubling grows it.
_TINY_RADIUS = 1e-30
_MSE_CANDIDATES = 200
# The smallest mse candidate, as a fraction of max |x|.
_MSE_LOWEST = 1e-3
# Elements per block of KL candidates (bounds the temporaries to a few MB).
_KL_BLOCK = 2**18

# Called as progress(done, total) after each run.
ProgressCallback = Callable[[int, int | None], None]


class TensorStatistics:
    """Running min, max, element count and a fixed-size histogram of one tensor's values.

    Attributes:
        bins: Number of histogram bins (even), fixed for the object's life.
        min, max: The extreme finite values seen (+inf and -inf before any).
        count: Finite values seen. nonfinite: NaN/Inf values seen and ignored.
        zeros: Values exactly 0 among ``count``.
        channel_axes: The axes along which :meth:`channel_means` can average (none by default).
    """

    def __init__(self, bins: int = DEFAULT_BINS, channel_axes: Collection[int] = ()) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.channel_axes = tuple(dict.fromkeys(channel_axes))
        self._channel_sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # axis -> finite sums, counts
        self._channels_differ: set[int] = set()  # axes whose channel count changed between arrays: no means
        self.count = 0
        self.nonfinite = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self._radius = 0.0  # 0 until the first finite value
        self._counts = np.zeros(bins, np.int64)

    @property
    def radius(self) -> float:
        """R: the histogram covers [-R, R] (0 before any finite value)."""
        return self._radius

    def update(self, array: np.ndarray) -> None:
        """Adds an array's finite values; NaN and Inf are only counted in :attr:`nonfinite`."""
        for axis in self.channel_axes:
            self._add_channel_sums(np.asarray(array), axis)
        values = np.asarray(array).ravel()
        if values.dtype != np.float64:
            values = values.astype(np.float64)  # exact bin indices for any input type
        finite = np.isfinite(values)
        if not finite.all():
            self.nonfinite += int(values.size - np.count_nonzero(finite))
            values = values[finite]
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.count += int(values.size)
        self.zeros += int(values.size - np.count_nonzero(values))
        self._fit(max(-low, high))
        scale = self.bins / (2 * self._radius)
        index = ((values + self._radius) * scale).astype(np.int64)
        np.minimum(index, self.bins - 1, out=index)  # x == R lands on the last edge
        self._counts += np.bincount(index, minlength=self.bins)

    def channel_means(self, axis: int) -> np.ndarray | None:
        """Mean of the finite values per channel along ``axis`` (one of ``channel_axes``), in float64.

        None for an axis not kept, for arrays of fewer than 2 dimensions,
        when arrays disagreed on the channel count, or when some channel
        held no finite value.
        """
        kept = self._channel_sums.get(axis)
        if kept is None or axis in self._channels_differ or not np.all(kept[1] > 0):
            return None
        return kept[0] / kept[1]

    def _add_channel_sums(self, array: np.ndarray, axis: int) -> None:
        if array.ndim < 2:
            self._channels_differ.add(axis)
            return
        channels = np.moveaxis(array.astype(np.float64, copy=False), axis, -1)
        flat = channels.reshape(-1, channels.shape[-1])
        finite = np.isfinite(flat)
        sums, counts = np.where(finite, flat, 0.0).sum(axis=0), finite.sum(axis=0)
        kept = self._channel_sums.get(axis)
        if kept is None:
            self._channel_sums[axis] = (sums, counts)
        elif kept[0].shape != sums.shape:
            self._channels_differ.add(axis)
        else:
            np.add(kept[0], sums, out=kept[0])
            np.add(kept[1], counts, out=kept[1])

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)``: ``bins`` counts (copied) and ``bins + 1`` edges over [-R, R]."""
        width = 2 * self._radius / self.bins
        edges = (np.arange(self.bins + 1) - self.bins // 2) * width
        return self._counts.copy(), edges

    def _fit(self, absmax: float) -> None:
        """Grows R by doubling until it covers ``absmax``, merging bins exactly."""
        if self._radius == 0.0:
            self._radius = absmax if absmax > 0 else _TINY_RADIUS
            return
        if absmax <= self._radius:
            return
        doublings = max(1, math.ceil(math.log2(absmax / self._radius)))
        while self._radius * 2.0**doublings < absmax:  # log2 rounding
            doublings += 1
        self._radius *= 2.0**doublings
        # Old bin j starts at half + (j - half) / f in new-bin units, f = 2**doublings,
        # a multiple of 1/f, so it lies inside new bin half + floor((j - half) / f).
        # f >= bins already sends every old bin to one of the two central bins.
        factor, half = min(2**doublings, self.bins), self.bins // 2
        target = half + np.floor_divide(np.arange(self.bins) - half, factor)
        self._counts = np.bincount(target, weights=self._counts, minlength=self.bins).astype(np.int64)


def choose_range(
    stats: TensorStatistics, method: str, *, percentile: float = DEFAULT_PERCENTILE, levels: int = 256
) -> tuple[float, float]:
    """Clipping range ``(low, high)`` for the tensor, with ``low <= 0 <= high`` and ``low < high``.

    Args:
        stats: The tensor's statistics.
        method: One of :data:`METHODS`.
        percentile: For ``percentile``: in (50, 100].
        levels: Quantization levels (256 for 8-bit, 128 with reduce_range); used by entropy and mse.

    Raises:
        ValueError: Unknown method, or percentile or levels out of range.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    if stats.count == 0:
        logger.debug("calibration: no finite values; using a degenerate range")
        return _contain_zero(0.0, 0.0)
    if method == "minmax":
        return _contain_zero(stats.min, stats.max)
    if method == "percentile":
        return _contain_zero(*_percentile_range(stats, percentile))
    threshold = _entropy_threshold(stats, levels) if method == "entropy" else _mse_threshold(stats, levels)
    return _contain_zero(max(stats.min, -threshold), min(stats.max, threshold))


def _contain_zero(low: float, high: float) -> tuple[float, float]:
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low < DEGENERATE_WIDTH:
        high = low + DEGENERATE_WIDTH  # low > -DEGENERATE_WIDTH here, so 0 stays inside
    return low, high


def _percentile_range(stats: TensorStatistics, percentile: float) -> tuple[float, float]:
    if percentile == 100:
        return stats.min, stats.max
    counts, edges = stats.histogram()
    cumulative = np.cumsum(counts)
    bounds = []
    for fraction in ((100 - percentile) / 100, percentile / 100):
        target = fraction * cumulative[-1]
        i = int(np.searchsorted(cumulative, target))  # first bin reaching the target
        before = cumulative[i] - counts[i]
        inside = (target - before) / counts[i] if counts[i] else 0.0
        bounds.append(float(edges[i] + inside * (edges[i + 1] - edges[i])))
    return max(bounds[0], stats.min), min(bounds[1], stats.max)


def _folded(stats: TensorStatistics) -> tuple[np.ndarray, float]:
    """Counts of ``|x|`` in ``bins // 2`` bins of width ``2R / bins`` starting at 0, and that width."""
    counts, _ = stats.histogram()
    half = stats.bins // 2
    folded = counts[half:] + counts[:half][::-1]
    # Exact zeros (half of a ReLU output) quantize exactly; left in, their spike
    # in bin 0 dominates KL and drives the threshold down to the fewest bins.
    folded[0] -= stats.zeros
    return folded, 2 * stats.radius / stats.bins


def _entropy_threshold(stats: TensorStatistics, levels: int) -> float:
    hist, width = _folded(stats)
    buckets = levels // 2
    if not hist.any():  # only exact zeros
        return 0.0
    if hist.size <= buckets:  # too few bins to clip anything
        return max(-stats.min, stats.max)
    candidates = np.arange(buckets, hist.size + 1)
    rows = max(1, _KL_BLOCK // hist.size)
    divergence = np.concatenate(
        [_kl_divergences(hist, candidates[start : start + rows], buckets) for start in range(0, candidates.size, rows)]
    )
    return float(candidates[int(np.argmin(divergence))] * width)


def _kl_divergences(hist: np.ndarray, kept: np.ndarray, buckets: int) -> np.ndarray:
    """KL(P||Q) for each candidate number of kept bins (TensorRT's entropy calibration), vectorized.

    Row r keeps ``kept[r]`` bins; columns past it are masked out.
    """
    n = hist.size
    kept = kept[:, None]
    column = np.arange(n)[None, :]
    inside = column < kept
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    nonzero_cumulative = np.concatenate([[0], np.cumsum(hist > 0)])
    outliers = cumulative[-1] - cumulative[kept]
    # Bucket b covers bins [b*m, (b+1)*m); the last one also takes the remainder.
    merged = kept // buckets
    bucket = np.minimum(column // merged, buckets - 1)
    start = bucket * merged
    stop = np.where(bucket == buckets - 1, kept, start + merged)
    p = np.where(inside, hist[None, :], 0) + np.where(column == kept - 1, outliers, 0)
    support = p > 0
    # Bins empty in the slice but holding the outliers still count in the last bucket's spread.
    gained = (bucket == buckets - 1) & (hist[kept - 1] == 0) & (outliers > 0)
    spread = nonzero_cumulative[stop] - nonzero_cumulative[start] + gained
    q = np.where(support, (cumulative[stop] - cumulative[start]) / np.maximum(spread, 1), 0.0)
    p_norm = p / cumulative[-1]
    q_total = q.sum(axis=1, keepdims=True)
    q_norm = q / np.where(q_total > 0, q_total, 1.0)
    # A kept bin Q leaves empty (all its bucket's mass clipped) gets a tiny Q: a large, finite penalty.
    q_norm = np.where(support & (q_norm <= 0), 1e-12, q_norm)
    ratio = np.where(support, p_norm / np.where(support, q_norm, 1.0), 1.0)
    return np.sum(p_norm * np.log(ratio), axis=1)


def _mse_threshold(stats: TensorStatistics, levels: int) -> float:
    counts, edges = stats.histogram()
    used = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[used][None, :]
    weights = counts[used][None, :]
    absmax = max(-stats.min, stats.max)
    if absmax == 0:
        return 0.0
    width = edges[1] - edges[0]
    lowest = min(max(absmax * _MSE_LOWEST, width), absmax)
    thresholds = np.geomspace(lowest, absmax, _MSE_CANDIDATES)[:, None]
    low = np.minimum(np.maximum(stats.min, -thresholds), 0.0)
    high = np.maximum(np.minimum(stats.max, thresholds), 0.0)
    step = (high - low) / (levels - 1)
    clipped = np.clip(centres, low, high)
    error = np.where(clipped == centres, step**2 / 12, (centres - clipped) ** 2)
    return float(thresholds[int(np.argmin((error * weights).sum(axis=1))), 0])


FIRST_CHUNK = 256  # tensors exposed in the first session, whose sizes set the rest
CHUNK_BYTES = 256 << 20  # exposed bytes per sample a later session may hold


def collect(
    model: ir.Model,
    names: Sequence[str],
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    *,
    bins: int = DEFAULT_BINS,
    chunk_size: int | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    channel_axes: Mapping[str, Collection[int]] | None = None,
) -> dict[str, TensorStatistics]:
    """Statistics of the named main-graph tensors (node outputs or graph inputs) over every sample.

    Args:
        model: The model; never modified (the runner restores its outputs).
        names: Tensors to observe; duplicates are observed once.
        channel_axes: Tensors whose per-channel means to keep, with their
            channel axes (:meth:`TensorStatistics.channel_means`); they are
            observed too, and returned with the others.
        feeds: Returns a fresh iterable of feed dicts; called once per chunk.
        bins: Histogram bins per tensor.
        chunk_size: Node outputs exposed per onnxruntime session; None
            sizes chunks by bytes (see the module docstring).
        provider, threads: For :class:`graphopt.runtime.ModelRunner`.
        progress: Called as ``progress(done, total)`` after each run; total
            is None until the number of samples is known (from the
            iterable's length hint, else after the first chunk).

    Raises:
        ValueError: A name is neither a graph input nor a main-graph node output, or chunk_size < 1.
        DataError: No samples, a feed lacks an observed graph input, or
            ``feeds()`` gives a different number of samples per chunk.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    axes = dict(channel_axes or {})
    wanted = list(dict.fromkeys([*names, *axes]))
    graph_inputs = {value.name for value in model.graph.inputs}
    produced = {value.name for node in model.graph for value in node.outputs if value.name}
    unknown = [name for name in wanted if name not in graph_inputs and name not in produced]
    if unknown:
        raise ValueError(
            f"cannot calibrate {', '.join(map(repr, unknown))}: not a graph input or an output of a main-graph node"
        )
    stats = {name: TensorStatistics(bins, axes.get(name, ())) for name in wanted}
    exposed = [name for name in wanted if name not in graph_inputs]
    first = chunk_size or FIRST_CHUNK
    chunks = [exposed[i : i + first] for i in range(0, len(exposed), first)] or [[]]
    from_feeds = [name for name in wanted if name in graph_inputs]
    samples: int | None = None
    index = 0
    while index < len(chunks):
        if index == 1 and chunk_size is None and samples:
            chunks = chunks[:1] + _sized_chunks([name for later in chunks[1:] for name in later], chunks[0], stats, samples)
        chunk = chunks[index]
        iterable = feeds()
        per_chunk = samples if samples is not None else operator.length_hint(iterable, 0) or None
        total = None if per_chunk is None else per_chunk * len(chunks)
        observe = from_feeds if index == 0 else []
        done = index * (samples or 0)
        seen = _collect_chunk(model, chunk, observe, iterable, stats, provider, threads, progress, done, total)
        if samples is not None and seen != samples:
            raise DataError(f"calibration feeds gave {samples} samples, then {seen}: feeds() must repeat them")
        samples = seen
        index += 1
    if not samples:
        raise DataError("calibration feeds gave no samples")
    logger.debug("calibrated %d tensors on %d samples in %d chunk(s)", len(wanted), samples, len(chunks))
    return stats


def _sized_chunks(names: list[str], measured: list[str], stats: dict[str, TensorStatistics], samples: int) -> list[list[str]]:
    """``names`` in chunks of about CHUNK_BYTES per sample, judged by the values ``measured`` tensors held per sample."""
    seen = sum(stats[name].count + stats[name].nonfinite for name in measured)
    per_tensor = max(4.0 * seen / (samples * max(len(measured), 1)), 1.0)  # float32 bytes per tensor per sample
    size = max(len(measured), int(CHUNK_BYTES / per_tensor))
    return [names[i : i + size] for i in range(0, len(names), size)]


def _collect_chunk(
    model: ir.Model,
    chunk: list[str],
    from_feeds: list[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    stats: dict[str, TensorStatistics],
    provider: str,
    threads: int | None,
    progress: ProgressCallback | None,
    done: int,
    total: int | None,
) -> int:
    """Observes ``chunk`` (node outputs) and ``from_feeds`` (graph inputs) over the samples; returns how many."""
    runner = ModelRunner(model, provider, extra_outputs=chunk, threads=threads) if chunk else None
    seen = 0
    with runner if runner is not None else contextlib.nullcontext():
        for feed in samples:
            for name in from_feeds:
                if name not in feed:
                    has = ", ".join(map(repr, feed))
                    raise DataError(f"a calibration feed lacks graph input {name!r} (it has {has})")
                stats[name].update(feed[name])
            if runner is not None:
                # Only the session's inputs: feeds may carry more (labels, other models' inputs).
                needed = {name: feed[name] for name in runner.input_names if name in feed}
                for name, value in runner.run(needed, outputs=chunk).items():
                    stats[name].update(value)
            seen += 1
            if progress is not None:
                progress(done + seen, total)
    return seen

"""Calibration for qdq: streaming statistics, clipping ranges, and collection through onnxruntime."""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import pytest
from helpers import parse

from graphopt.errors import DataError
from passes.qdq import calibration
from passes.qdq.calibration import (
    DEFAULT_BINS,
    DEGENERATE_WIDTH,
    METHODS,
    TensorStatistics,
    choose_range,
    collect,
)


def _stats(*batches: np.ndarray, bins: int = DEFAULT_BINS) -> TensorStatistics:
    stats = TensorStatistics(bins)
    for batch in batches:
        stats.update(batch)
    return stats


def _bin_width(stats: TensorStatistics) -> float:
    return 2 * stats.radius / stats.bins


def _quantization_mse(x: np.ndarray, low: float, high: float, levels: int = 256) -> float:
    step = (high - low) / (levels - 1)
    q = np.clip(np.round((x - low) / step), 0, levels - 1) * step + low
    return float(np.mean((q - x) ** 2))


def _gaussian_with_outliers(seed: int = 0, n: int = 1_000_000, outliers: int = 2, at: float = 40.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    x[:outliers] = at * np.where(np.arange(outliers) % 2, -1.0, 1.0)
    return x


def _assert_valid_range(low: float, high: float) -> None:
    assert np.isfinite(low) and np.isfinite(high)
    assert low <= 0.0 <= high and low < high


# --- TensorStatistics ---------------------------------------------------------


def test_streaming_matches_one_batch_when_split_into_growing_batches():
    rng = np.random.default_rng(1)
    # Each batch is wider than the last, so the range doubles several times.
    batches = [rng.standard_normal(5000) * scale for scale in (0.1, 0.5, 3.0, 40.0)]
    whole = np.concatenate(batches)
    streamed = _stats(*batches, bins=256)
    assert streamed.min == whole.min() and streamed.max == whole.max()
    assert streamed.count == whole.size and streamed.nonfinite == 0
    counts, edges = streamed.histogram()
    assert counts.sum() == whole.size
    assert edges[0] == -streamed.radius and edges[-1] == streamed.radius
    assert streamed.radius >= np.abs(whole).max()
    # Re-binned counts are those of binning everything on the final edges;
    # a value exactly on an edge may land one bin off, so compare cumulatively.
    expected, _ = np.histogram(whole, edges)
    assert np.abs(np.cumsum(counts) - np.cumsum(expected)).max() <= 2


def test_rebinning_is_exact_when_range_doubles():
    stats = TensorStatistics(bins=8)
    # R = 1 from the first batch: -1 and one value at the centre of each bin.
    first = np.r_[-1.0, np.linspace(-1, 1, 9)[:-1] + 0.125]
    stats.update(first)
    assert stats.radius == 1.0
    stats.update(np.array([2.5]))  # needs R = 4: two doublings, four bins merged into one
    counts, edges = stats.histogram()
    np.testing.assert_array_equal(edges, np.linspace(-4, 4, 9))
    np.testing.assert_array_equal(counts, np.histogram(np.append(first, 2.5), edges)[0])
    np.testing.assert_array_equal(counts, [0, 0, 0, 5, 4, 0, 1, 0])


def test_range_grows_from_tiny_when_first_batch_is_all_zeros():
    stats = _stats(np.zeros(100), np.array([-2.0, 0.5, 2.0]), bins=64)
    counts, edges = stats.histogram()
    assert counts.sum() == 103 and stats.zeros == 100
    assert 2.0 <= stats.radius < 4.0
    assert counts[31] + counts[32] == 100  # 0.5 lies beyond the central bins
    np.testing.assert_array_equal(counts, np.histogram(np.r_[np.zeros(100), -2.0, 0.5, 2.0], edges)[0])


def test_nonfinite_values_are_ignored_and_counted():
    x = np.array([1.0, np.nan, -3.0, np.inf, -np.inf, 0.5], np.float32)
    stats = _stats(x)
    assert (stats.count, stats.nonfinite) == (3, 3)
    assert (stats.min, stats.max) == (-3.0, 1.0)
    assert stats.histogram()[0].sum() == 3
    assert choose_range(stats, "minmax") == (-3.0, 1.0)


def test_integer_and_half_arrays_are_observed_as_floats():
    stats = _stats(np.array([[-4, 7]], np.int64), np.array([1.5], np.float16), np.array([True]))
    assert (stats.min, stats.max, stats.count) == (-4.0, 7.0, 4)


def test_memory_stays_bounded_when_updated_many_times():
    rng = np.random.default_rng(2)
    stats = _stats(rng.standard_normal(1000))

    def footprint() -> int:
        return sum(v.nbytes for v in vars(stats).values() if isinstance(v, np.ndarray))

    after_one = footprint()
    for i in range(49):
        stats.update(rng.standard_normal(1000) * (i + 1))  # growth and re-binning included
    assert footprint() == after_one and stats.histogram()[0].size == DEFAULT_BINS
    assert stats.count == 50_000


@pytest.mark.parametrize("bins", [0, 3, 7])
def test_bad_bin_count_raises_when_not_even_and_positive(bins):
    with pytest.raises(ValueError, match="even"):
        TensorStatistics(bins)


# --- choose_range -------------------------------------------------------------


def test_minmax_is_the_true_range_widened_to_contain_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 0.5, 10_000)
    stats = _stats(x)
    assert choose_range(stats, "minmax") == (0.0, x.max())
    y = rng.normal(0.0, 1.0, 10_000)
    assert choose_range(_stats(y), "minmax") == (y.min(), y.max())


def test_percentile_100_equals_minmax():
    x = np.random.default_rng(4).standard_normal(10_000)
    stats = _stats(x)
    assert choose_range(stats, "percentile", percentile=100) == choose_range(stats, "minmax")


def test_percentile_99_clips_at_the_sample_quantiles_within_a_bin():
    x = np.random.default_rng(5).standard_normal(200_000)
    stats = _stats(*np.array_split(x, 7))
    low, high = choose_range(stats, "percentile", percentile=99)
    width = _bin_width(stats)
    assert abs(low - np.percentile(x, 1)) <= width
    assert abs(high - np.percentile(x, 99)) <= width
    assert 2.2 < high < 2.45  # the normal 99th percentile is 2.326


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_long_tailed_data_is_clipped_between_bulk_and_outliers(method):
    x = _gaussian_with_outliers()
    low, high = choose_range(_stats(x), method)
    assert -20 < low < -2 and 2 < high < 20, (low, high)


def test_mse_range_has_lower_quantization_error_than_minmax_when_outliers_dominate():
    for x in (_gaussian_with_outliers(seed=6), np.random.default_rng(7).standard_t(2, 200_000)):
        stats = _stats(x)
        mse = _quantization_mse(x, *choose_range(stats, "mse"))
        minmax = _quantization_mse(x, *choose_range(stats, "minmax"))
        assert mse < 0.8 * minmax, (mse, minmax)


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_uniform_data_keeps_almost_its_whole_range(method):
    x = np.random.default_rng(8).uniform(-1, 1, 200_000)
    low, high = choose_range(_stats(x), method)
    assert low < -0.95 and high > 0.95


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_relu_output_keeps_its_tail_when_half_the_values_are_zero(method):
    x = np.maximum(np.random.default_rng(9).standard_normal(500_000), 0)
    low, high = choose_range(_stats(x), method)
    assert low == 0.0 and 3.0 < high <= x.max()
    assert _quantization_mse(x, low, high) <= 1.1 * _quantization_mse(x, 0.0, x.max())


def _reference_kl_threshold(hist: np.ndarray, buckets: int) -> int:
    """TensorRT's entropy calibration, written as a plain loop (MXNet's layout, no smoothing)."""
    best, best_i = np.inf, -1
    for i in range(buckets, hist.size + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        merged = i // buckets
        q = np.zeros(i)
        for b in range(buckets):
            start, stop = b * merged, (i if b == buckets - 1 else (b + 1) * merged)
            nonzero = p[start:stop] != 0
            if nonzero.any():
                q[start:stop][nonzero] = sliced[start:stop].sum() / nonzero.sum()
        p, q = p / p.sum(), q / q.sum()
        support = p > 0
        kl = np.sum(p[support] * np.log(p[support] / np.maximum(q[support], 1e-12)))
        if kl < best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("seed", [10, 11])
def test_entropy_threshold_matches_a_plain_loop_implementation(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.laplace(size=50_000), rng.normal(0, 5, 20)])
    stats = _stats(x, bins=512)
    counts, _ = stats.histogram()
    hist = counts[256:] + counts[:256][::-1]
    hist[0] -= stats.zeros
    expected = _reference_kl_threshold(hist, 32) * _bin_width(stats)
    low, high = choose_range(stats, "entropy", levels=64)
    assert high == pytest.approx(min(expected, x.max()), rel=1e-12)
    assert low == pytest.approx(max(-expected, x.min()), rel=1e-12)


def test_entropy_takes_well_under_a_second_with_default_bins():
    stats = _stats(_gaussian_with_outliers(n=100_000))
    start = time.perf_counter()
    choose_range(stats, "entropy")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_tensor_gets_a_tiny_valid_range(method):
    low, high = choose_range(_stats(np.zeros((4, 4), np.float32)), method)
    _assert_valid_range(low, high)
    assert high - low == pytest.approx(DEGENERATE_WIDTH)


@pytest.mark.parametrize("method", METHODS)
def test_tensor_without_finite_values_gets_a_tiny_valid_range(method):
    stats = _stats(np.array([np.nan, np.inf]), np.zeros(0))
    assert stats.count == 0 and stats.nonfinite == 2
    _assert_valid_range(*choose_range(stats, method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("levels", [128, 256])
def test_ranges_contain_zero_when_data_is_one_sided(method, levels):
    x = np.random.default_rng(12).uniform(-3.0, -1.0, 10_000)
    low, high = choose_range(_stats(x), method, levels=levels)
    _assert_valid_range(low, high)
    assert high == 0.0 and x.min() <= low < -1.0


def test_bad_method_or_percentile_raises_with_the_valid_values():
    stats = _stats(np.ones(3))
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        choose_range(stats, "kl")
    with pytest.raises(ValueError, match="percentile"):
        choose_range(stats, "percentile", percentile=120)


# --- collect ------------------------------------------------------------------

# x -> Add(x, x) -> a -> Relu -> r -> Neg -> z; every op is exact in float32.
_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
calib (float[2, 16] x) => (float[2, 16] z) {
    a = Add(x, x)
    r = Relu(a)
    z = Neg(r)
}
"""


def _feeds(count: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(13)
    return [{"x": (rng.standard_normal((2, 16)) * (i + 1)).astype(np.float32)} for i in range(count)]


def _assert_same_statistics(got: TensorStatistics, want: TensorStatistics) -> None:
    for attribute in ("min", "max", "count", "zeros", "nonfinite", "radius"):
        assert getattr(got, attribute) == getattr(want, attribute), attribute
    np.testing.assert_array_equal(got.histogram()[0], want.histogram()[0])


def test_collect_matches_numpy_for_intermediate_tensor_and_graph_input():
    model = parse(_MODEL)
    feeds = _feeds()
    before = ir.to_proto(model).SerializeToString()
    calls: list[tuple[int, int | None]] = []
    stats = collect(model, ["a", "x", "r"], lambda: iter(feeds), bins=128, progress=lambda d, t: calls.append((d, t)))
    assert list(stats) == ["a", "x", "r"]
    for name, compute in {"x": lambda x: x, "a": lambda x: x + x, "r": lambda x: np.maximum(x + x, 0)}.items():
        _assert_same_statistics(stats[name], _stats(*(compute(f["x"]) for f in feeds), bins=128))
    assert stats["r"].min == 0.0 and stats["r"].count == 5 * 32
    assert ir.to_proto(model).SerializeToString() == before
    assert [done for done, _ in calls] == [1, 2, 3, 4, 5]


def test_collect_gives_the_same_statistics_when_chunked():
    model = parse(_MODEL)
    feeds = _feeds()
    whole = collect(model, ["a", "r", "z", "x"], lambda: feeds)
    calls: list[tuple[int, int | None]] = []
    chunked = collect(
        model, ["a", "r", "z", "x"], lambda: feeds, chunk_size=1, progress=lambda d, t: calls.append((d, t))
    )
    for name in whole:
        _assert_same_statistics(chunked[name], whole[name])
    # Three chunks over five samples; a list's length is known up front.
    assert calls == [(i, 15) for i in range(1, 16)]


def test_collect_of_graph_inputs_only_needs_no_session():
    feeds = _feeds(3)
    stats = collect(parse(_MODEL), ["x"], lambda: iter(feeds))
    _assert_same_statistics(stats["x"], _stats(*(f["x"] for f in feeds)))


def test_collect_ignores_feed_entries_the_model_does_not_take():
    feeds = [{**f, "label": np.zeros(2, np.int64)} for f in _feeds(2)]
    assert collect(parse(_MODEL), ["r"], lambda: feeds)["r"].count == 64


def test_collect_raises_naming_unknown_tensors():
    with pytest.raises(ValueError, match="'nope'.*'missing'"):
        collect(parse(_MODEL), ["a", "nope", "missing"], lambda: _feeds())


def test_collect_raises_when_feeds_are_empty_or_change_between_chunks():
    model = parse(_MODEL)
    with pytest.raises(DataError, match="no samples"):
        collect(model, ["a"], lambda: [])
    sizes = iter([3, 2])
    with pytest.raises(DataError, match="3 samples, then 2"):
        collect(model, ["a", "r"], lambda: _feeds(next(sizes)), chunk_size=1)


def test_channel_means_average_finite_values_per_channel_over_every_sample():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((2, 3, 4, 4)) for _ in range(3)]
    batches[1][0, 2, 1, 1] = np.nan
    stats = TensorStatistics(bins=8, channel_axes=[1, -1])
    for batch in batches:
        stats.update(batch)
    channels = np.moveaxis(np.stack(batches), 2, -1).reshape(-1, 3)

    np.testing.assert_allclose(stats.channel_means(1), np.nanmean(channels, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.channel_means(-1), np.nanmean(np.stack(batches).reshape(-1, 4), axis=0), rtol=1e-12)
    assert stats.channel_means(2) is None  # not kept
    assert stats.nonfinite == 1 and stats.count == channels.size - 1


@pytest.mark.parametrize(
    "batches",
    [[np.ones(4)], [np.ones((2, 3)), np.ones((2, 4))], [np.array([[1.0, np.nan], [2.0, np.inf]])]],
    ids=["one-dimensional", "channel-count-changes", "a-channel-never-finite"],
)
def test_channel_means_are_none_when_a_channel_has_no_honest_mean(batches):
    stats = TensorStatistics(bins=8, channel_axes=[-1])
    for batch in batches:
        stats.update(batch)
    assert stats.channel_means(-1) is None


def test_collect_keeps_channel_means_in_the_same_pass(monkeypatch):
    model, feeds = parse(_MODEL), _feeds()
    exposed: list[int] = []
    monkeypatch.setattr(calibration, "ModelRunner", _CountingRunner(calibration.ModelRunner, exposed))

    stats = collect(model, ["a"], lambda: feeds, channel_axes={"r": [-1], "x": [0]})

    assert exposed == [2]  # one session: "a" and "r" exposed together; "x" read from the feeds
    relu = np.concatenate([np.maximum(f["x"] + f["x"], 0) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(stats["r"].channel_means(-1), relu.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["x"].channel_means(0), np.stack([f["x"] for f in feeds]).astype(np.float64).mean(axis=(0, 2)), rtol=1e-12)
    assert stats["a"].channel_means(-1) is None and stats["a"].channel_axes == ()


def _chain(length: int, width: int = 8) -> ir.Model:
    """x [2, width] -> Neg -> Neg -> ... (``length`` nodes, outputs t0 .. t{length-1})."""
    lines = [f"t{i} = Neg({'x' if i == 0 else f't{i - 1}'})" for i in range(length)]
    return parse(
        f'<ir_version: 8, opset_import: ["" : 17]> g (float[2,{width}] x) => (float[2,{width}] t{length - 1}) {{'
        + "\n".join(lines) + "}"
    )


class _CountingRunner:
    """Wraps calibration's ModelRunner, recording how many tensors each session exposes."""

    def __init__(self, real, exposed: list[int]):
        self._real, self._exposed = real, exposed

    def __call__(self, model, *args, extra_outputs=(), **kwargs):
        self._exposed.append(len(extra_outputs))
        return self._real(model, *args, extra_outputs=extra_outputs, **kwargs)


def test_small_tensors_share_sessions_beyond_the_first_chunk(monkeypatch):
    # A fixed 256 tensors per session made calibration quadratic: each session is opened on the whole model.
    model, feeds = _chain(700), [{"x": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)} for i in range(3)]
    names = [f"t{i}" for i in range(700)]
    fixed = collect(model, names, lambda: feeds, chunk_size=256)
    exposed: list[int] = []
    monkeypatch.setattr(calibration, "ModelRunner", _CountingRunner(calibration.ModelRunner, exposed))

    sized = collect(model, names, lambda: feeds)

    assert exposed == [256, 444]  # was [256, 256, 188]
    for name in names:
        _assert_same_statistics(sized[name], fixed[name])


def test_large_tensors_stay_within_the_byte_budget_per_session(monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_CHUNK", 2)
    monkeypatch.setattr(calibration, "CHUNK_BYTES", 3 * 2 * 64 * 4)  # three [2, 64] float tensors per sample
    model, feeds = _chain(10, width=64), [{"x": np.ones((2, 64), np.float32)}]
    exposed: list[int] = []
    monkeypatch.setattr(calibration, "ModelRunner", _CountingRunner(calibration.ModelRunner, exposed))

    stats = collect(model, [f"t{i}" for i in range(10)], lambda: feeds)

    assert exposed == [2, 3, 3, 2] and all(stats[f"t{i}"].count == 128 for i in range(10))

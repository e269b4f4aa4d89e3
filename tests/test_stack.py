"""Tests for imgproc.stack: grouping, strip sizing and NaN-aware combining."""

from __future__ import annotations

import threading
import time
import warnings

import bottleneck as bn
import numpy as np
import pytest
from astropy.io import fits

from imgproc.plan import stack_groups
from imgproc.stack import (
    MEMORY,
    PER_PIXEL_BYTES,
    WORKING_BYTES_PER_ELEMENT,
    ArraySource,
    FitsSource,
    FrameSource,
    WorkingMemory,
    combine,
    nanmedian_last,
    row_bytes,
    strip_rows,
)


class CountingSource:
    """FrameSource spy: records every row block read."""

    def __init__(self, data: np.ndarray) -> None:
        self._inner = ArraySource(data)
        self.reads: list[tuple[int, int]] = []

    @property
    def shape(self) -> tuple[int, int]:
        return self._inner.shape

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        self.reads.append((r0, r1))
        return self._inner.read_rows(r0, r1)


def _frames(n: int, shape=(24, 32), seed: int = 0, nan_fraction: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = [(1000.0 + rng.normal(0.0, 10.0, shape)).astype(np.float32) for _ in range(n)]
    if nan_fraction:
        for frame in frames:
            frame[rng.random(shape) < nan_fraction] = np.nan
    return frames


def _reference_sigclip(cube: np.ndarray, low: float, high: float, iters: int, width: str, weights=None):
    """Straightforward float64 sigma-clipped mean along axis 0 (astropy semantics), weighted by
    ``weights`` (one per frame) when given."""
    data = cube.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(iters):
            centre = np.nanmedian(data, axis=0)
            if width == "std":
                spread = np.nanstd(data, axis=0)
            else:
                spread = 1.482602218505602 * np.nanmedian(np.abs(data - centre), axis=0)
            reject = (data < centre - low * spread) | (data > centre + high * spread)
            if not reject.any():
                break
            data[reject] = np.nan
        if weights is None:
            return np.nanmean(data, axis=0)
        w = np.asarray(weights, np.float64)[:, None, None]
        return np.nansum(data * w, axis=0) / np.sum(np.where(np.isnan(data), 0.0, w), axis=0)


@pytest.mark.parametrize(
    ("n_frames", "threshold", "sizes"),
    [
        (10, 10, [1] * 10),  # n == threshold: every frame alone
        (11, 10, [1] * 11),  # n = threshold + 1: k = round(1.1) = 1
        (24, 10, [2] * 12),  # n = 2.4 x threshold: k = 2
        (26, 10, [3] * 8 + [2]),  # n = 2.6 x threshold: k = 3, last group smaller
        (25, 10, [2] * 12 + [1]),  # round(2.5) == 2 (round half to even)
        (35, 10, [4] * 8 + [3]),  # round(3.5) == 4
        (150, 40, [4] * 37 + [2]),
        (3, 10, [1] * 3),
        (0, 10, []),
    ],
)
def test_stack_groups_sizes_follow_seed_rule(n_frames, threshold, sizes):
    groups = stack_groups(n_frames, threshold)
    assert [len(g) for g in groups] == sizes
    # consecutive, in order, each frame exactly once
    assert [i for g in groups for i in g] == list(range(n_frames))


def test_stack_groups_rejects_nonpositive_threshold():
    with pytest.raises(ValueError, match="threshold"):
        stack_groups(5, 0)


def test_combine_sigclip_removes_cosmic_ray():
    frames = _frames(15, seed=1)
    frames[6][5, 7] += 10000.0
    result = combine([ArraySource(f) for f in frames])
    others = np.array([f[5, 7] for i, f in enumerate(frames) if i != 6], np.float64)
    np.testing.assert_array_max_ulp(result[5, 7], np.float32(others.mean()), maxulp=1)
    # elsewhere nothing this far out: the result stays within the noise of the plain mean
    clean = np.mean(np.stack(frames).astype(np.float64), axis=0)
    mask = np.ones(result.shape, bool)
    mask[5, 7] = False
    assert np.abs(result[mask] - clean[mask]).max() < 10.0


def test_combine_sigclip_matches_reference_implementation():
    frames = _frames(12, seed=2, nan_fraction=0.05)
    rng = np.random.default_rng(3)
    for frame in frames[:4]:  # sprinkle outliers of both signs
        idx = rng.integers(0, frame.size, 40)
        frame.ravel()[idx] += rng.choice([-1.0, 1.0], 40) * rng.uniform(50, 5000, 40)
    cube = np.stack(frames)
    for width in ("std", "mad"):
        for iters in (1, 3):
            result = combine(
                [ArraySource(f) for f in frames],
                sigma_low=2.5,
                sigma_high=3.0,
                max_iters=iters,
                width=width,
            )
            expected = _reference_sigclip(cube, 2.5, 3.0, iters, width)
            np.testing.assert_allclose(result, expected, rtol=1e-6, atol=0)
            assert result.dtype == np.float32


def test_combine_std_width_needs_enough_frames_mad_does_not():
    values = np.array([100.0, 101.0, 99.0, 100.5, 5000.0], np.float32)
    frames = [np.full((2, 3), v, np.float32) for v in values]
    with_std = combine([ArraySource(f) for f in frames], width="std")
    with_mad = combine([ArraySource(f) for f in frames], width="mad")
    # one outlier among 5 is at most (5-1)/sqrt(5) = 1.79 std from the median: kept
    np.testing.assert_allclose(with_std, values.astype(np.float64).mean(), rtol=1e-6)
    np.testing.assert_allclose(with_mad, values[:4].astype(np.float64).mean(), rtol=1e-6)


@pytest.mark.parametrize("method", ["sigclip", "median", "mean"])
def test_combine_ignores_nan_inputs(method):
    frames = _frames(12, seed=4)
    frames[3][2, 2] = np.nan
    for frame in frames:
        frame[0, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = combine([ArraySource(f) for f in frames], method=method)
    others = np.array([f[2, 2] for i, f in enumerate(frames) if i != 3], np.float64)
    expected = np.median(others) if method == "median" else others.mean()
    assert result[2, 2] == pytest.approx(expected, rel=1e-6)
    assert np.isnan(result[0, 1])
    assert np.isnan(result).sum() == 1


def test_combine_median_and_mean_match_numpy():
    frames = _frames(9, seed=5, nan_fraction=0.1)
    frames[0][:] = np.where(np.isnan(frames[0]), np.nan, frames[0] + 300.0)
    cube = np.stack(frames).astype(np.float64)
    sources = [ArraySource(f) for f in frames]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_median = np.nanmedian(cube, axis=0)
        expected_mean = np.nanmean(cube, axis=0)
    np.testing.assert_allclose(combine(sources, method="median"), expected_median, rtol=1e-6)
    np.testing.assert_allclose(combine(sources, method="mean"), expected_mean, rtol=1e-6)


def test_combine_mean_is_exact_to_float32_for_large_offsets():
    rng = np.random.default_rng(6)
    frames = [(60000.0 + rng.normal(0, 5, (4, 5))).astype(np.float32) for _ in range(150)]
    result = combine([ArraySource(f) for f in frames], method="mean")
    expected = np.mean(np.stack(frames).astype(np.float64), axis=0).astype(np.float32)
    np.testing.assert_array_max_ulp(result, expected, maxulp=1)


@pytest.mark.parametrize("n_frames", [1, 3, 150])
@pytest.mark.parametrize("shape", [(100, 64), (4000, 6000)])
@pytest.mark.parametrize("budget", [10_000, 1_000_000, 2 * 1024**3])
def test_strip_rows_respects_budget(n_frames, shape, budget):
    rows = strip_rows(n_frames, shape, budget)
    per_row = shape[1] * (n_frames * WORKING_BYTES_PER_ELEMENT + PER_PIXEL_BYTES)
    assert 1 <= rows <= shape[0]
    if rows > 1:
        assert rows * per_row <= budget
    if rows < shape[0]:
        assert (rows + 1) * per_row > budget  # as many rows as fit


def test_strip_rows_counts_working_set_of_all_frames():
    # 150 frames x 6000 columns x 12 bytes + 32 per pixel = ~10.99 MB per row
    assert strip_rows(150, (4000, 6000), 2 * 1024**3) == 195
    assert strip_rows(150, (4000, 6000), 1) == 1


def test_combine_small_budget_reads_many_strips_with_identical_result():
    frames = _frames(11, shape=(37, 20), seed=7, nan_fraction=0.02)
    frames[2][30, 4] += 5000.0
    big = [CountingSource(f) for f in frames]
    small = [CountingSource(f) for f in frames]
    budget = 5 * 20 * (11 * WORKING_BYTES_PER_ELEMENT + PER_PIXEL_BYTES)  # exactly 5 rows
    assert strip_rows(11, (37, 20), budget) == 5

    whole = combine(big)
    stripped = combine(small, memory_budget=budget)

    np.testing.assert_array_equal(stripped, whole)
    assert all(src.reads == [(0, 37)] for src in big)
    expected_reads = [(r0, min(r0 + 5, 37)) for r0 in range(0, 37, 5)]
    assert all(src.reads == expected_reads for src in small)
    assert len(expected_reads) == 8


def test_combine_rejects_mismatched_shapes_and_unknown_method():
    a, b = np.zeros((4, 5), np.float32), np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="shape"):
        combine([ArraySource(a), ArraySource(b)])
    with pytest.raises(ValueError, match="method"):
        combine([ArraySource(a)], method="max")
    with pytest.raises(ValueError, match="no frames"):
        combine([])


def test_array_source_is_a_frame_source():
    source = ArraySource(np.arange(12, dtype=np.int16).reshape(3, 4))
    assert isinstance(source, FrameSource)
    rows = source.read_rows(1, 3)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, [[4, 5, 6, 7], [8, 9, 10, 11]])


def test_fits_source_reads_requested_rows(tmp_path):
    data = np.random.default_rng(8).normal(500.0, 20.0, (50, 30)).astype(np.float32)
    path = tmp_path / "frame.fits"
    fits.PrimaryHDU(data).writeto(path)
    source = FitsSource(path)
    assert isinstance(source, FrameSource)
    assert source.shape == (50, 30)
    rows = source.read_rows(17, 29)
    assert rows.dtype == np.float32 and rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, data[17:29])
    np.testing.assert_array_equal(source.read_rows(49, 50), data[49:50])


def test_fits_source_reads_extension_scaled_and_compressed_hdus(tmp_path):
    rng = np.random.default_rng(9)
    counts = rng.integers(0, 65535, (40, 25)).astype(np.uint16)  # stored as int16 + BZERO
    floats = rng.normal(0.0, 1.0, (40, 25)).astype(np.float32)
    fits.PrimaryHDU(counts).writeto(tmp_path / "u16.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(floats, name="SCI")]).writeto(tmp_path / "ext.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(counts)]).writeto(tmp_path / "comp.fits")

    np.testing.assert_array_equal(FitsSource(tmp_path / "u16.fits").read_rows(5, 12), counts[5:12])
    np.testing.assert_array_equal(FitsSource(tmp_path / "ext.fits", "SCI").read_rows(30, 40), floats[30:40])
    np.testing.assert_array_equal(FitsSource(tmp_path / "comp.fits", 1).read_rows(0, 3), counts[:3])


def test_fits_source_blank_integers_become_nan(tmp_path):
    raw = np.arange(20, dtype=np.int16).reshape(4, 5)
    raw[2, 3] = -32768
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BLANK"] = -32768
    hdu.writeto(tmp_path / "blank.fits")
    rows = FitsSource(tmp_path / "blank.fits").read_rows(1, 4)
    assert np.isnan(rows[1, 3])
    assert np.isfinite(rows).sum() == 14


def test_fits_source_rejects_non_image(tmp_path):
    fits.PrimaryHDU(np.zeros((2, 3, 4), np.float32)).writeto(tmp_path / "cube.fits")
    with pytest.raises(ValueError, match="2-D"):
        FitsSource(tmp_path / "cube.fits")


def test_combine_fits_sources_in_strips_equals_in_memory(tmp_path):
    frames = _frames(5, shape=(30, 16), seed=10, nan_fraction=0.05)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"f{i}.fits")
        fits.PrimaryHDU(frame).writeto(paths[-1])
    budget = 4 * 16 * (5 * WORKING_BYTES_PER_ELEMENT + PER_PIXEL_BYTES)
    from_files = combine([FitsSource(p) for p in paths], method="median", memory_budget=budget)
    in_memory = combine([ArraySource(f) for f in frames], method="median")
    np.testing.assert_array_equal(from_files, in_memory)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 11, 40])
def test_nanmedian_last_equals_bottleneck_bit_for_bit(n):
    rng = np.random.default_rng(n)
    cube = rng.normal(100.0, 5.0, (9, 13, n)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.15] = np.nan
    cube[0, 0] = np.nan  # a pixel without any value
    expected = bn.nanmedian(cube, axis=-1)
    np.testing.assert_array_equal(nanmedian_last(cube.copy()), expected)


def test_combine_on_threads_equals_one_thread_and_reads_every_row_once():
    frames = _frames(11, shape=(57, 20), seed=3, nan_fraction=0.03)
    frames[4][40, 7] += 5000.0
    one = combine([ArraySource(f) for f in frames])
    sources = [CountingSource(f) for f in frames]
    many = combine(sources, threads=3)
    np.testing.assert_array_equal(many, one)
    for src in sources:  # strips of ceil(57 / 6) = 10 rows, each read once
        assert sorted(src.reads) == [(r0, min(r0 + 10, 57)) for r0 in range(0, 57, 10)]


@pytest.mark.parametrize("threads", [1, 3])
def test_combine_into_a_sink_gives_the_strips_in_order_and_the_same_bits(threads: int) -> None:
    """A 61-MP stack goes to its file strip by strip: the strips, in row order, are the bits
    of the whole result, on any threads, and nothing is returned."""
    frames = _frames(9, shape=(83, 31), seed=5, nan_fraction=0.02)
    whole = combine([ArraySource(f) for f in frames], memory_budget=40_000)
    strips: list[np.ndarray] = []
    assert (
        combine([ArraySource(f) for f in frames], memory_budget=40_000, threads=threads, sink=strips.append)
        is None
    )
    assert len(strips) > 3 and all(s.shape[1] == 31 for s in strips)
    np.testing.assert_array_equal(np.concatenate(strips), whole)


def _peak_of_eight_strips(memory: WorkingMemory, size: int, budget: int) -> int:
    """Largest memory in use while 8 threads each reserve ``size`` of ``budget`` for a while."""
    peak, lock = [0], threading.Lock()

    def strip() -> None:
        with memory.reserve(size, budget=budget):
            with lock:
                peak[0] = max(peak[0], memory.in_use)
            time.sleep(0.01)

    threads = [threading.Thread(target=strip) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.in_use == 0
    return peak[0]


def test_working_memory_holds_concurrent_strips_within_the_budget():
    memory = WorkingMemory()
    assert _peak_of_eight_strips(memory, 40, 100) == 80  # two strips of 40 fit in 100, never three
    with memory.reserve(500, budget=100):  # one strip larger than the budget still runs
        assert memory.in_use == 500


def test_a_worker_process_keeps_to_its_share_of_the_budget(monkeypatch) -> None:
    memory = WorkingMemory(share=0.5)
    assert memory.budget(100) == 50
    assert _peak_of_eight_strips(memory, 20, 100) == 40  # two strips of 20 in its 50, never three
    # combine sizes its strips from the share too: 10 rows at the whole budget, 5 at half
    frames = _frames(11, shape=(57, 20), seed=5)
    budget = 10 * row_bytes(11, 20)
    whole = [CountingSource(f) for f in frames]
    combine(whole, memory_budget=budget)
    monkeypatch.setattr(MEMORY, "share", 0.5)
    half = [CountingSource(f) for f in frames]
    combine(half, memory_budget=budget)
    assert whole[0].reads[:2] == [(0, 10), (10, 20)] and half[0].reads[:2] == [(0, 5), (5, 10)]


def test_winsorized_clipping_rejects_an_outlier_among_few_frames():
    rng = np.random.default_rng(4)
    frames = [(100.0 + rng.normal(0.0, 1.0, (23, 31))).astype(np.float32) for _ in range(6)]
    frames[2][5, 7] = 400.0  # a cosmic ray: with 6 frames the plain width cannot reject it
    sources = [ArraySource(f) for f in frames]
    clean = np.mean([f for i, f in enumerate(frames) if i != 2], axis=0)[5, 7]
    assert combine(sources, method="sigclip")[5, 7] > 140.0
    winsorized = combine(sources, method="winsorized")
    assert winsorized[5, 7] == pytest.approx(clean, abs=1e-4)
    # elsewhere the noise is that of a mean of about 6 frames (few values rejected)
    rest = winsorized[10:, 10:]
    assert abs(float(rest.mean()) - 100.0) < 0.05 and float(rest.std()) < 1.15 / np.sqrt(6)


def test_offsets_normalise_a_brightening_sky_before_rejection():
    rng = np.random.default_rng(5)
    star = np.zeros((41, 53), np.float32)
    star[20, 26] = 50.0
    skies = [100.0, 130.0, 160.0, 190.0, 220.0, 250.0, 280.0, 310.0, 340.0, 370.0, 400.0, 430.0]
    frames = [(s + star + rng.normal(0.0, 1.0, star.shape)).astype(np.float32) for s in skies]
    frames[4][30, :] += 40.0  # a satellite trail
    sources = [ArraySource(f) for f in frames]
    offsets = [100.0 - s for s in skies]
    normalised = combine(sources, offsets=offsets)
    assert abs(float(np.mean(normalised[:25])) - 100.0) < 0.05
    assert normalised[20, 26] == pytest.approx(150.0, abs=1.0)
    # the trail is rejected once the skies agree; against the sky's trend it is not
    assert abs(float(np.mean(normalised[30])) - 100.0) < 0.3
    plain = combine(sources)
    assert float(np.mean(plain[30] - plain[29])) == pytest.approx(40.0 / 12, abs=0.5)
    with pytest.raises(ValueError, match="offsets"):
        combine(sources, offsets=offsets[:3])


def test_weighted_combine_matches_a_weighted_reference_in_any_strips():
    frames = _frames(12, seed=7, nan_fraction=0.05)
    rng = np.random.default_rng(8)
    for frame in frames[:4]:
        idx = rng.integers(0, frame.size, 40)
        frame.ravel()[idx] += rng.choice([-1.0, 1.0], 40) * rng.uniform(50, 5000, 40)
    frames[11] = frames[11] + np.float32(30.0)  # a frame off by much: its weight shows
    weights = rng.uniform(0.2, 3.0, 12)
    sources = [ArraySource(f) for f in frames]
    cube = np.stack(frames)
    for width, iters in (("std", 1), ("mad", 3)):
        result = combine(
            sources, sigma_low=2.5, sigma_high=3.0, max_iters=iters, width=width, weights=weights
        )
        expected = _reference_sigclip(cube, 2.5, 3.0, iters, width, weights)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=0)
        assert result.dtype == np.float32
    whole = combine(sources, weights=weights)
    strips = combine(sources, weights=weights, memory_budget=3 * row_bytes(12, 32), threads=2)
    np.testing.assert_array_equal(whole, strips)
    mean = combine(sources, method="mean", weights=weights)
    np.testing.assert_allclose(mean, _reference_sigclip(cube, np.inf, np.inf, 1, "std", weights), rtol=1e-6)
    # equal weights: the plain mean, to a float32 rounding; None: the plain mean itself
    np.testing.assert_allclose(combine(sources, weights=[2.0] * 12), combine(sources), rtol=1e-6)
    np.testing.assert_array_equal(combine(sources, weights=None), combine(sources))
    with pytest.raises(ValueError, match="median"):
        combine(sources, method="median", weights=weights)
    with pytest.raises(ValueError, match="12 positive numbers"):
        combine(sources, weights=[1.0] * 11 + [0.0])

"""Every array routine on any 2-D frame geometry: odd, prime, portrait, non-square, binned with
remainders (issue 17).  Property-based over moderate random shapes, then real sensor sizes:
the small ones through the imgproc command, the large ones at the function level."""

from __future__ import annotations

import math
import re
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import master_flags, reference_light, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgproc import report
from imgproc import stars as stars_module
from imgproc.align import KERNELS, MosaicRegistrar, Registrar, Shift, _taper, apply_shift
from imgproc.binning import bin_image, binned_shape
from imgproc.cli import EXIT_OK
from imgproc.fitsio import Float32Rows
from imgproc.report import block_mean, stretch, thumbnail_of
from imgproc.stack import ArraySource, combine
from imgproc.stages import frame_statistics
from imgproc.stars import background as _background
from imgproc.stars import despike as _despike
from imgproc.stars import find_stars as _find_stars
from imgproc.stars import fwhm_estimate, local_maxima
from imgproc.synth import NightSpec, make_night, random_stars, star_field

PRIMES = (17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 61, 67, 71, 79, 89, 97, 101, 113, 127, 131, 151, 173, 197)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sides(low: int = 16, high: int = 200) -> st.SearchStrategy[int]:
    """A frame side: a prime, an odd or any length in ``low..high``."""
    return st.one_of(
        st.sampled_from([p for p in PRIMES if low <= p <= high]),
        st.integers(low, high).map(lambda n: n | 1 if n < high else n),
        st.integers(low, high),
    )


def shapes(low: int = 16, high: int = 200) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(sides(low, high), sides(low, high))


def noisy_field(
    shape: tuple[int, int],
    stars: np.ndarray,
    rng: np.random.Generator,
    *,
    shift: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
) -> np.ndarray:
    """A star field (FWHM 3 px) on a sky of 100 with noise 3 (float32)."""
    frame = rng.standard_normal(shape, dtype=np.float32)
    frame *= np.float32(3.0)
    frame += np.float32(100.0)
    frame += star_field(shape, stars, fwhm=3.0, shift=shift, rotate180=flip)
    return frame


def mosaic(frame: np.ndarray, levels: tuple[float, float, float, float] = (700, 810, 805, 90)) -> np.ndarray:
    """A colour sensor's raw frame: each 2x2 site of the pattern on its own level (the Seestar's
    GRBG sites sit at about 700-810, the INDI ASI224's blue at 96)."""
    out = frame.copy()
    for (y, x), level in zip(((0, 0), (0, 1), (1, 0), (1, 1)), levels, strict=True):
        out[y::2, x::2] += np.float32(level)
    return out


@pytest.mark.parametrize(("shape", "flip"), [((192, 108), False), ((97, 130), True), ((130, 97), False)])
def test_mosaic_registrar_measures_colour_frames_on_superpixels(shape, flip) -> None:
    rng = np.random.default_rng(7)
    stars = random_stars(shape, shape[0] * shape[1] // 250, rng, flux_range=(1e3, 1e4), margin=6)
    reference = mosaic(noisy_field(shape, stars, rng))
    frame = mosaic(noisy_field(shape, stars, rng, shift=(-3.4, 5.3), flip=flip))
    plain = Registrar(reference)
    wrong = plain.measure(frame, try_flip=True)  # on the raw mosaic the pattern outweighs the stars
    assert not (plain.accepts(wrong) and abs(wrong.dy - 3.4) < 0.5 and abs(wrong.dx + 5.3) < 0.5)
    registrar = MosaicRegistrar(reference)
    shift = registrar.measure(frame, try_flip=True)
    assert registrar.accepts(shift) and shift.flipped is flip and registrar.shape == shape
    # star_field's shift moves the frame's content; the registrar undoes it
    assert abs(shift.dy - 3.4) < 0.15 and abs(shift.dx + 5.3) < 0.15


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return struct.unpack(">II", png[16:24])


# -- registration -------------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes(64, 240), seed=st.integers(0, 2**16), flip=st.booleans(),
       frac=st.tuples(st.floats(-4.0, 4.0), st.floats(-4.0, 4.0)))  # fmt: skip
def test_registrar_recovers_a_subpixel_shift_on_any_shape(
    shape: tuple[int, int], seed: int, flip: bool, frac: tuple[float, float]
) -> None:
    rng = np.random.default_rng(seed)
    stars = random_stars(shape, max(20, shape[0] * shape[1] // 300), rng, flux_range=(3e3, 3e4), margin=4)
    reference = noisy_field(shape, stars, rng)
    frame = noisy_field(shape, stars, rng, shift=frac, flip=flip)
    registrar = Registrar(reference)
    shift = registrar.measure(frame, try_flip=True)
    assert registrar.factor == 1
    assert shift.flipped is flip
    # the frame shows the sky moved by frac (after the rotation): the shift moves it back
    assert shift.dy == pytest.approx(-frac[0], abs=0.1) and shift.dx == pytest.approx(-frac[1], abs=0.1)


@pytest.mark.parametrize("shape", [(16, 16), (17, 23), (23, 17), (16, 97), (97, 16)])
def test_registrar_runs_on_the_smallest_frames(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    frame = rng.normal(100.0, 3.0, shape).astype(np.float32)
    frame[shape[0] // 2, shape[1] // 2] += 300.0
    shift = Registrar(frame).measure(frame, try_flip=True)
    assert (shift.dy, shift.dx, shift.flipped) == (0.0, 0.0, False)


def test_registrar_binned_stage_on_odd_sides() -> None:
    """Both sides >= 2048, odd and prime: the 2x2 binned integer stage and the flip, whose
    binning is off by the remainder row and column."""
    rng = np.random.default_rng(7)
    shape = (2053, 2049)
    stars = random_stars(shape, 300, rng)
    reference = noisy_field(shape, stars, rng)
    registrar = Registrar(reference)
    assert registrar.factor == 2
    for flip, move in ((False, (13.3, -21.7)), (True, (-5.55, 8.2))):
        shift = registrar.measure(noisy_field(shape, stars, rng, shift=move, flip=flip), try_flip=True)
        assert shift.flipped is flip
        assert shift.dy == pytest.approx(-move[0], abs=0.1) and shift.dx == pytest.approx(-move[1], abs=0.1)


# -- preparation ----------------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes(16, 400), tilt=st.tuples(st.floats(-0.05, 0.05), st.floats(-0.05, 0.05)),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_background_follows_a_gradient_on_any_shape(
    shape: tuple[int, int], tilt: tuple[float, float], seed: int
) -> None:
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = (200.0 + tilt[0] * yy + tilt[1] * xx).astype(np.float32)
    frame = sky + np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)
    background = _background(frame, 64)
    assert background.shape == shape and background.dtype == np.float32
    # a side of fewer than two 64 px cells has one cell: flat along it; more cells follow the
    # plane exactly but for the noise of medians of >= 16 values and the subsample's centre
    # being up to 2 px off the cell's
    slack = [abs(t) * (n / 2 if n < 128 else 2.0) for t, n in zip(tilt, shape, strict=True)]
    assert np.abs(background - sky).max() < 1.0 + sum(slack)


@SETTINGS
@given(shape=shapes(16, 300), seed=st.integers(0, 2**16))
def test_despike_flattens_hot_pixels_anywhere(shape: tuple[int, int], seed: int) -> None:
    ny, nx = shape
    rng = np.random.default_rng(seed)
    star = star_field(shape, np.array([[ny / 4, 3 * nx / 4, 2000.0]]), fwhm=3.0)
    # noise below despike's 5 sigma: a 5-sigma noise pixel (1 in 3.5 million) would rightly go
    data = star + np.clip(rng.normal(0.0, 1.0, shape), -4.5, 4.5).astype(np.float32)
    hot = [(0, 0), (0, nx - 1), (ny - 1, 0), (ny - 1, nx - 1), (ny // 2, nx // 2 - 3)]
    for y, x in hot:
        data[y, x] = 1000.0
    padded = np.pad(data, 1)  # zero (background) border
    before = data.copy()
    _despike(data, 1.0)
    for y, x in hot:  # set to the second brightest of its 8 neighbours
        around = np.delete(padded[y : y + 3, x : x + 3].ravel(), 4)
        assert data[y, x] == np.sort(around)[-2]
    others = np.ones(shape, bool)
    others[tuple(np.array(hot).T)] = False
    np.testing.assert_array_equal(data[others], before[others])  # the star and the noise stay


@pytest.mark.parametrize("n", [*range(1, 20), 64, 97])
def test_taper_on_tiny_and_odd_sides(n: int) -> None:
    ramp = _taper(n, 16)
    assert ramp.shape == (n,) and np.all(ramp > 0) and np.all(ramp <= 1)
    np.testing.assert_array_equal(ramp, ramp[::-1])


# -- resampling ----------------------------------------------------------------------------------


#: Shifts that are whole or clearly fractional: within 1e-3 px of a whole number, whether the
#: resampler copies or interpolates is a tolerance, not a property (hypothesis found dx=1e-6).
def _whole(p: np.ndarray) -> np.ndarray:
    return np.abs(p - np.rint(p)) < 1e-6


SHIFTS = st.floats(-6.0, 6.0).filter(lambda v: v == round(v) or abs(v - round(v)) > 1e-3)


@SETTINGS
@given(shape=shapes(16, 200), dy=SHIFTS, dx=SHIFTS, flip=st.booleans(), kernel=st.sampled_from(list(KERNELS)))
def test_apply_shift_moves_a_plane_on_any_shape(
    shape: tuple[int, int], dy: float, dx: float, flip: bool, kernel: str
) -> None:
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    plane = 50.0 + 0.5 * yy - 0.25 * xx
    source = plane[::-1, ::-1] if flip else plane
    out = apply_shift(source.astype(np.float32), Shift(dy, dx, flip, 1.0), kernel=kernel)
    assert out.shape == shape and out.dtype == np.float32
    # out[y, x] samples the (rotated) frame at (y - dy, x - dx): its footprint, rows fy - below
    # to fy + above, inside the frame (integer shifts: a copy; an axis with a whole shift is
    # copied too, except by OpenCV, whose zero-weight taps still see the NaN outside)
    py, px = yy - dy, xx - dx
    below, above = {"bilinear": (0, 1), "spline": (1, 2), "cubic": (1, 2), "lanczos4": (3, 4)}[kernel]
    opencv = kernel == "lanczos4" and not (_whole(py).all() and _whole(px).all())
    cubic = kernel == "cubic" and not (_whole(py).all() and _whole(px).all())

    def inside(p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the footprint is inside for certain, and where it may be. OpenCV places its
        samples on a 1/32 px grid of the source (rounded by Lanczos-4, truncated by bicubic),
        and its taps (Lanczos -3..+4, bicubic -1..+2) are -4..+3 (-2..+1) of a turned frame's
        at whole positions. OpenCV's bicubic frame is masked by the exact positions: its whole
        footprint, -1..+2 of the source's pixel."""
        if cubic:
            f = np.floor((n - 1 - p if flip else p) + 1e-6)
            ok = (f >= 1) & (f + 2 <= n - 1)
            return ok, ok
        if not opencv:
            f, whole = np.floor(p + 1e-6), _whole(p)
            ok = np.where(
                whole, (np.rint(p) >= 0) & (np.rint(p) <= n - 1), (f >= below) & (f + above <= n - 1)
            )
            return ok, ok
        source = n - 1 - p if flip else p
        placed = [np.round(32 * source) / 32, np.floor(32 * source + 1e-6) / 32]
        variants = []
        for q in placed:
            q = n - 1 - q if flip else q
            f, whole = np.floor(q + 1e-6), _whole(q)
            low, high = np.where(flip & whole, above, below), np.where(flip & whole, below, above)
            variants.append((f >= low) & (f + high <= n - 1))
        return variants[0] & variants[1], variants[0] | variants[1]

    (sure_y, may_y), (sure_x, may_x) = inside(py[:, 0], ny), inside(px[0], nx)
    finite = np.isfinite(out)
    assert not finite[~may_y].any() and not finite[:, ~may_x].any()
    assert finite[np.ix_(sure_y, sure_x)].all()
    expected = 50.0 + 0.5 * py - 0.25 * px
    inner = finite & (py > 4) & (py < ny - 5) & (px > 4) & (px < nx - 5)
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3 if kernel == "bilinear" else 0.05)


# -- binning -------------------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes(16, 300), factor=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_binning_drops_the_remainder_rows_and_columns(shape: tuple[int, int], factor: int, seed: int) -> None:
    ny, nx = shape
    data = np.random.default_rng(seed).normal(100.0, 10.0, shape).astype(np.float32)
    binned = bin_image(data, factor)
    by, bx = ny // factor, nx // factor
    assert binned.shape == binned_shape(shape, factor) == (by, bx) and binned.dtype == np.float32
    blocks = data[: by * factor, : bx * factor].astype(np.float64).reshape(by, factor, bx, factor)
    np.testing.assert_allclose(binned, blocks.mean(axis=(1, 3)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (17, 17)])
def test_binning_larger_than_a_side_is_refused(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="cannot be binned"):
        bin_image(np.zeros(shape, np.float32), 18)


# -- combine -------------------------------------------------------------------------------------


@SETTINGS
@given(rows=sides(1, 60), cols=st.integers(0, 50).map(lambda n: 2 * n + 1), n_frames=st.integers(1, 7),
       method=st.sampled_from(["median", "mean"]), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_combine_of_odd_widths_equals_numpy(
    rows: int, cols: int, n_frames: int, method: str, threads: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.normal(100.0, 10.0, (n_frames, rows, cols)).astype(np.float32)
    frames[rng.random(frames.shape) < 0.05] = np.nan
    budget = 3 * cols * (n_frames * 8 + 32)  # a few rows per strip: strips end anywhere
    result = combine([ArraySource(f) for f in frames], method=method, memory_budget=budget, threads=threads)
    with warnings.catch_warnings():  # all-NaN pixels
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = (np.nanmedian if method == "median" else np.nanmean)(frames.astype(np.float64), axis=0)
    assert result.shape == (rows, cols)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-4, equal_nan=True)


# -- thumbnails and statistics -------------------------------------------------------------------


@SETTINGS
@given(shape=shapes(16, 400), max_side=st.sampled_from([64, 128, 256]), seed=st.integers(0, 2**16))
def test_thumbnail_keeps_the_aspect_on_any_shape(shape: tuple[int, int], max_side: int, seed: int) -> None:
    ny, nx = shape
    rng = np.random.default_rng(seed)
    stars = random_stars(shape, max(5, ny * nx // 2000), rng, flux_range=(5e3, 5e4), margin=min(shape) // 4)
    data = noisy_field(shape, stars, rng)
    small, counts, factor = block_mean(data, max_side)
    assert factor == max(1, math.ceil(max(ny, nx) / max_side))  # the smallest that fits
    assert small.shape == (math.ceil(ny / factor), math.ceil(nx / factor))
    assert max(small.shape) <= max_side and counts.sum() == ny * nx
    # partial edge blocks are means of what they hold
    assert small[-1, -1] == pytest.approx(
        float(data[(small.shape[0] - 1) * factor :, (small.shape[1] - 1) * factor :].mean()), rel=1e-5
    )
    # the aspect is kept to within one thumbnail pixel a side
    assert abs(small.shape[1] * factor - nx) < factor and abs(small.shape[0] * factor - ny) < factor
    indices, _ = stretch(small)
    assert indices.shape == small.shape and indices.dtype == np.uint8
    thumb = thumbnail_of(data, fits.Header(), max_side)
    assert png_size(thumb["png"]) == (thumb["width"], thumb["height"]) == (small.shape[1], small.shape[0])
    assert thumb["shape"] == shape and thumb["nan_fraction"] == 0.0


@SETTINGS
@given(shape=shapes(16, 400), max_side=st.sampled_from([16, 64, 128]), seed=st.integers(0, 2**16))
def test_thumbnail_in_strips_is_the_thumbnail_of_the_whole_frame(
    shape: tuple[int, int], max_side: int, seed: int
) -> None:
    """block_mean takes a frame a strip of whole blocks at a time: with strips of one or three
    block rows (a NaN block, a NaN pixel and an inf among them, a big-endian memory-mapped
    file's byte order, the last strip shorter), it gives the same bits as in one strip."""
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 10.0, shape).astype(">f4")
    data[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.nan
    data[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.inf
    data[: min(4, shape[0]), : min(4, shape[1])] = np.nan
    whole = block_mean(data.astype(np.float32), max_side)
    factor = whole[2]
    for block_rows in (1, 3):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(report, "STRIP_BYTES", 4 * whole[0].shape[1] * factor**2 * block_rows)
            strips = block_mean(data, max_side)
        assert strips[2] == factor
        assert np.array_equal(strips[0], whole[0], equal_nan=True) and np.array_equal(strips[1], whole[1])


@SETTINGS
@given(shape=shapes(16, 300), seed=st.integers(0, 2**16))
def test_local_maxima_find_peaks_at_every_edge(shape: tuple[int, int], seed: int) -> None:
    ny, nx = shape
    image = np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)
    corners = {(0, 0), (0, nx - 1), (ny - 1, 0), (ny - 1, nx - 1)}
    for y, x in corners:
        image[y, x] = 10.0
    found = {(y, x) for _, y, x in local_maxima(image, 5.0)}
    assert found == corners


@SETTINGS
@given(shape=shapes(48, 300), factor=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_fwhm_estimate_on_any_shape(shape: tuple[int, int], factor: int, seed: int) -> None:
    ny, nx = shape
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.array([0.3, 0.7]) * ny, np.array([0.3, 0.7]) * nx)  # 19 px apart or more
    stars = np.column_stack([ys.ravel(), xs.ravel(), rng.uniform(2e4, 5e4, 4)])
    stars[:, :2] += rng.uniform(-0.5, 0.5, (4, 2))
    data = star_field(shape, stars, fwhm=3.0) + np.float32(100.0)
    small = block_mean(data, max(ny, nx) // factor)[0]
    peaks = local_maxima(small - 100.0, 20.0)
    assert fwhm_estimate(data, peaks, block_mean(data, max(ny, nx) // factor)[2]) == pytest.approx(
        3.0, rel=0.15
    )


@SETTINGS
@given(shape=shapes(16, 400), seed=st.integers(0, 2**16))
def test_frame_statistics_on_any_shape(shape: tuple[int, int], seed: int) -> None:
    data = np.random.default_rng(seed).normal(250.0, 8.0, shape).astype(np.float32)
    stats = frame_statistics(data)
    assert stats["sky"] == pytest.approx(250.0, abs=2.0)
    assert stats["noise"] == pytest.approx(8.0, rel=0.25)


# -- real sensor sizes ---------------------------------------------------------------------------

#: (width, height) of real sensors small enough for a whole night through the command
SMALL_SENSORS = [(650, 500), (765, 510), (1304, 976), (1080, 1920), (1530, 1020)]
#: and the large ones, at the function level
LARGE_SENSORS = [
    (3326, 2504),
    (3008, 3008),
    pytest.param((6248, 4176), marks=pytest.mark.e2e),
    pytest.param((5496, 3672), marks=pytest.mark.e2e),
    pytest.param((9576, 6388), marks=pytest.mark.e2e),
]


@pytest.fixture(scope="module", params=SMALL_SENSORS, ids=lambda size: f"{size[0]}x{size[1]}")
def sensor_night(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    width, height = request.param
    spec = NightSpec(n_lights=3, shape=(height, width), filters=("V",), distractors=False, n_stars=150)
    return make_night(tmp_path_factory.mktemp(f"night{width}x{height}"), spec)


def test_sensor_night_aligned_stack(sensor_night, tmp_path: Path) -> None:
    night = sensor_night
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_OK
    (output,) = out.glob("*.fits")
    header, stack = fits.getheader(output), fits.getdata(output)
    shape = fits.getdata(night.lights[0]).shape
    assert stack.shape == shape and header["NCOMBINE"] == 3
    # the stack lies on the grid of its reference light: its stars are where that light's are
    first = fits.getdata(reference_light(out)).astype(np.float32)
    residual = Registrar(first).measure(np.nan_to_num(stack, nan=float(np.nanmedian(stack))))
    assert abs(residual.dy) < 0.15 and abs(residual.dx) < 0.15
    _assert_report_thumbnail_aspect(out, shape)


def test_sensor_night_binned_by_3(sensor_night, tmp_path: Path) -> None:
    night = sensor_night
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-b", "3") == EXIT_OK
    outputs = sorted(out.glob("*.fits"))
    ny, nx = fits.getdata(night.lights[0]).shape
    assert len(outputs) == 3
    for output in outputs:
        header, data = fits.getheader(output), fits.getdata(output)
        assert data.shape == (ny // 3, nx // 3) and np.isfinite(data).all()
        assert header["XBINNING"] == 3 and header["YBINNING"] == 3
    _assert_report_thumbnail_aspect(out, (ny // 3, nx // 3))


def _assert_report_thumbnail_aspect(out: Path, shape: tuple[int, int]) -> None:
    """Every thumbnail of the report has the frame's aspect (ceil of the sides: within 3 %)."""
    html = (out / "report.html").read_text()
    sizes = re.findall(r'<img src="data:image/png;base64,[^"]*" width="(\d+)" height="(\d+)"', html)
    assert sizes
    ny, nx = shape
    for width, height in sizes:
        assert int(width) / int(height) == pytest.approx(nx / ny, rel=0.03)


@pytest.mark.parametrize("size", LARGE_SENSORS, ids=lambda size: f"{size[0]}x{size[1]}")
def test_large_sensor_register_shift_bin_thumbnail(size: tuple[int, int]) -> None:
    width, height = size
    shape = (height, width)
    rng = np.random.default_rng(width)
    stars = random_stars(shape, 300, rng)
    reference = noisy_field(shape, stars, rng)
    frame = noisy_field(shape, stars, rng, shift=(-17.35, 24.6), flip=True)
    registrar = Registrar(reference)
    assert registrar.factor == 2
    shift = registrar.measure(frame, try_flip=True)
    assert shift.flipped and registrar.accepts(shift)
    assert shift.dy == pytest.approx(17.35, abs=0.1) and shift.dx == pytest.approx(-24.6, abs=0.1)
    aligned = apply_shift(frame, shift)
    assert aligned.shape == shape and np.isfinite(aligned[height // 2, width // 2])
    assert np.isnan(aligned[0]).all() and np.isnan(aligned[:, -1]).all()  # moved in from outside
    assert bin_image(aligned, 3).shape == (height // 3, width // 3)
    small, _, factor = block_mean(aligned)
    assert small.shape == (math.ceil(height / factor), math.ceil(width / factor)) and max(small.shape) <= 256


# -- star detection in bands of rows ---------------------------------------------------------------


@SETTINGS
@given(shape=shapes(24, 300), band=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_stars_are_the_same_whatever_the_band_height_and_source(
    shape: tuple[int, int], band: int, seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """find_stars reads the frame a band of rows at a time: the stars, the sky and the noise
    are the same bits for any band height (down to one row, under its halo), from an array or
    from the intermediate's rows on disk, NaN pixels included."""
    rng = np.random.default_rng(seed)
    stars = random_stars(shape, max(3, shape[0] * shape[1] // 400), rng, flux_range=(300, 3e4), margin=2)
    frame = noisy_field(shape, stars, rng)
    frame[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5)] = np.nan
    whole = _find_stars(frame, max_stars=50)
    path = tmp_path_factory.mktemp("rows") / "frame.fits"
    fits.writeto(path, frame)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stars_module, "STRIP_BYTES", band * shape[1] * 4)
        for banded in (_find_stars(frame, max_stars=50), _find_stars(Float32Rows(path), max_stars=50)):
            assert (banded.sky, banded.noise) == (whole.sky, whole.noise)
            for name in ("y", "x", "flux", "fwhm", "roundness"):
                np.testing.assert_array_equal(getattr(banded, name), getattr(whole, name))


def test_stars_of_a_frame_on_disk_take_bands_not_frames(tmp_path: Path, monkeypatch) -> None:
    """Measuring a frame from its file in bands of 1 MB allocates those bands, the samples of
    the sky and noise (3/16 of a frame) and the candidates' stamps (a few MB): well under the
    frame's float32 pixels, where one band of the whole frame takes 2.5 frames; the stars are
    the same."""
    shape = (3001, 2600)
    rng = np.random.default_rng(4)
    frame = noisy_field(shape, random_stars(shape, 400, rng, flux_range=(500, 3e4)), rng)
    path = tmp_path / "frame.fits"
    fits.writeto(path, frame)
    expected = _find_stars(frame, max_stars=300)  # and the modules it imports are loaded
    monkeypatch.setattr(stars_module, "STRIP_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        found = _find_stars(Float32Rows(path), max_stars=300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.65 * frame.nbytes
    assert len(found) == 300
    np.testing.assert_array_equal(found.y, expected.y)
    np.testing.assert_array_equal(found.flux, expected.flux)

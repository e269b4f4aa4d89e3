"""Tests for imgproc.align: translation (+ meridian flip) registration and resampling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from scipy.special import erf

from imgproc.align import KERNELS, Registrar, Shift, apply_shift, pier_side_flip

FWHM = 3.0
NOISE = 10.0
BACKGROUND = 1000.0


def _stars(shape: tuple[int, int], n: int, rng: np.random.Generator, margin: float = 0.0):
    """(n, 3) array of y, x, flux; peaks from 5 to 500 sigma (Pareto), area grown by margin."""
    y = rng.uniform(-margin, shape[0] + margin, n)
    x = rng.uniform(-margin, shape[1] + margin, n)
    sigma = FWHM / 2.3548
    peak = NOISE * np.minimum(5.0 * (rng.pareto(1.0, n) + 1.0), 500.0)
    return np.column_stack([y, x, peak * 2.0 * np.pi * sigma**2])


def _render(
    shape: tuple[int, int],
    stars: np.ndarray,
    rng: np.random.Generator | None,
    *,
    shift: tuple[float, float] = (0.0, 0.0),
    rotate180: bool = False,
    noise: float = NOISE,
) -> np.ndarray:
    """Pixel-integrated Gaussian stars on a flat background plus Gaussian noise (float32).

    The frame shows the sky displaced by ``shift`` (after a 180° rotation about the frame
    centre when ``rotate180``): a star at ``p`` in the reference appears at ``p + shift``.
    """
    ny, nx = shape
    y, x, flux = stars.T
    if rotate180:
        y, x = (ny - 1) - y, (nx - 1) - x
    y, x = y + shift[0], x + shift[1]
    sigma = FWHM / 2.3548
    r = int(np.ceil(4 * sigma)) + 1
    keep = (y > -r) & (y < ny + r) & (x > -r) & (x < nx + r)
    y, x, flux = y[keep], x[keep], flux[keep]
    offsets = np.arange(-r, r + 1)
    rows = np.rint(y).astype(int)[:, None] + offsets
    cols = np.rint(x).astype(int)[:, None] + offsets

    def profile(index: np.ndarray, centre: np.ndarray) -> np.ndarray:
        scale = np.sqrt(2.0) * sigma
        lower = erf((index - 0.5 - centre[:, None]) / scale)
        upper = erf((index + 0.5 - centre[:, None]) / scale)
        return 0.5 * (upper - lower)

    stamps = flux[:, None, None] * profile(rows, y)[:, :, None] * profile(cols, x)[:, None, :]
    pad = 2 * r + 2
    image = np.zeros((ny + 2 * pad, nx + 2 * pad))
    np.add.at(image, ((rows + pad)[:, :, None], (cols + pad)[:, None, :]), stamps)
    image = image[pad : pad + ny, pad : pad + nx] + BACKGROUND
    if rng is not None and noise > 0:
        image += rng.normal(0.0, noise, shape)
    return image.astype(np.float32)


def _field(size: int, seed: int, density: float = 150 / 256**2, margin_frac: float = 0.25):
    rng = np.random.default_rng(seed)
    shape = (size, size)
    margin = size * margin_frac
    stars = _stars(shape, int(density * (size + 2 * margin) ** 2), rng, margin)
    return rng, shape, stars


def _radial_errors(shifts: list[Shift], dithers: np.ndarray) -> np.ndarray:
    # a frame displaced by d is put back on the reference grid by a shift of -d
    measured = np.array([(s.dy, s.dx) for s in shifts])
    return np.hypot(*(measured + dithers).T)


@pytest.mark.parametrize(("size", "n_dithers"), [(128, 20), (256, 20), (1024, 6), (2048, 4)])
def test_measure_recovers_random_subpixel_dithers(size, n_dithers):
    rng, shape, stars = _field(size, seed=size)
    registrar = Registrar(_render(shape, stars, rng))
    dithers = rng.uniform(-size / 4, size / 4, (n_dithers, 2))
    shifts = [registrar.measure(_render(shape, stars, rng, shift=tuple(d))) for d in dithers]
    errors = _radial_errors(shifts, dithers)
    assert np.sqrt(np.mean(errors**2)) < 0.1
    assert errors.max() < 0.25
    assert not any(s.flipped for s in shifts)


_MEASURE_SCRIPT = """
import sys
import numpy as np
from imgproc.align import Registrar
frames = np.load(sys.argv[1])
registrar = Registrar(frames[0])
for frame in frames[1:]:
    shift = registrar.measure(frame)
    print(repr(shift.dy), repr(shift.dx), repr(shift.significance))
"""


def test_measured_shifts_do_not_depend_on_the_blas_thread_count(tmp_path: Path):
    """Multi-threaded BLAS sums the DFT grid's products in another order (~1e-5 px): the
    registrar pins BLAS to one thread, so a plain ``snakemake`` run, a SLURM job and ``imgproc``
    measure the same shifts to the last bit."""
    rng, shape, stars = _field(256, seed=11)
    dithers = [(0.0, 0.0), (3.3, -7.6), (-12.45, 5.05), (20.2, 18.7)]
    frames = np.stack([_render(shape, stars, rng, shift=d) for d in dithers])
    np.save(tmp_path / "frames.npy", frames)
    measured = {}
    for threads in ("1", "2", "4"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        measured[threads] = subprocess.run(
            [sys.executable, "-c", _MEASURE_SCRIPT, str(tmp_path / "frames.npy")],
            env=env, capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
    assert len(measured["1"].splitlines()) == len(dithers) - 1
    assert measured["2"] == measured["1"]
    assert measured["4"] == measured["1"]


def test_measure_ignores_fixed_hot_pixels_and_sky_gradient():
    rng, shape, stars = _field(128, seed=7)
    hy, hx = rng.integers(0, 128, 12), rng.integers(0, 127, 12)
    ramp = (2.0 * np.arange(128)[:, None] + 1.5 * np.arange(128)[None, :]).astype(np.float32)

    def frame(shift):
        image = _render(shape, stars, rng, shift=shift) + ramp
        # single hot pixels and 2-pixel clusters at the same sensor pixels in every frame
        image[hy, hx] += 50000.0
        image[hy[:6], hx[:6] + 1] += 50000.0
        return image

    registrar = Registrar(frame((0.0, 0.0)))
    dithers = rng.uniform(-20, 20, (10, 2))
    errors = _radial_errors([registrar.measure(frame(tuple(d))) for d in dithers], dithers)
    assert np.sqrt(np.mean(errors**2)) < 0.1
    assert errors.max() < 0.25


def test_measure_handles_nan_pixels():
    rng, shape, stars = _field(128, seed=3)
    reference = _render(shape, stars, rng)
    reference[40:44, :] = np.nan
    registrar = Registrar(reference)
    frame = _render(shape, stars, rng, shift=(5.3, -7.6))
    frame[:, 90] = np.nan
    frame[10:20, 10:20] = np.nan
    shift = registrar.measure(frame)
    assert shift.dy == pytest.approx(-5.3, abs=0.15)
    assert shift.dx == pytest.approx(7.6, abs=0.15)
    assert shift.quality > 0.5


def test_measure_quality_high_for_star_field_low_for_noise():
    rng, shape, stars = _field(128, seed=11)
    registrar = Registrar(_render(shape, stars, rng))
    good = registrar.measure(_render(shape, stars, rng, shift=(3.4, -12.2)))
    noise = registrar.measure(rng.normal(BACKGROUND, NOISE, shape).astype(np.float32))
    assert good.quality > 0.7
    assert noise.quality < 0.1
    assert registrar.accepts(good)
    assert not registrar.accepts(noise)


def test_measure_shift_puts_frame_onto_reference_grid():
    rng, shape, stars = _field(128, seed=5)
    reference = _render(shape, stars, None)
    registrar = Registrar(_render(shape, stars, rng))
    frame = _render(shape, stars, rng, shift=(-9.35, 14.8))
    aligned = apply_shift(frame, registrar.measure(frame))
    # the frame covers reference rows >= 9.35 and columns < 128 - 14.8
    assert np.isnan(aligned[:9]).all() and np.isnan(aligned[:, 114:]).all()
    inner = (slice(11, -1), slice(1, 112))
    residual = aligned[inner] - reference[inner]
    assert np.isfinite(residual).all()
    # left: frame noise (smoothed by the interpolation) and star-core interpolation error;
    # a 0.3 px registration error would already give 0.82 * NOISE here
    assert np.std(residual) < 0.75 * NOISE
    assert np.std(reference[inner]) > 4.0 * np.std(residual)


@pytest.mark.parametrize("size", [128, 2049])  # 2049: binned integer stage, odd remainder
def test_measure_detects_meridian_flip(size):
    rng, shape, stars = _field(size, seed=9, margin_frac=0.2)
    reference = _render(shape, stars, rng)
    registrar = Registrar(reference)
    dither = (6.7, -11.2)
    frame = _render(shape, stars, rng, shift=dither, rotate180=True)
    shift = registrar.measure(frame, try_flip=True)
    unflipped = registrar.measure(frame)
    assert shift.flipped
    # rotate back, then the displacement d is undone by +d
    assert shift.dy == pytest.approx(dither[0], abs=0.1)
    assert shift.dx == pytest.approx(dither[1], abs=0.1)
    assert shift.quality > 0.7
    assert unflipped.quality < 0.5 * shift.quality
    explicit = registrar.measure(frame[::-1, ::-1])
    assert (explicit.dy, explicit.dx) == pytest.approx((shift.dy, shift.dx), abs=0.02)
    inner = (slice(20, -20), slice(20, -20))
    truth = _render(shape, stars, None)[inner]
    residual = np.std(apply_shift(frame, shift)[inner] - truth)
    exact = np.std(apply_shift(frame, Shift(*dither, True, 1.0))[inner] - truth)
    assert residual < 1.02 * exact  # as good as the true shift's


def test_measure_try_flip_keeps_unrotated_frame():
    rng, shape, stars = _field(128, seed=4)
    registrar = Registrar(_render(shape, stars, rng))
    frame = _render(shape, stars, rng, shift=(2.2, 3.9))
    with_flip = registrar.measure(frame, try_flip=True)
    without = registrar.measure(frame)
    assert not with_flip.flipped
    assert with_flip == without


def test_measure_rejects_shape_mismatch():
    registrar = Registrar(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="shape"):
        registrar.measure(np.zeros((64, 65), np.float32))


def test_measure_blank_frame_has_zero_quality():
    rng, shape, stars = _field(64, seed=1)
    registrar = Registrar(_render(shape, stars, rng))
    shift = registrar.measure(np.full(shape, np.nan, np.float32))
    assert shift.quality == 0.0
    assert np.isfinite([shift.dy, shift.dx]).all()


@pytest.mark.parametrize(
    ("ref", "cur", "expected"),
    [
        ("EAST", "WEST", True),
        ("West", "east", True),
        ("E", "W", True),
        ("EAST", "EAST", False),
        ("WEST", " west ", False),
        (None, "WEST", False),
        ("EAST", None, False),
        ("UNKNOWN", "WEST", False),
        (None, None, False),
    ],
)
def test_pier_side_flip_only_when_both_known_and_different(ref, cur, expected):
    assert pier_side_flip(ref, cur) is expected


@pytest.mark.parametrize("kernel", KERNELS)
def test_apply_shift_integer_shift_is_exact_copy_with_nan_border(kernel):
    image = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    out = apply_shift(image, Shift(3.0, -2.0, False, 1.0), kernel=kernel)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[3:, :-2], image[:-3, 2:])
    assert np.isnan(out[:3]).all()
    assert np.isnan(out[:, -2:]).all()
    assert np.isfinite(out[3:, :-2]).all()


def test_apply_shift_bilinear_matches_ndimage():
    image = np.random.default_rng(1).normal(100, 5, size=(40, 50)).astype(np.float32)
    shift = Shift(2.3, -4.7, False, 1.0)
    out = apply_shift(image, shift)
    expected = scipy.ndimage.shift(
        image.astype(np.float64), (2.3, -4.7), order=1, mode="constant", cval=np.nan
    )
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-6, equal_nan=True)
    # output rows 0..2 and columns 45.. sample outside the frame
    assert np.isnan(out[:3]).all() and np.isfinite(out[3, :45]).all()
    assert np.isnan(out[:, 45:]).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("dy", "dx"), [(0.5, 0.25), (-0.5, -0.75), (10.4, -3.2)])
def test_apply_shift_border_is_nan_never_zero(dy, dx, kernel):
    image = np.full((32, 32), 7.0, np.float32)
    out = apply_shift(image, Shift(dy, dx, False, 1.0), kernel=kernel)
    np.testing.assert_allclose(out[np.isfinite(out)], 7.0, rtol=1e-5)
    # the side the frame moved away from samples outside it: whole rows/columns of NaN
    rows = out[: int(np.ceil(dy))] if dy > 0 else out[int(np.floor(dy)) :]
    cols = out[:, : int(np.ceil(dx))] if dx > 0 else out[:, int(np.floor(dx)) :]
    assert np.isnan(rows).all() and np.isnan(cols).all()
    assert np.isfinite(out[14:18, 14:18]).all()


def test_apply_shift_nan_spreads_to_interpolation_footprint_only():
    image = np.ones((20, 20), np.float32)
    image[10, 10] = np.nan
    out = apply_shift(image, Shift(0.5, 0.5, False, 1.0))
    inner = out[1:, 1:]  # row/column 0 sample outside the frame
    assert np.argwhere(np.isnan(inner)).tolist() == [[9, 9], [9, 10], [10, 9], [10, 10]]
    assert np.isnan(out[0]).all() and np.isnan(out[:, 0]).all()

    cubic = apply_shift(image, Shift(0.5, 0.5, False, 1.0), kernel="spline")
    bad = np.argwhere(np.isnan(cubic[2:-1, 2:-1])) + 2
    assert bad.min(axis=0).tolist() == [9, 9] and bad.max(axis=0).tolist() == [12, 12]
    assert len(bad) == 16

    bicubic = apply_shift(image, Shift(0.5, 0.5, False, 1.0), kernel="cubic")  # taps -1..+2
    bad = np.argwhere(np.isnan(bicubic[2:-1, 2:-1])) + 2
    assert bad.min(axis=0).tolist() == [9, 9] and bad.max(axis=0).tolist() == [12, 12]
    assert len(bad) == 16
    assert np.isnan(bicubic[:2]).all() and np.isnan(bicubic[:, :2]).all()
    assert np.isnan(bicubic[-1]).all() and np.isfinite(bicubic[-2, 2:9]).all()

    lanczos = apply_shift(image, Shift(0.5, 0.5, False, 1.0), kernel="lanczos4")  # taps -3..+4
    bad = np.argwhere(np.isnan(lanczos[5:-3, 5:-3])) + 5
    assert bad.min(axis=0).tolist() == [7, 7] and bad.max(axis=0).tolist() == [14, 14]
    assert len(bad) == 64


def test_apply_shift_rotates_before_shifting():
    image = np.arange(48, dtype=np.float32).reshape(6, 8)
    out = apply_shift(image, Shift(1.0, 2.0, True, 1.0))
    np.testing.assert_array_equal(out[1:, 2:], image[::-1, ::-1][:-1, :-2])
    assert np.isnan(out[0]).all() and np.isnan(out[:, :2]).all()


def test_apply_shift_preserves_flux_of_interior_star():
    shape = (48, 48)
    star = _render(shape, np.array([[20.0, 24.0, 5000.0]]), None) - BACKGROUND
    for kernel in KERNELS:
        out = apply_shift(star, Shift(3.37, -4.81, False, 1.0), kernel=kernel)
        assert np.nansum(out) == pytest.approx(star.sum(), rel=1e-3)


def test_apply_shift_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        apply_shift(np.zeros((8, 8)), Shift(0.5, 0.5, False, 1.0), kernel="nearest")


@pytest.mark.parametrize(("size", "n_stars"), [(64, 10), (256, 40), (1024, 20), (2048, 80)])
def test_accepts_by_significance_whatever_the_frame_size_and_star_density(size, n_stars):
    # a sparse large field has a low correlation coefficient (~0.1) but a towering peak
    from imgproc.synth import random_stars, star_field

    rng = np.random.default_rng(size)
    shape = (size, size)
    stars, other = random_stars(shape, n_stars, rng), random_stars(shape, n_stars, rng)

    def frame(field, shift=(0.0, 0.0)):
        return star_field(shape, field, shift=shift) + rng.normal(300, 20, shape).astype(np.float32)

    registrar = Registrar(frame(stars))
    good = registrar.measure(frame(stars, (2.3, -1.6)), try_flip=True)
    noise = registrar.measure(rng.normal(300, 20, shape).astype(np.float32), try_flip=True)
    unrelated = registrar.measure(frame(other), try_flip=True)
    assert registrar.accepts(good) and good.significance > 25
    assert not registrar.accepts(noise) and noise.significance < 7
    assert not registrar.accepts(unrelated) and unrelated.significance < 12

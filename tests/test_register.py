"""Star-matched registration (imgproc.align.StarRegistrar), whole-frame resampling and the
measurements of imgproc.stars, on generated star fields (imgproc.synth) checked against the
true star positions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from imgproc import align
from imgproc.align import (
    KERNELS,
    RESAMPLE_BAND_ROWS,
    BandResampler,
    Shift,
    StarRegistrar,
    apply_shift,
    shift_from_map,
)
from imgproc.publish import Member, aligned_header, measure
from imgproc.stars import find_stars
from imgproc.synth import field_positions, random_stars, star_field

SKY, NOISE = 200.0, 6.0


def _sky(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Stars (y, x, flux) over twice the frame around it: rotated views stay full."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    stars = random_stars((2 * ny, 2 * nx), n, rng, flux_range=(3e3, 3e5))
    stars[:, 0] -= ny / 2
    stars[:, 1] -= nx / 2
    return stars


def _frame(shape, stars, seed, fwhm=3.0, **view) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = star_field(shape, stars, fwhm=fwhm, **view) + SKY
    return (image + rng.normal(0.0, NOISE, shape)).astype(np.float32)


def _truth_rms(fit: Shift, shape, stars, **view) -> float:
    """RMS (px) of where the measured map puts the frame's true star positions against the
    true reference positions, over the stars inside both frames."""
    ny, nx = shape
    frame = field_positions(shape, stars[:, :2], **view)
    reference = stars[:, :2]

    def inside(p: np.ndarray) -> np.ndarray:
        return (p[:, 0] >= 0) & (p[:, 0] <= ny - 1) & (p[:, 1] >= 0) & (p[:, 1] <= nx - 1)

    both = inside(frame) & inside(reference)
    assert both.sum() >= 20
    if fit.flipped:  # the map applies to the frame turned by 180°
        frame = np.array([ny - 1, nx - 1]) - frame
    centre = (np.array(shape) - 1.0) / 2.0
    mapped = (frame[both] - centre) @ fit.matrix().T + centre + (fit.dy, fit.dx)
    return float(np.sqrt(np.mean(np.sum((mapped - reference[both]) ** 2, axis=1))))


@pytest.mark.parametrize(
    ("rotation", "shift", "rotate180"),
    [
        (0.5, (3.3, -7.6), False),
        (5.0, (-80.4, 120.2), False),  # a third of the frame's height
        (90.0, (20.7, -35.1), False),
        (180.0, (-12.2, 60.9), False),
        (-0.5, (80.1, -124.6), True),
        (5.0, (-40.6, 30.3), True),
        (90.0, (7.7, 8.8), True),
        (180.0, (0.4, -0.4), True),
        (-137.0, (15.0, 5.0), False),
    ],
)
def test_star_registration_matches_the_truth_at_any_rotation(rotation, shift, rotate180):
    shape = (241, 373)  # odd, not square
    stars = _sky(shape, 900, seed=int(abs(rotation) * 10) + rotate180)
    registrar = StarRegistrar(_frame(shape, stars, seed=1))
    view = {"shift": shift, "rotate180": rotate180, "rotation": rotation}
    image = _frame(shape, stars, seed=2, **view)
    measured = registrar.measure(image)
    assert measured.method == "stars" and measured.stars >= 20
    assert _truth_rms(measured, shape, stars, **view) <= 0.05
    # PIERSIDE: the frame turned before measuring, and the turn composed back
    member = Member("f", None, "f.fits", None, pierside="WEST")  # type: ignore[arg-type]
    via_pier, _ = measure(member, image, registrar, "EAST")
    np.testing.assert_allclose(via_pier.total(), measured.total(), atol=1e-5)  # the same map
    assert _truth_rms(via_pier, shape, stars, **view) <= 0.05


def test_star_registration_of_a_mosaic_works_in_full_resolution_pixels():
    shape = (301, 437)
    stars = _sky(shape, 900, seed=7)
    view = {"shift": (31.3, -17.8), "rotation": 3.0}
    registrar = StarRegistrar(_frame(shape, stars, seed=1, fwhm=4.0), mosaic=True)
    measured = registrar.measure(_frame(shape, stars, seed=2, fwhm=4.0, **view))
    assert measured.method == "stars"
    assert _truth_rms(measured, shape, stars, **view) <= 0.05


def test_too_few_stars_fall_back_to_cross_correlation():
    shape = (181, 243)
    stars = np.array([[60.2, 70.7, 5e4], [120.4, 180.1, 8e4], [90.0, 40.0, 3e4]])
    registrar = StarRegistrar(_frame(shape, stars, seed=1))
    measured = registrar.measure(_frame(shape, stars, seed=2, shift=(4.3, -6.6)))
    assert measured.method == "correlation" and measured.linear is None and measured.stars == 0
    assert registrar.accepts(measured)
    assert measured.dy == pytest.approx(-4.3, abs=0.1) and measured.dx == pytest.approx(6.6, abs=0.1)


def test_star_registration_is_deterministic():
    shape = (211, 263)
    stars = _sky(shape, 500, seed=3)
    reference = _frame(shape, stars, seed=1)
    image = _frame(shape, stars, seed=2, rotation=20.0, shift=(5.0, -3.0))
    assert StarRegistrar(reference).measure(image) == StarRegistrar(reference).measure(image)


@pytest.mark.parametrize("kernel", KERNELS)
def test_resampled_rotated_frame_lands_on_the_reference_stars(kernel):
    shape = (223, 317)
    stars = _sky(shape, 500, seed=11)
    reference = _frame(shape, stars, seed=1)
    view = {"shift": (12.4, -20.7), "rotation": 7.0}
    frame = _frame(shape, stars, seed=2, **view)
    measured = StarRegistrar(reference).measure(frame)
    aligned = apply_shift(frame, measured, kernel=kernel)
    # outside the frame: NaN, never zero; inside: the reference's stars
    assert np.isnan(aligned).any() and not (aligned == 0).any()
    found = find_stars(np.nan_to_num(aligned, nan=SKY))
    ref_found = find_stars(reference)
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(ref_found.yx).query(found.yx)
    assert np.median(distance) < 0.05
    ratio = found.median_fwhm() / find_stars(frame).median_fwhm()
    assert ratio <= (1.2 if kernel == "bilinear" else 1.05)


@pytest.mark.parametrize("kernel", ["spline", "cubic", "lanczos4"])
def test_sharp_resampling_keeps_the_flux_of_a_star(kernel):
    shape = (101, 131)
    star = np.array([[50.3, 60.6, 1e5]])
    frame = star_field(shape, star, fwhm=3.0)
    turned = shift_from_map(np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]]), 2.2, -3.1)
    aligned = apply_shift(frame, turned, kernel=kernel)
    assert np.nansum(aligned) == pytest.approx(1e5, rel=2e-3)
    assert np.nanmin(aligned) > -0.02 * np.nanmax(aligned)  # the kernel's own small ringing only


def test_nan_pixels_spread_only_within_the_kernel_reach():
    shape = (97, 123)
    frame = np.full(shape, 5.0, np.float32)
    frame[40, 60] = np.nan
    turned = shift_from_map(np.array([[np.cos(0.2), np.sin(0.2)], [-np.sin(0.2), np.cos(0.2)]]), 0.4, 0.3)
    for kernel, most in (("bilinear", 9), ("spline", 36), ("cubic", 25), ("lanczos4", 81)):
        aligned = apply_shift(frame, turned, kernel=kernel)
        inner = aligned[16:-16, 16:-16]  # clear of the turned frame's corners
        assert 1 <= np.isnan(inner).sum() <= most
        assert np.allclose(inner[np.isfinite(inner)], 5.0, atol=1e-4)


def test_find_stars_measures_fwhm_roundness_sky_and_noise():
    shape = (257, 311)
    stars = _sky(shape, 300, seed=5)
    found = find_stars(_frame(shape, stars, seed=1, fwhm=4.0))
    assert len(found) > 40
    assert found.median_fwhm() == pytest.approx(4.0, rel=0.05)
    assert found.median_roundness() > 0.95
    assert found.sky == pytest.approx(SKY, abs=2.0)
    assert found.noise == pytest.approx(NOISE, rel=0.15)
    # trailed stars: the sum of a row of shifted images is elongated along x
    trail = sum(star_field(shape, stars, fwhm=4.0, shift=(0.0, dx)) / 7 for dx in np.linspace(-4, 4, 7))
    trailed = find_stars((trail + SKY + np.random.default_rng(2).normal(0, NOISE, shape)).astype(np.float32))
    assert trailed.median_roundness() < 0.75


def test_aligned_header_moves_the_wcs_with_the_pixels():
    shape = (151, 201)
    header = fits.Header()
    header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, shape[1], shape[0]
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 30.0})
    header.update({"CRPIX1": 80.5, "CRPIX2": 70.2})
    header.update({"CD1_1": -2e-4, "CD1_2": 1e-5, "CD2_1": 1e-5, "CD2_2": 2e-4})
    total = np.array([[np.cos(0.4), np.sin(0.4)], [-np.sin(0.4), np.cos(0.4)]])
    for flip in (False, True):
        shift = shift_from_map(-total if flip else total, 6.5, -9.25, flip_beyond=180.0 if not flip else 0.0)
        out = aligned_header(header, shift)
        assert out["ALIGNMTH"] == "correlation" and out["ALIGNROT"] == pytest.approx(shift.rotation, abs=1e-4)
        frame_px = np.array([[10.0, 20.0], [140.0, 180.0], [75.0, 100.0]])  # (y, x)
        centre = (np.array(shape) - 1.0) / 2.0
        grid_px = (frame_px - centre) @ shift.total().T + centre + (shift.dy, shift.dx)
        before = WCS(header).all_pix2world(frame_px[:, ::-1], 0)
        after = WCS(out).all_pix2world(grid_px[:, ::-1], 0)
        np.testing.assert_allclose(after, before, atol=1e-9)


def test_a_moved_wcs_card_keeps_as_much_of_its_comment_as_fits() -> None:
    """A camera's long comment beside a full-precision CD element is cut to fit its card,
    with no warning from astropy."""
    header = fits.Header({"NAXIS": 2, "NAXIS1": 90, "NAXIS2": 70, "CRPIX1": 45.0, "CRPIX2": 35.0})
    long = "Coordinate transformation matrix element, axis 1 by 1 (plate solve)"
    header["CD1_1"], header["CD2_2"] = (-2.7777e-4, long), (2.7777e-4, "short")
    turned = shift_from_map(np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]]), 1.5, 2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = aligned_header(header, turned)
        text = out.tostring()
    assert long.startswith(out.comments["CD1_1"]) and len(out.comments["CD1_1"]) >= 40
    assert out.comments["CD2_2"] == "short" and "CD1_2" in out and len(text) % 80 == 0


@pytest.mark.parametrize("kernel", ["lanczos4", "cubic"])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("angle", [0.05, 1e-7], ids=["turned", "translation"])
def test_band_resampling_reads_only_the_rows_it_needs_and_matches_the_whole_frame(kernel, flipped, angle):
    """A big frame is resampled a fixed band of rows at a time from the source rows each band
    samples: any strips give the same bits, the NaN border is the whole frame's, the values
    agree with the whole frame resampled at once, and no read spans much more than a band
    plus what the turn moves across it; a map within TRANSLATION_TOL of a translation (two 1-D
    passes) as much as a turned one (warpAffine)."""
    shape = (613, 397)
    frame = _frame(shape, _sky(shape, 300, seed=3), seed=4)
    frame[300, 200] = np.nan
    turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    shift = shift_from_map(turn, 7.3, -4.6)
    if flipped:
        shift = Shift(shift.dy, shift.dx, True, 1.0, linear=shift.linear, method="stars")
    whole = apply_shift(frame, shift, kernel=kernel)
    spans: list[int] = []

    def read(lo: int, hi: int) -> np.ndarray:
        spans.append(hi - lo)
        return frame[lo:hi]

    strips = {}
    for height in (1, 50, 128, 613):
        bands = BandResampler(read, shape, shift, kernel)
        strips[height] = np.concatenate([bands.rows(a, min(613, a + height)) for a in range(0, 613, height)])
    for rows in strips.values():
        np.testing.assert_array_equal(rows, strips[613])
    np.testing.assert_array_equal(np.isfinite(strips[613]), np.isfinite(whole))
    _agree_to_opencv_placing(strips[613], whole)
    across = int(np.ceil(shape[1] * np.sin(angle)))
    assert max(spans) <= RESAMPLE_BAND_ROWS + across + 2 * (KERNELS[kernel] + 2)


@pytest.mark.parametrize("kernel", ["lanczos4", "cubic"])
def test_a_near_translation_is_resampled_in_two_passes_with_opencvs_values_and_footprint(kernel, monkeypatch):
    """A map that moves no pixel more than TRANSLATION_TOL from one translation is resampled
    by the kernel's taps along rows, then columns: at sample positions on OpenCV's 1/32-px grid
    the values of warpAffine to float rounding, and the same NaN pixels (the frame's border and
    the footprint of a NaN pixel: 8×8 for Lanczos-4, 4×4 for bicubic). Beyond the tolerance (a
    turn of 1e-4 rad moves a 2048² frame's corners 0.1 px), warpAffine resamples."""
    shape = (211, 173)
    frame = _frame(shape, _sky(shape, 60, seed=5), seed=6)
    frame[100, 80] = np.nan
    shift = shift_from_map(np.array([[1.0, 1e-8], [-1e-8, 1.0]]), 3.375, -5.8125)
    assert align._translation(shape, *align._inverse_map(shape, shift)) == pytest.approx((-3.375, 5.8125))
    corners = [np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) for a in (1e-4, 1e-6)]
    maps = [align._inverse_map((2048, 2048), shift_from_map(m, 0.5, 0.5)) for m in corners]
    assert align._translation((2048, 2048), *maps[0]) is None
    assert align._translation((2048, 2048), *maps[1]) == pytest.approx((-0.5, -0.5), abs=1e-5)
    two_pass = apply_shift(frame, shift, kernel=kernel)
    monkeypatch.setattr(align, "TRANSLATION_TOL", -1.0)  # every map through warpAffine
    np.testing.assert_allclose(two_pass, apply_shift(frame, shift, kernel=kernel), rtol=2e-6, atol=1e-3)
    reach = KERNELS[kernel]
    # output q samples q - (3.375, -5.8125): its taps are rows q - 4 - (reach - 1) ... q - 4 + reach
    nan_rows, nan_cols = np.nonzero(np.isnan(two_pass[10:-10, 15:-15]))
    assert sorted(set(nan_rows + 10)) == list(range(100 + 4 - reach, 100 + 4 + reach))
    assert sorted(set(nan_cols + 15)) == list(range(80 - 5 - reach, 80 - 5 + reach))


_BIG_FRAMES = """
import os
import imgproc.limits, imgproc.publish

imgproc.limits.WHOLE_FRAME_MAX_BYTES = 1 << 16


class _Counted(imgproc.publish.BandResampler):
    def __init__(self, *args, **kwargs):
        with open(os.environ["IMGPROC_TEST_BANDS"], "a") as log:
            log.write("band resampler\\n")
        super().__init__(*args, **kwargs)


imgproc.publish.BandResampler = _Counted
"""


def test_a_big_turned_night_is_resampled_by_bands_to_the_same_outputs(tmp_path, monkeypatch):
    """Frames over the whole-frame limit (lowered to 64 kB in the Snakemake process) are
    registered by their stars without reading their pixels and resampled by bands, aligned
    singles and stacks alike: the outputs match those of frames resampled whole."""
    import os

    from conftest import REPO, master_flags, run_cli

    from imgproc.synth import NightSpec, make_night

    night = make_night(
        tmp_path / "night",
        NightSpec(
            n_lights=4, shape=(331, 257), filters=("V",), n_stars=150, field_rotation=4.0, distractors=False
        ),
    )
    site, log = tmp_path / "site", tmp_path / "bands.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BIG_FRAMES, encoding="utf-8")
    outputs = {}
    for mode in ("whole", "bands"):
        with monkeypatch.context() as patch:
            if mode == "bands":  # the Snakemake process imports sitecustomize
                patch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))
                patch.setenv("IMGPROC_TEST_BANDS", str(log))
            for flags in (("-a",), ("-a", "-s", "-S", "1")):
                out = tmp_path / f"{mode}{len(flags)}"
                assert run_cli(night.root / "lights", out, *master_flags(night), *flags) == 0
                outputs[mode, flags] = {p.name: fits.getdata(p) for p in sorted(out.glob("*.fits"))}
    # 4 aligned singles, then the stack's 4 frames (each fitted by its stars, the reference too)
    assert log.read_text().count("band resampler") == 8
    for flags in (("-a",), ("-a", "-s", "-S", "1")):
        whole, bands = outputs["whole", flags], outputs["bands", flags]
        assert sorted(whole) == sorted(bands) and len(whole) == (4 if len(flags) == 1 else 1)
        for name in whole:
            assert np.isfinite(whole[name]).mean() > 0.8
            _agree_to_opencv_placing(bands[name], whole[name])


def test_a_big_stack_is_written_as_it_is_combined_to_the_same_bytes(tmp_path, monkeypatch):
    """A stack of frames over the whole-frame limit (lowered to 64 kB in the Snakemake
    process) goes to its file strip by strip as it is combined, never held whole: the same
    file, byte for byte, as a stack held whole."""
    import os

    from conftest import REPO, master_flags, run_cli

    from imgproc.synth import NightSpec, make_night

    night = make_night(
        tmp_path / "night", NightSpec(n_lights=5, shape=(211, 173), filters=("V",), distractors=False)
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BIG_FRAMES, encoding="utf-8")
    made = {}
    for mode in ("whole", "bands"):
        with monkeypatch.context() as patch:
            if mode == "bands":
                patch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))
                patch.setenv("IMGPROC_TEST_BANDS", str(tmp_path / "bands.log"))
            out = tmp_path / mode
            assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1") == 0
            made[mode] = {p.name: p.read_bytes() for p in out.glob("*.fits")}
    assert len(made["whole"]) == 1 and made["bands"] == made["whole"]


def _agree_to_opencv_placing(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal but where OpenCV places a sample on the next 1/32 px (its positions, computed from
    another offset, round the other way): there by at most 1/32 of the local gradient on each
    axis, at a few per cent of the pixels."""
    np.testing.assert_array_equal(np.isfinite(found), np.isfinite(expected))
    finite = np.isfinite(expected)
    gy, gx = np.gradient(np.where(finite, expected, np.nanmedian(expected)))
    slack = (np.abs(gy) + np.abs(gx)) / 32 * 1.5 + 1e-3
    differ = finite & (np.abs(found - expected) > 1e-3 + 1e-6 * np.abs(expected))
    assert differ.mean() < 0.05
    assert (np.abs(found - expected)[finite] <= slack[finite] + 1e-6 * np.abs(expected[finite])).all()

"""Tests for the synthetic-night generator (small shapes, fast)."""

from __future__ import annotations

import hashlib
import itertools
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from imgproc.synth import NightSpec, make_night, random_stars, star_field, write_fits

SMALL = NightSpec(n_lights=3, shape=(48, 64), n_stars=12)

LIGHT_CARDS = {
    "IMAGETYP": "LIGHT",
    "OBJECT": "V1234 Cyg",
    "INSTRUME": "ZWO ASI294MM Pro",
    "GAIN": 120,
    "OFFSET": 30,
    "READOUTM": "Normal",
    "SET-TEMP": -10.0,
    "XBINNING": 1,
    "YBINNING": 1,
    "XPIXSZ": 4.63,
    "YPIXSZ": 4.63,
    "PIERSIDE": "West",
    "OBSERVER": "Test Observer",
    "CTYPE1": "RA---TAN",
    "CTYPE2": "DEC--TAN",
}
OTHER_LIGHT_KEYS = (
    "FILTER",
    "EXPTIME",
    "DATE-OBS",
    "CCD-TEMP",
    "TELESCOP",
    "CRPIX1",
    "CRPIX2",
    "CRVAL1",
    "CRVAL2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
)
CAMERA_KEYS = ("INSTRUME", "GAIN", "OFFSET", "READOUTM", "SET-TEMP", "XBINNING", "YBINNING")


def _centroid(img: np.ndarray, y: float, x: float, r: int = 8) -> tuple[float, float]:
    """Flux-weighted centroid in a box of half-size r around (y, x)."""
    y0, x0 = round(y), round(x)
    box = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1].astype(np.float64)
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return float((box * yy).sum() / box.sum()), float((box * xx).sum() / box.sum())


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.fits"))
    }


def _calibrated(night, light: Path) -> np.ndarray:
    """(raw - bias - dark) / (flat / mean(flat)) with the expected masters."""
    exp = night.expected_masters[light.name]
    raw = fits.getdata(light).astype(np.float64)
    bias = fits.getdata(night.bias_dir / exp["bias"])
    dark = fits.getdata(night.dark_dir / exp["dark"])
    flat = fits.getdata(night.flat_dir / exp["flat"]).astype(np.float64)
    return (raw - bias - dark) / (flat / flat.mean())


# --- star_field / random_stars ------------------------------------------------------------


@pytest.mark.parametrize("shift", [(0.0, 0.0), (1.25, -2.4), (-3.7, 0.49), (0.5, 0.5)])
def test_star_field_shift_lands_where_expected(shift):
    stars = np.array([[20.3, 30.7, 1e4]])
    img = star_field((48, 64), stars, fwhm=2.5, shift=shift)
    assert img.dtype == np.float32 and img.shape == (48, 64)
    cy, cx = _centroid(img, 20.3 + shift[0], 30.7 + shift[1])
    assert cy == pytest.approx(20.3 + shift[0], abs=0.05)
    assert cx == pytest.approx(30.7 + shift[1], abs=0.05)


def test_star_field_rotate180_mapping():
    ny, nx = 48, 64
    y, x, dy, dx = 12.2, 17.9, 1.5, -0.8
    img = star_field((ny, nx), np.array([[y, x, 5e3]]), shift=(dy, dx), rotate180=True)
    cy, cx = _centroid(img, ny - 1 - (y + dy), nx - 1 - (x + dx))
    assert cy == pytest.approx(ny - 1 - (y + dy), abs=0.05)
    assert cx == pytest.approx(nx - 1 - (x + dx), abs=0.05)


def test_star_field_rotate180_is_the_rotated_view():
    stars = random_stars((48, 64), 15, np.random.default_rng(3), margin=12)
    plain = star_field((48, 64), stars, shift=(0.3, -0.6))
    flipped = star_field((48, 64), stars, shift=(0.3, -0.6), rotate180=True)
    np.testing.assert_allclose(flipped, plain[::-1, ::-1], rtol=1e-4, atol=1e-2)


def test_star_field_flux_edges_and_empty():
    inside = star_field((40, 40), np.array([[20.0, 20.0, 1234.0]]))
    assert inside.sum() == pytest.approx(1234.0, rel=1e-5)
    half = star_field((40, 40), np.array([[20.0, -0.5, 1000.0]]))  # centred on the left edge
    assert half.sum() == pytest.approx(500.0, rel=1e-3)
    assert not star_field((40, 40), np.array([[-50.0, 20.0, 1e5]])).any()
    assert not star_field((40, 40), np.empty((0, 3))).any()


def test_random_stars_ranges_and_determinism():
    a = random_stars((100, 200), 500, np.random.default_rng(7), flux_range=(1e3, 1e5), margin=5)
    b = random_stars((100, 200), 500, np.random.default_rng(7), flux_range=(1e3, 1e5), margin=5)
    assert a.shape == (500, 3) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert a[:, 0].min() >= 5 and a[:, 0].max() <= 94
    assert a[:, 1].min() >= 5 and a[:, 1].max() <= 194
    assert a[:, 2].min() >= 1e3 and a[:, 2].max() <= 1e5
    # log-uniform: about half the stars below the geometric middle
    assert 0.4 < np.mean(a[:, 2] < 1e4) < 0.6


# --- write_fits --------------------------------------------------------------------------


def test_write_fits_uint16_round_trip(tmp_path):
    data = np.array([[-5.0, 0.4, 1.6, 500.5], [32767.6, 40000.2, 65535.4, 70000.0]])
    path = tmp_path / "u.fits"
    write_fits(path, data, {"IMAGETYP": "LIGHT", "EXPTIME": (60.0, "[s]"), "BITPIX": 8}, dtype="uint16")
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        raw_hdr = hdul[0].header
        assert raw_hdr["BITPIX"] == 16 and raw_hdr["BZERO"] == 32768
        assert raw_hdr.comments["EXPTIME"] == "[s]"
        assert list(raw_hdr)[-2:] == ["IMAGETYP", "EXPTIME"]
    back = fits.getdata(path)
    np.testing.assert_array_equal(back, np.clip(np.rint(data), 0, 65535))


def test_write_fits_float32_and_bad_dtype(tmp_path):
    data = np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4)
    write_fits(tmp_path / "f.fits", data, {"A": 1})
    assert fits.getheader(tmp_path / "f.fits")["BITPIX"] == -32
    np.testing.assert_array_equal(fits.getdata(tmp_path / "f.fits"), data.astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        write_fits(tmp_path / "g.fits", data, {}, dtype="int8")


# --- make_night --------------------------------------------------------------------------


def test_same_spec_gives_byte_identical_files(tmp_path):
    a = _digests(make_night(tmp_path / "a", SMALL).root)
    b = _digests(make_night(tmp_path / "b", SMALL).root)
    assert a == b and len(a) == 6 + 4 + 3 + 4
    c = _digests(make_night(tmp_path / "c", NightSpec(**{**vars(SMALL), "seed": 1})).root)
    assert all(a[k] != c[k] for k in a if k.startswith("lights"))


def test_lights_names_order_and_headers(tmp_path):
    night = make_night(tmp_path, SMALL)
    assert [p.name for p in night.lights] == sorted(p.name for p in night.lights)
    assert sorted(night.lights) == sorted((tmp_path / "lights").glob("*.fits"))
    times = []
    for i, path in enumerate(night.lights):
        hdr = fits.getheader(path)
        for key, value in LIGHT_CARDS.items():
            assert hdr[key] == value, key
        for key in OTHER_LIGHT_KEYS:
            assert key in hdr, key
        assert hdr["FILTER"] == SMALL.filters[i % 2]  # V, R, V, R, ...
        assert isinstance(hdr["EXPTIME"], float) and hdr["EXPTIME"] == 60.0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", hdr["DATE-OBS"])
        assert hdr["CRPIX1"] == 32.5 and hdr["CRPIX2"] == 24.5
        assert abs(hdr["CD2_2"]) * 3600 == pytest.approx(1.0, abs=0.01)
        assert fits.getheader(path)["BITPIX"] == 16 and fits.getdata(path).dtype == np.uint16
        times.append(datetime.fromisoformat(hdr["DATE-OBS"]))
    assert times[0] == datetime(2025, 5, 1, 21, 0, 0)
    assert {(b - a).total_seconds() for a, b in itertools.pairwise(times)} == {75.0}


def test_shifts_match_star_positions(tmp_path):
    spec = NightSpec(n_lights=3, shape=(64, 64), n_stars=6, filters=("V",), dtype="float32")
    night = make_night(tmp_path, spec)
    first = night.lights[0].name
    assert night.shifts[first] == (0.0, 0.0)
    y, x, _ = night.truth["stars"][np.argmax(night.truth["stars"][:, 2])]
    for light in night.lights:
        dy, dx = night.truth["offsets"][light.name]
        sy, sx = night.shifts[light.name]
        fy, fx = night.truth["offsets"][first]
        assert (sy, sx) == pytest.approx((dy - fy, dx - fx))
        assert max(abs(sy), abs(sx)) <= 2 * spec.dither_px
        img = _calibrated(night, light) - spec.sky
        cy, cx = _centroid(img, y + dy, x + dx, r=5)
        assert cy == pytest.approx(y + dy, abs=0.1) and cx == pytest.approx(x + dx, abs=0.1)


def test_meridian_flip_rotates_second_half(tmp_path):
    spec = NightSpec(n_lights=2, shape=(64, 64), n_stars=6, filters=("V",), meridian_flip=True)
    night = make_night(tmp_path, spec)
    before, after = night.lights
    assert fits.getheader(before)["PIERSIDE"] == "West"
    assert fits.getheader(after)["PIERSIDE"] == "East"
    assert fits.getheader(after)["CD1_1"] == -fits.getheader(before)["CD1_1"]
    y, x, _ = night.truth["stars"][np.argmax(night.truth["stars"][:, 2])]
    dy, dx = night.truth["offsets"][after.name]
    ey, ex = 63 - (y + dy), 63 - (x + dx)
    cy, cx = _centroid(_calibrated(night, after) - spec.sky, ey, ex, r=5)
    assert cy == pytest.approx(ey, abs=0.1) and cx == pytest.approx(ex, abs=0.1)


def test_calibrating_with_expected_masters_recovers_sky(tmp_path):
    spec = NightSpec(n_lights=1, shape=(64, 96), n_stars=0, dtype="float32")
    night = make_night(tmp_path, spec)
    for light in night.lights:
        img = _calibrated(night, light)
        assert np.median(img) == pytest.approx(spec.sky, rel=0.01)
        raw = fits.getdata(light)
        assert raw.std() > img.std()  # the flat's vignetting/dust and hot pixels are removed
    flat = fits.getdata(night.flat_dir / "flat_V.fits")
    assert 18000 < flat.mean() < 22000
    ny, nx = flat.shape
    centre = flat[ny // 2 - 3 : ny // 2 + 3, nx // 2 - 3 : nx // 2 + 3].mean()
    corners = np.mean([flat[0, 0], flat[0, -1], flat[-1, 0], flat[-1, -1]])
    assert 0.75 < corners / centre < 0.85


def _matches(kind: str, light: fits.Header, master: fits.Header) -> bool:
    keys = list(CAMERA_KEYS)
    if kind == "dark":
        keys.append("EXPTIME")
    if kind == "flat":
        keys.append("FILTER")
    return all(master.get(k) == light.get(k) for k in keys)


def test_expected_masters_exist_and_are_the_nearest_matching(tmp_path):
    night = make_night(tmp_path, SMALL)
    dirs = {"bias": night.bias_dir, "dark": night.dark_dir, "flat": night.flat_dir}
    types = {"bias": "Master Bias", "dark": "Master Dark", "flat": "Master Flat"}
    headers = {kind: {p.name: fits.getheader(p) for p in d.glob("*.fits")} for kind, d in dirs.items()}
    for kind, hdrs in headers.items():
        assert {h["IMAGETYP"] for h in hdrs.values()} == {types[kind]}
        assert all(fits.getheader(dirs[kind] / n)["BITPIX"] == -32 for n in hdrs)
    assert len(night.expected_masters) == len(night.lights)
    for light in night.lights:
        lhdr = fits.getheader(light)
        t = datetime.fromisoformat(lhdr["DATE-OBS"])
        for kind, name in night.expected_masters[light.name].items():
            assert (dirs[kind] / name).is_file()

            def dt(n, t=t, kind=kind):
                return abs(datetime.fromisoformat(headers[kind][n]["DATE-OBS"]) - t)

            matching = [n for n, h in headers[kind].items() if _matches(kind, lhdr, h)]
            assert min(matching, key=dt) == name
            # the distractors matter: ignoring the criteria would pick another file
            if kind != "flat" or lhdr["FILTER"] == SMALL.filters[0]:
                assert min(headers[kind], key=dt) != name


def test_distractors_off_writes_only_the_correct_masters(tmp_path):
    night = make_night(tmp_path, NightSpec(**{**vars(SMALL), "distractors": False}))
    names = {p.name for d in (night.bias_dir, night.dark_dir, night.flat_dir) for p in d.glob("*.fits")}
    assert names == {"bias_g120.fits", "dark_60s.fits", "flat_V.fits", "flat_R.fits"}
    assert all(m["role"] == "correct" for m in night.truth["masters"].values())

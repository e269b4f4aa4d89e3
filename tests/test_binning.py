"""Tests for N×N binning of pixels and headers, WCS included (imgproc.binning)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from imgproc.binning import bin_header, bin_image


def _reference_bin(image: np.ndarray, factor: int) -> np.ndarray:
    """Independent loop-based mean of factor×factor blocks (float64)."""
    ny, nx = image.shape[0] // factor, image.shape[1] // factor
    out = np.empty((ny, nx))
    for j in range(ny):
        for i in range(nx):
            block = image[j * factor : (j + 1) * factor, i * factor : (i + 1) * factor]
            out[j, i] = block.astype(np.float64).sum() / factor**2
    return out


@pytest.mark.parametrize(
    ("shape", "factor", "binned"),
    [
        ((7, 9), 2, (3, 4)),
        ((8, 8), 2, (4, 4)),
        ((10, 11), 3, (3, 3)),
        ((9, 12), 4, (2, 3)),
        ((5, 5), 5, (1, 1)),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_bin_image_mean_of_blocks(shape, factor, binned, dtype):
    rng = np.random.default_rng(10)
    image = rng.uniform(0, 60000, shape).astype(dtype)
    out = bin_image(image, factor)
    assert out.shape == binned
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _reference_bin(image, factor), rtol=1e-6)


def test_bin_image_remainder_dropped():
    image = np.zeros((7, 9), dtype=np.float32)
    image[6, :] = 1e6  # last row and column are the remainder: they must not leak in
    image[:, 8] = 1e6
    image[:6, :8] = np.arange(48, dtype=np.float32).reshape(6, 8)
    out = bin_image(image, 2)
    expected = np.array([[4.5, 6.5, 8.5, 10.5], [20.5, 22.5, 24.5, 26.5], [36.5, 38.5, 40.5, 42.5]])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("y", "x"), [(0, 0), (3, 5), (5, 7)])
def test_bin_image_nan_propagates_to_its_block_only(y, x):
    image = np.random.default_rng(11).uniform(1, 2, (6, 8)).astype(np.float32)
    image[y, x] = np.nan
    out = bin_image(image, 2)
    assert np.isnan(out[y // 2, x // 2])
    assert np.isnan(out).sum() == 1


def test_bin_image_factor_one_identity():
    image = np.random.default_rng(12).uniform(0, 1, (5, 7)).astype(np.float32)
    out = bin_image(image, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)
    as_int = bin_image(np.arange(6, dtype=np.uint16).reshape(2, 3), 1)
    assert as_int.dtype == np.float32
    np.testing.assert_array_equal(as_int, [[0, 1, 2], [3, 4, 5]])


def test_bin_image_too_small_raises():
    with pytest.raises(ValueError, match="cannot be binned"):
        bin_image(np.ones((3, 8), dtype=np.float32), 4)


def _base_header() -> fits.Header:
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = 40
    header["NAXIS2"] = 30
    header["XPIXSZ"] = 4.63
    header["YPIXSZ"] = 4.63
    return header


@pytest.mark.parametrize(
    ("given", "factor", "expected"), [(None, 2, 2), (None, 3, 3), (1, 2, 2), (2, 2, 4), (2, 3, 6)]
)
def test_bin_header_binning_multiplied(given, factor, expected):
    header = _base_header()
    if given is not None:
        header["XBINNING"] = given
        header["YBINNING"] = given
    out = bin_header(header, factor)
    assert out["XBINNING"] == expected
    assert out["YBINNING"] == expected
    assert out["XPIXSZ"] == pytest.approx(4.63 * factor)
    assert out["YPIXSZ"] == pytest.approx(4.63 * factor)


def test_bin_header_returns_copy_and_factor_one_unchanged():
    header = _base_header()
    header["XBINNING"] = 1
    before = header.tostring()
    out = bin_header(header, 2)
    assert header.tostring() == before
    assert out is not header
    same = bin_header(header, 1)
    assert same.tostring() == before
    assert same is not header


def test_bin_header_without_pixel_size_adds_none():
    header = _base_header()
    del header["XPIXSZ"], header["YPIXSZ"]
    out = bin_header(header, 2)
    assert "XPIXSZ" not in out
    assert "YPIXSZ" not in out


def _cd_header() -> fits.Header:
    header = _base_header()
    header.update(
        {
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            "CRPIX1": 20.5,
            "CRPIX2": 15.5,
            "CRVAL1": 307.5,
            "CRVAL2": 40.5,
            "CUNIT1": "deg",
            "CUNIT2": "deg",
            "CD1_1": -2.7e-4,
            "CD1_2": 3.0e-5,
            "CD2_1": 2.5e-5,
            "CD2_2": 2.8e-4,
        }
    )
    return header


def _pc_header() -> fits.Header:
    header = _base_header()
    angle = np.deg2rad(20.0)
    header.update(
        {
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            "CRPIX1": 13.25,
            "CRPIX2": 17.0,
            "CRVAL1": 10.0,
            "CRVAL2": -30.0,
            "CDELT1": -3.0e-4,
            "CDELT2": 3.0e-4,
            "PC1_1": np.cos(angle),
            "PC1_2": -np.sin(angle),
            "PC2_1": np.sin(angle),
            "PC2_2": np.cos(angle),
        }
    )
    return header


def _sip_header() -> fits.Header:
    header = _cd_header()
    header["CTYPE1"] = "RA---TAN-SIP"
    header["CTYPE2"] = "DEC--TAN-SIP"
    header["CRPIX1"] = 17.3  # off-centre, so a wrong CRPIX shift shows
    header.update(
        {
            "A_ORDER": 3,
            "A_2_0": 2.0e-3,
            "A_1_1": -1.5e-3,
            "A_0_2": 1.0e-3,
            "A_3_0": 3.0e-5,
            "A_1_2": -2.0e-5,
            "B_ORDER": 3,
            "B_2_0": -1.0e-3,
            "B_1_1": 2.5e-3,
            "B_0_2": 1.5e-3,
            "B_0_3": -4.0e-5,
            "B_2_1": 1.0e-5,
            "AP_ORDER": 3,
            "AP_1_0": 1.0e-4,
            "AP_2_0": -2.0e-3,
            "AP_1_1": 1.5e-3,
            "AP_0_3": 2.0e-5,
            "BP_ORDER": 3,
            "BP_0_1": -1.0e-4,
            "BP_0_2": -1.5e-3,
            "BP_2_1": -1.0e-5,
        }
    )
    return header


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        return WCS(header)


def _binned_grid(factor: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based binned pixel positions and the 0-based centres of their N×N blocks."""
    ny, nx = 30 // factor, 40 // factor
    yy, xx = np.mgrid[0:ny, 0:nx]
    binned = np.column_stack([xx.ravel(), yy.ravel()]).astype(np.float64)
    # include fractional positions too: the mapping is affine in pixel space
    binned = np.vstack([binned, [[0.3, 0.7], [nx - 1.25, ny - 1.5], [-0.5, -0.5]]])
    centres = factor * binned + (factor - 1) / 2.0
    return binned, centres


def _sky_separation_arcsec(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra1, dec1, ra2, dec2 = (np.deg2rad(v) for v in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    # haversine: accurate for the tiny separations compared here (arccos is not)
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(h))) * 3600.0


@pytest.mark.parametrize("make_header", [_cd_header, _pc_header], ids=["cd", "cdelt_pc"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bin_header_wcs_maps_binned_pixel_to_block_centre(make_header, factor):
    header = make_header()
    binned_wcs = _wcs(bin_header(header, factor))
    original_wcs = _wcs(header)
    binned, centres = _binned_grid(factor)
    got = binned_wcs.wcs_pix2world(binned, 0)
    want = original_wcs.wcs_pix2world(centres, 0)
    assert _sky_separation_arcsec(got, want).max() < 1e-6


def test_bin_header_cd_scaled_and_crpix_moved():
    out = bin_header(_cd_header(), 2)
    assert out["CRPIX1"] == pytest.approx(10.5)
    assert out["CRPIX2"] == pytest.approx(8.0)
    assert out["CD1_1"] == pytest.approx(-5.4e-4)
    assert out["CD1_2"] == pytest.approx(6.0e-5)
    assert out["CRVAL1"] == 307.5


def test_bin_header_pc_kept_and_cdelt_scaled():
    header = _pc_header()
    out = bin_header(header, 3)
    assert out["CDELT1"] == pytest.approx(-9.0e-4)
    assert out["CDELT2"] == pytest.approx(9.0e-4)
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2"):
        assert out[key] == header[key]


@pytest.mark.parametrize("factor", [2, 3])
def test_bin_header_sip_forward_maps_binned_pixel_to_block_centre(factor):
    header = _sip_header()
    original_wcs = _wcs(header)
    binned_wcs = _wcs(bin_header(header, factor))
    assert binned_wcs.sip is not None
    binned, centres = _binned_grid(factor)
    got = binned_wcs.all_pix2world(binned, 0)
    want = original_wcs.all_pix2world(centres, 0)
    # the distortion is many pixels at the edges, so a missed SIP rescale would show
    no_sip = original_wcs.wcs_pix2world(centres, 0)
    assert _sky_separation_arcsec(no_sip, want).max() > 1.0
    assert _sky_separation_arcsec(got, want).max() < 1e-6


@pytest.mark.parametrize("factor", [2, 3])
def test_bin_header_sip_inverse_rescaled(factor):
    header = _sip_header()
    binned_header = bin_header(header, factor)
    original = _wcs(header).sip
    binned = _wcs(binned_header).sip
    crpix = np.array([header["CRPIX1"], header["CRPIX2"]])
    binned_crpix = np.array([binned_header["CRPIX1"], binned_header["CRPIX2"]])
    rng = np.random.default_rng(13)
    focal = rng.uniform(-20.0, 20.0, (10, 2))  # focal-plane offsets from CRPIX, original pixels
    # Sip.foc2pix takes CRPIX-relative focal coordinates and returns pixel positions (AP/BP)
    orig_offsets = original.foc2pix(focal, 1) - crpix
    binned_offsets = binned.foc2pix(focal / factor, 1) - binned_crpix
    np.testing.assert_allclose(binned_offsets, orig_offsets / factor, rtol=1e-9, atol=1e-9)
    assert np.abs(orig_offsets - focal).max() > 0.5  # the inverse polynomial is not negligible

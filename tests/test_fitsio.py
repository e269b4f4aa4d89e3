"""FITS writing: atomic, deterministic, with checksums astropy verifies."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from imgproc.fitsio import (
    FitsError,
    Float32Rows,
    ImageWriter,
    encode_checksum,
    ones_complement_sum,
    read_image,
    replaced_atomically,
    set_card,
    write_atomic,
)

SEESTAR_NAME = "Light_NGC 7023_10.0s_IRCUT_20240730-224436.fit"


def test_set_card_keeps_a_comment_only_where_it_fits() -> None:
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_card(header, "ALIGNREF", SEESTAR_NAME, "reference frame (raw light)")
        set_card(header, "BIASFILE", "bias.fits", "master bias used")
        set_card(header, "QUOTED", "it's" * 14, "doubled quotes")
        set_card(header, "NSTARS", 123, "stars found")
        header.tostring()  # where astropy would cut a comment, with a warning
    assert header["ALIGNREF"] == SEESTAR_NAME
    assert header.comments["ALIGNREF"] == "" and header.comments["QUOTED"] == ""
    assert header.comments["BIASFILE"] == "master bias used" and header.comments["NSTARS"] == "stars found"


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (64, 64), (100, 37)])
def test_write_atomic_checksums_verify_with_astropy(tmp_path: Path, shape: tuple[int, int]) -> None:
    data = np.random.default_rng(sum(shape)).normal(100, 30, shape).astype(np.float32)
    data.flat[0] = np.nan
    header = fits.Header({"OBJECT": "x", "BZERO": 32768, "CHECKSUM": "stale", "DATASUM": "1"})
    header.add_history("a history line")
    target = tmp_path / "out.fits"
    write_atomic(target, data, header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch is a warning in astropy
        with fits.open(target, checksum=True) as hdul:
            np.testing.assert_array_equal(hdul[0].data, data)
            assert hdul[0].header["BITPIX"] == -32 and "BZERO" not in hdul[0].header
            assert hdul[0].header.comments["CHECKSUM"] == "imgproc"
    assert target.stat().st_size % 2880 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.fits"]  # no temporary file left


def test_write_atomic_is_byte_for_byte_repeatable(tmp_path: Path) -> None:
    data = np.arange(600, dtype=np.float32).reshape(20, 30)
    write_atomic(tmp_path / "a.fits", data, fits.Header({"OBJECT": "x"}))
    write_atomic(tmp_path / "b.fits", data, fits.Header({"OBJECT": "x"}))
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()


def test_ones_complement_sum_folds_carries() -> None:
    words = np.array([0xFFFFFFFF, 0x00000002], dtype=">u4")
    assert ones_complement_sum(words) == 0x00000002  # 0xFFFFFFFF is negative zero
    assert ones_complement_sum(np.array([0x80000000, 0x80000000], dtype=">u4")) == 1


def test_encode_checksum_uses_only_alphanumerics() -> None:
    for value in (0, 1, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF):
        text = encode_checksum(value)
        assert len(text) == 16 and text.isalnum()


@pytest.mark.parametrize(
    ("dtype", "cards"),
    [
        (np.uint16, {}),  # BITPIX 16 + BZERO 32768, the usual camera file (direct read)
        (np.int16, {}),
        (np.int32, {}),
        (np.uint8, {}),
        (np.float32, {}),
        (np.float64, {}),
        (np.int16, {"BSCALE": 2.0, "BZERO": 10.0}),  # scaled: through astropy
        (np.int16, {"BLANK": -1}),
    ],
)
def test_read_image_matches_astropy_for_every_layout(tmp_path: Path, dtype, cards: dict) -> None:
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    rng = np.random.default_rng(3)
    low, high = (info.min, info.max) if info else (-1e6, 1e6)
    data = rng.uniform(max(low, -30000), min(high, 60000), (9, 11)).astype(dtype)
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    path = tmp_path / "frame.fits"
    hdu.writeto(path)
    image, header = read_image(path)
    with fits.open(path) as hdul:
        expected_header = hdul[0].header.tostring()  # before .data rescales it
        expected = np.asarray(hdul[0].data, dtype=np.float32)
    assert image.dtype == np.float32 and header["NAXIS1"] == 11
    assert header.tostring() == expected_header  # read directly or through astropy: same cards
    np.testing.assert_array_equal(image, expected)


def test_image_writer_in_blocks_equals_write_atomic_and_leaves_nothing_when_short(tmp_path: Path) -> None:
    data = np.random.default_rng(5).normal(0.0, 1.0, (300, 70)).astype(np.float32)
    header = fits.Header({"OBJECT": "x"})
    write_atomic(tmp_path / "whole.fits", data, header)
    with ImageWriter(tmp_path / "blocks.fits", header, data.shape) as out:
        for start in range(0, 300, 37):
            out.write(data[start : start + 37])
    assert (tmp_path / "blocks.fits").read_bytes() == (tmp_path / "whole.fits").read_bytes()
    with (
        pytest.raises(ValueError, match="299 of 300 rows"),
        ImageWriter(tmp_path / "short.fits", header, data.shape) as out,
    ):
        out.write(data[:299])
    with (
        pytest.raises(ValueError, match="do not continue"),
        ImageWriter(tmp_path / "wide.fits", header, data.shape) as out,
    ):
        out.write(np.zeros((1, 71), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.fits", "whole.fits"]


def test_float32_rows_reads_an_intermediate_and_refuses_anything_else(tmp_path: Path) -> None:
    data = np.arange(7 * 5, dtype=np.float32).reshape(7, 5) - 3.5
    write_atomic(tmp_path / "cal.fits", data, fits.Header({"OBJECT": "M1"}))
    rows = Float32Rows(tmp_path / "cal.fits")
    assert rows.shape == (7, 5)
    np.testing.assert_array_equal(rows.read(2, 6), data[2:6])
    raw = (tmp_path / "cal.fits").read_bytes()
    (tmp_path / "short.fits").write_bytes(raw[: len(raw) - 2880])  # the last data block missing
    short = Float32Rows(tmp_path / "short.fits")
    with pytest.raises(FitsError, match="truncated"):
        short.read(0, 7)
    fits.PrimaryHDU(np.zeros((4, 4), np.uint16)).writeto(tmp_path / "u16.fits")
    with pytest.raises(FitsError, match="not a plain float32 image"):
        Float32Rows(tmp_path / "u16.fits")


def test_float32_rows_of_a_raw_file_read_each_planes_rows_natively(tmp_path: Path) -> None:
    """A resampled RGB cube spilled as raw native float32: each plane's rows, native-endian."""
    cube = np.random.default_rng(3).normal(0.0, 1.0, (3, 9, 7)).astype(np.float32)
    cube.tofile(tmp_path / "cube.f32")
    for plane in range(3):
        rows = Float32Rows.raw(tmp_path / "cube.f32", (9, 7), plane)
        block = rows.read(2, 8)
        assert block.dtype == np.dtype(np.float32) and block.dtype.isnative and rows.shape == (9, 7)
        np.testing.assert_array_equal(block, cube[plane, 2:8])
        np.testing.assert_array_equal(rows.memmap(), cube[plane])
    with pytest.raises(FitsError, match="truncated"):
        Float32Rows.raw(tmp_path / "cube.f32", (10, 7), 2).read(0, 10)


def test_a_file_replaced_atomically_appears_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "sub" / "frame.f32"
    with replaced_atomically(target) as temporary:
        temporary.write_bytes(b"first")
        assert not target.exists()  # nothing at the target until the block ends
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), replaced_atomically(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["frame.f32"]  # no temporary left

"""Tests for calibration arithmetic and the calibrated header (imgproc.calibrate)."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime

import numpy as np
import pytest
from astropy.io import fits

from imgproc import calibrate, limits
from imgproc.binning import bin_image
from imgproc.calibrate import (
    ROLES,
    LightSettings,
    MasterCache,
    calibrate_frame,
    calibrate_image,
    calibrated_header,
    normalise_flat,
)
from imgproc.fitsio import BLOCK_BYTES, FitsError

SHAPE = (6, 7)


def _frames(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "light": rng.uniform(1000.0, 3000.0, SHAPE).astype(np.float32),
        "bias": rng.uniform(480.0, 520.0, SHAPE).astype(np.float32),
        "dark": rng.uniform(0.0, 30.0, SHAPE).astype(np.float32),
        "flat": rng.uniform(0.8, 1.2, SHAPE).astype(np.float32),
    }


@pytest.mark.parametrize("level", [1.0, 0.5, 20000.0, 3.7])
def test_normalise_flat_scales_to_mean_one(level):
    rng = np.random.default_rng(1)
    shape = rng.uniform(0.7, 1.3, SHAPE)
    flat = (level * shape / shape.mean()).astype(np.float32)
    out = normalise_flat(flat)
    assert out.dtype == np.float32
    assert float(np.mean(out, dtype=np.float64)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(out, shape / shape.mean(), rtol=1e-6)


def test_normalise_flat_does_not_modify_input():
    flat = np.full(SHAPE, 2.0, dtype=np.float32)
    flat[0, 0] = 0.0
    before = flat.copy()
    normalise_flat(flat)
    np.testing.assert_array_equal(flat, before)


@pytest.mark.parametrize("bad", [0.0, -5.0, np.nan, np.inf, -np.inf])
def test_normalise_flat_bad_pixels_become_nan(bad):
    flat = np.full(SHAPE, 4.0, dtype=np.float32)
    flat[2, 3] = bad
    flat[0, 1] = 8.0
    out = normalise_flat(flat)
    assert np.isnan(out[2, 3])
    assert np.isnan(out).sum() == 1
    usable = np.delete(flat.ravel(), 2 * SHAPE[1] + 3)
    mean = usable.mean(dtype=np.float64)
    assert out[0, 0] == pytest.approx(4.0 / mean, rel=1e-6)
    assert out[0, 1] == pytest.approx(8.0 / mean, rel=1e-6)
    assert not np.isinf(out).any()


@pytest.mark.parametrize("values", [[0.0, 0.0], [-1.0, np.nan], [np.inf, -2.0]])
def test_normalise_flat_without_usable_pixel_raises(values):
    with pytest.raises(ValueError, match="no positive finite pixel"):
        normalise_flat(np.array([values], dtype=np.float32))


def test_calibrate_image_dead_flat_pixels_give_nan_not_inf():
    frames = _frames(2)
    flat = frames["flat"].copy()
    flat[1, 1], flat[2, 2], flat[3, 3], flat[4, 4] = 0.0, -1.0, np.nan, np.inf
    out = calibrate_image(frames["light"], frames["bias"], frames["dark"], normalise_flat(flat))
    assert not np.isinf(out).any()
    assert np.isnan(out).sum() == 4
    assert all(np.isnan(out[i, i]) for i in range(1, 5))
    assert np.isfinite(np.delete(out.ravel(), [8, 16, 24, 32])).all()


@pytest.mark.parametrize(
    "roles",
    [
        (),
        ("bias",),
        ("dark",),
        ("flat",),
        ("bias", "dark"),
        ("bias", "flat"),
        ("dark", "flat"),
        ("bias", "dark", "flat"),
    ],
)
def test_calibrate_image_matches_numpy_reference(roles):
    frames = _frames(3)
    reference = frames["light"].astype(np.float64)
    if "bias" in roles:
        reference = reference - frames["bias"].astype(np.float64)
    if "dark" in roles:
        reference = reference - frames["dark"].astype(np.float64)
    if "flat" in roles:
        reference = reference / frames["flat"].astype(np.float64)
    masters = {role: frames[role] for role in roles}
    out = calibrate_image(frames["light"], **masters)
    assert out.dtype == np.float32
    assert out.shape == SHAPE
    np.testing.assert_allclose(out, reference, rtol=1e-6)


@pytest.mark.parametrize("light_dtype", [np.uint16, np.int32, np.float64])
def test_calibrate_image_integer_and_double_inputs(light_dtype):
    rng = np.random.default_rng(4)
    light = rng.integers(1000, 60000, SHAPE).astype(light_dtype)
    bias = rng.uniform(480.0, 520.0, SHAPE)  # float64 master
    flat = rng.uniform(0.9, 1.1, SHAPE).astype(np.float32)
    out = calibrate_image(light, bias=bias, flat=flat)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (light.astype(np.float64) - bias) / flat, rtol=1e-6)


def test_calibrate_image_does_not_modify_inputs():
    frames = _frames(5)
    copies = {name: array.copy() for name, array in frames.items()}
    out = calibrate_image(frames["light"], frames["bias"], frames["dark"], frames["flat"])
    for name, array in frames.items():
        np.testing.assert_array_equal(array, copies[name])
    assert not np.shares_memory(out, frames["light"])


def test_calibrate_image_without_masters_returns_new_float32_copy():
    light = _frames(6)["light"]
    out = calibrate_image(light)
    np.testing.assert_array_equal(out, light)
    assert not np.shares_memory(out, light)
    out += 1.0
    assert not np.array_equal(out, light)


@pytest.mark.parametrize("role", ["bias", "dark", "flat"])
def test_calibrate_image_shape_mismatch_raises(role):
    frames = _frames(7)
    wrong = np.ones((3, 7), dtype=np.float32)
    with pytest.raises(ValueError) as info:
        calibrate_image(frames["light"], **{role: wrong})
    message = str(info.value)
    assert role in message
    assert "(3, 7)" in message
    assert "(6, 7)" in message


def _raw_header() -> fits.Header:
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = 7
    header["NAXIS2"] = 6
    header["BZERO"] = 32768
    header["BSCALE"] = 1
    header["IMAGETYP"] = "LIGHT"
    header["OBJECT"] = "V1234 Cyg"
    header["EXPTIME"] = 60.0
    header["DATE-OBS"] = "2025-05-01T21:00:00.000"
    header["XBINNING"] = 1
    header["YBINNING"] = 1
    header["XPIXSZ"] = 4.63
    header["CHECKSUM"] = "ZZZZZZZZZZZZZZZZ"
    header["DATASUM"] = "123"
    header["OBSERVER"] = "Someone Else"
    return header


MID = datetime(2025, 5, 1, 21, 0, 30, 250000)


@pytest.mark.parametrize(
    "masters",
    [
        {"bias": "/data/bias/bias_g120.fits", "dark": "/data/darks/dark_60s.fits", "flat": "/f/flat_V.fits"},
        {"bias": "/data/bias/bias_g120.fits", "dark": None, "flat": None},
        {"bias": None, "dark": "/data/darks/dark_60s.fits", "flat": "flat_V.fits"},
        {"bias": None, "dark": None, "flat": None},
        {"flat": "/f/flat_V.fits"},
    ],
)
def test_calibrated_header_master_cards(masters):
    header = _raw_header()
    out = calibrated_header(header, masters, LightSettings("DGAH", MID, 60.0))
    for role, cal, file_card in (
        ("bias", "BIASCAL", "BIASFILE"),
        ("dark", "DARKCAL", "DARKFILE"),
        ("flat", "FLATCAL", "FLATFILE"),
    ):
        path = masters.get(role)
        assert out[cal] is (path is not None)
        if path is None:
            assert file_card not in out
        else:
            assert out[file_card] == path.rsplit("/", 1)[-1]
            assert "/" not in out[file_card]


def test_calibrated_header_observer_date_avg_history():
    out = calibrated_header(_raw_header(), {"bias": "/b/bias.fits"}, LightSettings("DGAH", MID, 60.0))
    assert out["OBSERVER"] == "DGAH"
    assert out["DATE-AVG"] == "2025-05-01T21:00:30.250"
    history = " ".join(str(line) for line in out["HISTORY"])
    assert "imgproc" in history
    assert out["OBJECT"] == "V1234 Cyg"
    # issue 19: DATE-OBS is mid-exposure - EXPTIME/2 (MID is 250 ms after the raw DATE-OBS's mid),
    # the camera's value kept in HISTORY
    assert out["DATE-OBS"] == "2025-05-01T21:00:00.250"
    assert "imgproc replaced DATE-OBS = '2025-05-01T21:00:00.000'" in history


def test_calibrated_header_removes_scaling_and_checksum_cards():
    header = _raw_header()
    header.append(("BZERO", 0), useblanks=False, bottom=True)  # a duplicate must go too
    out = calibrated_header(header, {}, LightSettings("DGAH", MID, 60.0))
    for key in ("BZERO", "BSCALE", "CHECKSUM", "DATASUM"):
        assert key not in out


def test_calibrated_header_removes_an_equinox_that_is_not_a_number():
    header = _raw_header()
    header["EQUINOX"] = ""  # PANOPTES rotation.fits: fitsverify rejects it
    header["EPOCH"] = 2000.0
    out = calibrated_header(header, {}, LightSettings("DGAH", MID, 60.0))
    assert "EQUINOX" not in out and out["EPOCH"] == 2000.0
    assert "imgproc removed EQUINOX = '': not a number" in [str(h) for h in out["HISTORY"]]


def test_calibrated_header_does_not_modify_input():
    header = _raw_header()
    before = header.tostring()
    calibrated_header(header, {"bias": "/b/bias.fits"}, LightSettings("DGAH", MID, 60.0, binning=2))
    assert header.tostring() == before


@pytest.mark.parametrize("binning", [1, 2, 3])
def test_calibrated_header_binning_cards(binning):
    out = calibrated_header(_raw_header(), {}, LightSettings("DGAH", MID, 60.0, binning=binning))
    assert out["XBINNING"] == binning
    assert out["YBINNING"] == binning
    assert out["XPIXSZ"] == pytest.approx(4.63 * binning)


def _master(path, value: float) -> str:
    fits.PrimaryHDU(np.full(SHAPE, value, np.float32)).writeto(path, overwrite=True)
    return str(path)


def test_master_cache_reads_once_shares_read_only_and_rereads_a_replaced_file(tmp_path):
    cache = MasterCache()
    bias = _master(tmp_path / "bias.fits", 500.0)
    first = cache.get("bias", bias)
    assert cache.get("bias", bias) is first  # read once, shared
    assert not first.flags.writeable
    with pytest.raises(ValueError):
        first[0, 0] = 0.0
    _master(tmp_path / "bias.fits", 510.0)
    os.utime(bias, ns=(1, 1))  # a replaced file: new size or modification time
    assert float(cache.get("bias", bias)[0, 0]) == 510.0
    flat = _master(tmp_path / "flat.fits", 4.0)
    assert float(cache.get("flat", flat).mean()) == pytest.approx(1.0)  # flats normalised


def test_master_cache_drops_least_recently_used_beyond_its_size(tmp_path):
    one_frame = SHAPE[0] * SHAPE[1] * 4
    cache = MasterCache(max_bytes=2 * one_frame)
    paths = [_master(tmp_path / f"m{i}.fits", float(i)) for i in range(3)]
    a = cache.get("bias", paths[0])
    b = cache.get("bias", paths[1])
    assert cache.get("bias", paths[0]) is a  # used again: now the most recent
    c = cache.get("bias", paths[2])  # over the size: m1, the least recently used, goes
    assert cache.get("bias", paths[0]) is a
    assert cache.get("bias", paths[2]) is c
    assert cache.get("bias", paths[1]) is not b  # read again


def test_calibrate_image_in_place_reuses_a_float32_light_only():
    f = _frames(5)
    expected = calibrate_image(f["light"], f["bias"], f["dark"], f["flat"])
    light = f["light"].copy()
    out = calibrate_image(light, f["bias"], f["dark"], f["flat"], in_place=True)
    assert out is light
    np.testing.assert_array_equal(out, expected)
    integers = f["light"].astype(np.int32)
    assert calibrate_image(integers, in_place=True) is not integers  # another dtype: a new array


def _light_and_masters(tmp_path, shape: tuple[int, int], seed: int = 7) -> tuple[np.ndarray, dict]:
    """A uint16 light (BITPIX 16, BZERO 32768) and float32 bias, dark and flat (level 3.7, one
    dead pixel) in ``tmp_path``: the raw light and {role: (path, pixels)}."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 60000, shape).astype(np.uint16)
    light = fits.PrimaryHDU(data=(raw.astype(np.int32) - 32768).astype(np.int16))
    light.header["BZERO"] = 32768
    light.writeto(tmp_path / "light.fits")
    bias = rng.normal(100.0, 5.0, shape).astype(np.float32)
    dark = rng.normal(10.0, 2.0, shape).astype(np.float32)
    flat = rng.normal(3.7, 0.2, shape).astype(np.float32)
    flat[min(3, shape[0] - 1), 2] = 0.0  # a dead flat pixel: NaN in the light
    masters = {}
    for role, data in (("bias", bias), ("dark", dark), ("flat", flat)):
        masters[role] = (str(tmp_path / f"{role}.fits"), data)
        fits.writeto(masters[role][0], data)
    return raw, masters


@pytest.mark.parametrize(
    ("shape", "binning"), [((2049, 1001), 2), ((300, 257), 3), ((129, 64), 1), ((513, 700), 4), ((5, 9), 5)]
)
@pytest.mark.parametrize("big", [False, True], ids=["whole-masters", "masters-by-rows"])
def test_calibrate_frame_streams_the_same_pixels_as_whole_frame_calibration(
    tmp_path, monkeypatch, shape, binning, big
):
    if big:  # every master read a block of rows at a time, and the light not held whole
        monkeypatch.setattr(limits, "WHOLE_FRAME_MAX_BYTES", 0)
    raw, found = _light_and_masters(tmp_path, shape)
    masters = {role: path for role, (path, _) in found.items()}
    target = tmp_path / "out" / "calibrated.fits"
    cache = MasterCache()
    data, header = calibrate_frame(
        tmp_path / "light.fits", 0, masters, cache, target,
        LightSettings("ABC", datetime(2025, 5, 1, 21), 0.0, binning=binning), prepared=tmp_path / "prepared",
    )  # fmt: skip
    bias, dark, flat = (found[role][1] for role in ("bias", "dark", "flat"))
    expected = bin_image(calibrate_image(raw.astype(np.float32), bias, dark, normalise_flat(flat)), binning)
    assert np.array_equal(data, expected, equal_nan=True)
    assert isinstance(cache.rows("flat", masters["flat"], tmp_path / "prepared"), calibrate.MasterRows) == big
    assert isinstance(data, np.memmap) == (binning == 1 and big)  # the file, not a copy
    with fits.open(target, checksum=True) as hdul:
        assert hdul[0].verify_checksum() == 1 and hdul[0].verify_datasum() == 1
        assert np.array_equal(hdul[0].data, expected, equal_nan=True)
        assert hdul[0].header.get("XBINNING", 1) == binning and hdul[0].header["OBSERVER"] == "ABC"
    assert header["FLATCAL"] is True
    assert [p.name for p in target.parent.iterdir()] == ["calibrated.fits"]


def test_calibrate_frame_of_a_big_frame_holds_neither_the_frame_nor_its_masters(tmp_path, monkeypatch):
    """With masters by rows and the frame not kept, calibrating a frame allocates a few blocks of
    rows (BLOCK_BYTES each) for the masters and the light, not frames: here under half of one
    frame's float32 pixels (three masters and a whole light were 4 frames), the output the same."""
    monkeypatch.setattr(limits, "WHOLE_FRAME_MAX_BYTES", 1 << 20)
    shape = (3000, 2300)
    raw, found = _light_and_masters(tmp_path, shape, seed=11)
    masters = {role: path for role, (path, _) in found.items()}
    cache = MasterCache()
    settings = LightSettings("ABC", datetime(2025, 5, 1, 21), 0.0)
    light = tmp_path / "light.fits"
    prepared = tmp_path / "prepared"
    calibrate_frame(light, 0, masters, cache, tmp_path / "first.fits", settings, prepared=prepared)
    tracemalloc.start()
    try:
        data, _ = calibrate_frame(
            light, 0, masters, cache, tmp_path / "2nd.fits", settings, prepared=prepared
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * BLOCK_BYTES < shape[0] * shape[1] * 4 / 2
    bias, dark, flat = (found[role][1] for role in ("bias", "dark", "flat"))
    expected = calibrate_image(raw.astype(np.float32), bias, dark, normalise_flat(flat))
    assert np.array_equal(data, expected, equal_nan=True)
    assert (tmp_path / "first.fits").read_bytes() == (tmp_path / "2nd.fits").read_bytes()


def _mapped_bytes(path) -> int:
    """Bytes of ``path`` this process has mapped and resident (its ``Rss`` in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:  # a mapping's first line: "start-end perms ... path"
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_a_big_master_is_prepared_once_and_mapped_a_block_at_a_time(tmp_path, monkeypatch):
    """A master too big to hold whole is written once to ``prepared`` as calibration uses it
    (native float32, a flat normalised), kept for the next process while the master is
    unchanged and made again when it changes; calibrating a light maps a block of its rows at
    a time, not the master (the pages of the rows used before are dropped)."""
    monkeypatch.setattr(limits, "WHOLE_FRAME_MAX_BYTES", 1 << 20)
    shape = (3000, 2300)
    raw, found = _light_and_masters(tmp_path, shape, seed=5)
    masters = {role: path for role, (path, _) in found.items()}
    prepared, settings = tmp_path / "prepared", LightSettings("ABC", datetime(2025, 5, 1, 21), 0.0)

    def calibrate_to(name: str, cache: MasterCache) -> None:
        calibrate_frame(
            tmp_path / "light.fits", 0, masters, cache, tmp_path / name, settings, prepared=prepared
        )

    first = MasterCache()
    calibrate_to("a.fits", first)
    files = {path.name.split("-")[0]: path for path in prepared.glob("*.f32")}
    assert sorted(files) == ["bias", "dark", "flat"]
    bias, dark, flat = (found[role][1] for role in ROLES)
    made = {role: np.fromfile(path, np.float32).reshape(shape) for role, path in files.items()}
    assert np.array_equal(made["flat"], normalise_flat(flat), equal_nan=True)
    assert np.array_equal(made["bias"], bias) and np.array_equal(made["dark"], dark)
    for path in files.values():  # still mapped by the first cache, a block of it resident
        assert 0 < _mapped_bytes(path) <= 2 * BLOCK_BYTES + 2 * os.sysconf("SC_PAGE_SIZE")
    stamps = {path: path.stat().st_mtime_ns for path in files.values()}
    cache = MasterCache()  # another worker: the prepared masters are used as they are
    calibrate_to("b.fits", cache)
    assert {path: path.stat().st_mtime_ns for path in prepared.glob("*.f32")} == stamps
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()
    fits.writeto(masters["flat"], flat * 2, overwrite=True)  # a new flat: the same normalised pixels
    os.utime(masters["flat"], ns=(1, 1))
    calibrate_to("c.fits", cache)
    assert len(list(prepared.glob("*.f32"))) == 3 and not files["flat"].exists()  # the old version is gone
    assert not files["flat"].with_suffix(".lock").exists()  # and its lock file
    data = fits.getdata(tmp_path / "c.fits")
    expected = calibrate_image(raw.astype(np.float32), bias, dark, normalise_flat(flat * 2))
    assert np.array_equal(data, expected, equal_nan=True)


def test_a_big_master_wanted_by_two_workers_at_once_is_prepared_by_one(tmp_path, monkeypatch):
    """Workers that need the same big master at the same time wait for the one preparing it
    (a lock file beside it), and map what it wrote, instead of each writing it again."""
    monkeypatch.setattr(limits, "WHOLE_FRAME_MAX_BYTES", 1 << 20)
    _, found = _light_and_masters(tmp_path, (700, 450), seed=9)
    writes, both = [], threading.Barrier(2)
    replaced = calibrate.replaced_atomically

    @contextmanager
    def slow_write(path):  # the second worker asks while the first is still writing
        writes.append(path.name)
        time.sleep(0.3)
        with replaced(path) as temporary:
            yield temporary

    monkeypatch.setattr(calibrate, "replaced_atomically", slow_write)

    def worker(_: int) -> np.ndarray:
        both.wait()
        return np.asarray(MasterCache().rows("flat", found["flat"][0], tmp_path / "prepared")[0:700])

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(worker, range(2))
    assert len(writes) == 1 and writes[0].startswith("flat-")
    expected = normalise_flat(found["flat"][1])
    for rows in (first, second):
        assert np.array_equal(rows, expected, equal_nan=True)


def test_masters_by_rows_of_a_flat_without_usable_pixel_name_the_master(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "WHOLE_FRAME_MAX_BYTES", 0)
    flat = _master(tmp_path / "flat.fits", -1.0)
    with pytest.raises(FitsError, match=r"master flat\.fits: flat has no positive finite pixel"):
        MasterCache().rows("flat", flat, tmp_path / "prepared")


def test_calibrate_frame_of_a_truncated_light_leaves_no_file(tmp_path):
    rng = np.random.default_rng(3)
    fits.writeto(tmp_path / "light.fits", rng.integers(0, 1000, (512, 512)).astype(np.int16))
    content = (tmp_path / "light.fits").read_bytes()
    (tmp_path / "light.fits").write_bytes(content[: len(content) // 2])  # cut mid-pixels
    out = tmp_path / "out"
    with pytest.raises(FitsError, match="truncated"):
        calibrate_frame(tmp_path / "light.fits", 0, {}, MasterCache(), out / "calibrated.fits",
                        LightSettings("ABC", datetime(2025, 5, 1), 0.0), prepared=out / "m")  # fmt: skip
    assert not out.exists() or list(out.iterdir()) == []  # refused before the writer starts, or cleaned

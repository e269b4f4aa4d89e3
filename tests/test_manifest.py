"""Tests for the manifest table and the header scan (imgproc.manifest, imgproc.scan)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import imgproc.scan
from imgproc.keywords import DEFAULT_KEYWORDS
from imgproc.manifest import (
    COLUMNS,
    LISTED,
    OK,
    SKIPPED,
    is_fits_name,
    list_fits,
    missing_filter,
    read_tsv,
    same_filter,
    write_tsv,
)
from imgproc.scan import ScanRequest, scan, scan_file

SHAPE = (12, 10)
LIGHT_CARDS = {
    "IMAGETYP": "Light Frame",
    "OBJECT": "V1234 Cyg",
    "FILTER": "V",
    "EXPTIME": 60.0,
    "DATE-OBS": "2025-05-01T21:00:00.000",
    "INSTRUME": "ZWO ASI294MM Pro",
    "GAIN": 120,
    "OFFSET": 30,
    "SET-TEMP": -10.0,
}


def _cards(changes: dict | None = None) -> dict:
    cards = dict(LIGHT_CARDS)
    for key, value in (changes or {}).items():
        if value is None:
            cards.pop(key, None)
        else:
            cards[key] = value
    return cards


def _header(changes: dict | None = None) -> fits.Header:
    header = fits.Header()
    for key, value in _cards(changes).items():
        header[key] = value
    return header


def _data(seed: int = 0, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1000, shape).astype(np.float32)


def _write(path: Path, changes: dict | None = None, seed: int = 0, shape: tuple[int, int] = SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(_data(seed, shape), header=_header(changes)).writeto(path)
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.fits", True),
        ("a.FITS", True),
        ("a.fit", True),
        ("a.FIT", True),
        ("a.fts", True),
        ("a.ftz", True),
        ("a.fz", True),
        ("a.FZ", True),
        ("a.fits.gz", True),
        ("a.FITS.GZ", True),
        ("a.Fit.Gz", True),
        ("a.fts.gz", True),
        ("a.txt", False),
        ("a.jpg", False),
        ("a.fits.txt", False),
        ("a.gz", False),
        ("fits", False),
        (".hidden.fits", False),
        ("._a.fits", False),
        (".a.fits.tmp", False),
    ],
)
def test_is_fits_name(name, expected):
    assert is_fits_name(name) is expected


def test_list_fits_sorted_fits_names_only(tmp_path):
    for name in ("b.fits", "a.FIT", "c.txt", ".d.fits"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.fits").mkdir()  # a folder named like a FITS file is listed (the scan reports it)
    (tmp_path / "sub.fits" / "e.fits").write_bytes(b"")  # and searched
    assert [str(p.relative_to(tmp_path)) for p in list_fits(tmp_path)] == ["a.FIT", "b.fits", "sub.fits",
                                                                            "sub.fits/e.fits"]  # fmt: skip


IN_LIGHTS = "in the light folder: listed, not processed"


@pytest.mark.parametrize(
    ("folder", "imagetyp", "role", "reason"),
    [
        ("light", "Light Frame", "light", ""),
        ("light", None, "light", ""),
        ("light", "Object", "light", ""),
        ("light", "Bias Frame", "bias", f"bias frame (IMAGETYP 'Bias Frame') {IN_LIGHTS}"),
        ("light", "Dark Frame", "dark", f"dark frame (IMAGETYP 'Dark Frame') {IN_LIGHTS}"),
        ("light", "FLAT", "flat", f"flat frame (IMAGETYP 'FLAT') {IN_LIGHTS}"),
        ("bias", "Master Bias", "bias", ""),
        ("bias", None, "bias", ""),
        ("dark", "Dark Frame", "dark", ""),
        ("flat", "Flat Field", "flat", ""),
        ("dark", "Bias Frame", "bias", "bias frame (IMAGETYP 'Bias Frame') in the dark folder"),
        ("flat", "LIGHT", "light", "light frame (IMAGETYP 'LIGHT') in the flat folder"),
    ],
)  # fmt: skip
def test_scan_role_from_imagetyp(tmp_path, folder, imagetyp, role, reason):
    path = _write(tmp_path / folder / "f.fits", {"IMAGETYP": imagetyp})
    assert scan_file(path, folder, DEFAULT_KEYWORDS)["error"] == ""
    (tmp_path / "light").mkdir(exist_ok=True)
    masters = {} if folder == "light" else {folder: tmp_path / folder}
    [row] = scan(ScanRequest(tmp_path / "light", masters))
    assert (row["role"], row["folder"], row["reason"]) == (role, folder, reason)
    assert row["status"] == (OK if not reason else LISTED if folder == "light" else SKIPPED)


def test_one_folder_for_the_whole_night_is_read_by_frame_type(tmp_path):
    """The same folder as input, -B and -F (TIRCAM2's layout): untyped frames are the lights,
    typed ones serve their own role, and every other combination is listed, not skipped."""
    night = tmp_path / "night"
    _write(night / "IC310_1.fits", {"IMAGETYP": None})  # no type at all: a light
    _write(night / "bias_1.fits", {"IMAGETYP": None})  # the type from the file name
    _write(night / "flats01.fits", {"IMAGETYP": None})
    rows = scan(ScanRequest(night, {"bias": night, "flat": night}))
    got = {(Path(r["path"]).name, r["folder"]): (r["role"], r["status"]) for r in rows}
    assert got == {
        ("IC310_1.fits", "light"): ("light", OK),
        ("bias_1.fits", "light"): ("bias", LISTED),
        ("flats01.fits", "light"): ("flat", LISTED),
        ("IC310_1.fits", "bias"): ("light", LISTED),
        ("bias_1.fits", "bias"): ("bias", OK),
        ("flats01.fits", "bias"): ("flat", LISTED),
        ("IC310_1.fits", "flat"): ("light", LISTED),
        ("bias_1.fits", "flat"): ("bias", LISTED),
        ("flats01.fits", "flat"): ("flat", OK),
    }
    by_key = {(Path(r["path"]).name, r["folder"]): r for r in rows}
    assert by_key[("IC310_1.fits", "flat")]["reason"] == "light frame in the flat folder: listed, not used"
    # a bias folder of its own takes an untyped frame as a bias, even after the shared run
    (tmp_path / "empty").mkdir()
    again = scan(ScanRequest(tmp_path / "empty", {"bias": night}), rows)
    alone = next(r for r in again if r["path"].endswith("IC310_1.fits"))
    assert (alone["role"], alone["status"]) == ("bias", OK)


def test_scan_file_row_values(tmp_path):
    path = _write(tmp_path / "l.fits", {"EXPTIME": "40", "XBINNING": 2, "YBINNING": 2})
    row = scan_file(path, "light", DEFAULT_KEYWORDS)
    assert set(row) <= set(COLUMNS)
    assert row["path"] == str(path)
    assert (row["hdu"], row["ny"], row["nx"]) == (0, *SHAPE)
    assert row["exptime"] == 40.0
    assert row["gain"] == 120.0
    assert (row["xbinning"], row["ybinning"]) == (2, 2)
    assert row["date_obs"] == "2025-05-01T21:00:00.000"
    assert row["object"] == "V1234 Cyg"
    assert row["imagetyp_raw"] == "Light Frame"
    assert row["is_master"] is False
    assert row["size"] == path.stat().st_size
    assert row["mtime_ns"] == path.stat().st_mtime_ns
    assert len(row["header_sha1"]) == 40


@pytest.mark.parametrize(
    ("changes", "is_master"),
    [
        ({"IMAGETYP": "Master Bias"}, True),
        ({"IMAGETYP": "Bias Frame", "NCOMBINE": 50}, True),
        ({"IMAGETYP": "Bias Frame"}, False),
    ],
)
def test_scan_file_is_master(tmp_path, changes, is_master):
    path = _write(tmp_path / "b.fits", changes)
    assert scan_file(path, "bias", DEFAULT_KEYWORDS)["is_master"] is is_master


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"EXPTIME": None}, "EXPTIME is missing"),
        ({"EXPTIME": "long"}, "EXPTIME is missing"),
        ({"EXPTIME": -1.0}, "EXPTIME -1.0 is negative"),
        ({"DATE-OBS": None}, "DATE-OBS is missing"),
        ({"DATE-OBS": "last night"}, "not an ISO date"),
    ],
)
def test_scan_light_missing_keyword_skipped(tmp_path, changes, reason):
    _write(tmp_path / "lights" / "bad.fits", changes)
    _write(tmp_path / "lights" / "good.fits", seed=1, changes={"DATE-OBS": "2025-05-01T21:01:00"})
    rows = scan(ScanRequest(tmp_path / "lights"))
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["bad.fits"]["status"] == SKIPPED
    assert reason in by_name["bad.fits"]["reason"]
    assert by_name["good.fits"]["status"] == OK
    assert by_name["good.fits"]["reason"] == ""


def test_scan_dark_master_without_exptime_skipped(tmp_path):
    _write(tmp_path / "lights" / "l.fits")
    _write(tmp_path / "darks" / "d.fits", {"IMAGETYP": "Master Dark", "EXPTIME": None})
    rows = scan(ScanRequest(tmp_path / "lights", {"dark": tmp_path / "darks"}))
    dark = next(row for row in rows if row["folder"] == "dark")
    assert dark["status"] == SKIPPED
    assert "EXPTIME" in dark["reason"]


def test_scan_bias_without_date_obs_is_ok(tmp_path):
    _write(tmp_path / "lights" / "l.fits")
    _write(tmp_path / "bias" / "b.fits", {"IMAGETYP": "Master Bias", "DATE-OBS": None, "EXPTIME": None})
    rows = scan(ScanRequest(tmp_path / "lights", {"bias": tmp_path / "bias"}))
    assert [row["status"] for row in rows] == [OK, OK]


def test_scan_statuses_of_a_mixed_light_folder(tmp_path):
    lights = tmp_path / "lights"
    _write(lights / "a_light.fits")
    _write(lights / "b_bias.fits", {"IMAGETYP": "Bias Frame"}, seed=1)
    _write(lights / "c_noimagetyp.fits", {"IMAGETYP": None, "DATE-OBS": "2025-05-01T21:05:00"}, seed=2)
    _write(lights / "d_dup.fits", seed=3)  # same header as a_light.fits, other pixels
    (lights / "e_empty.fits").write_bytes(b"")
    (lights / "f_text.fits").write_text("this is not a FITS file\n" * 200)
    (lights / "notes.txt").write_text("ignored")
    rows = scan(ScanRequest(lights))
    by_name = {Path(row["path"]).name: row for row in rows}
    assert list(by_name) == [
        "a_light.fits",
        "b_bias.fits",
        "c_noimagetyp.fits",
        "d_dup.fits",
        "e_empty.fits",
        "f_text.fits",
    ]
    assert by_name["a_light.fits"]["status"] == OK
    assert by_name["b_bias.fits"]["status"] == LISTED
    assert "bias frame (IMAGETYP 'Bias Frame') in the light folder" in by_name["b_bias.fits"]["reason"]
    assert by_name["c_noimagetyp.fits"]["role"] == "light"
    assert by_name["c_noimagetyp.fits"]["status"] == OK
    assert by_name["d_dup.fits"]["status"] == SKIPPED
    assert by_name["d_dup.fits"]["reason"] == "duplicate of a_light.fits (identical header)"
    assert by_name["e_empty.fits"]["status"] == SKIPPED
    assert "empty" in by_name["e_empty.fits"]["reason"]
    assert by_name["f_text.fits"]["status"] == SKIPPED
    assert "not a readable FITS file" in by_name["f_text.fits"]["reason"]


@pytest.mark.parametrize(
    ("wanted", "statuses"),
    [(None, [OK, OK, OK]), ("V", [OK, LISTED, LISTED]), ("R", [LISTED, OK, LISTED]), ("B", [LISTED] * 3)],
)
def test_scan_filter_option_lists_other_filters(tmp_path, wanted, statuses):
    lights = tmp_path / "lights"
    _write(lights / "1.fits", {"FILTER": "V"})
    _write(lights / "2.fits", {"FILTER": "R"})
    _write(lights / "3.fits", {"FILTER": None})
    rows = scan(ScanRequest(lights, filter=wanted))
    assert [row["status"] for row in rows] == statuses
    for row in rows:
        if row["status"] == LISTED:
            assert f"is not {wanted!r} (-f)" in row["reason"]


@pytest.mark.parametrize(
    ("value", "wanted", "same"),
    [("V", "v", True), ("Sloan r'", "sloan r", True), ("Sloan r'", "Sloan_r_", True), ("R", "r'", True),
     ("V", "B", False), ("Luminance", "L", False), (None, "V", False), ("V", "", False)],
)  # fmt: skip
def test_same_filter_compares_normalised_names_case_insensitively(value, wanted, same):
    assert same_filter(value, wanted) is same


def test_missing_filter_names_the_filters_of_readable_lights(tmp_path):
    lights = tmp_path / "lights"
    _write(lights / "1.fits", {"FILTER": "V"})
    _write(lights / "2.fits", {"FILTER": "R"})
    _write(lights / "3.fits", {"FILTER": None})
    _write(lights / "4.fits", {"FILTER": "B", "IMAGETYP": "Flat Field"})
    rows = scan(ScanRequest(lights, filter="Ha"))
    expected = "no light has the filter 'Ha' (-f); the lights' filters: '-', 'R', 'V'"
    assert missing_filter(rows, "Ha") == expected
    assert missing_filter(rows, "r") == missing_filter(rows, None) == ""
    assert "the lights' filters: none" in missing_filter([], "V")


def test_scan_master_folders_rows_after_lights(tmp_path):
    _write(tmp_path / "lights" / "l.fits")
    _write(tmp_path / "flats" / "f.fits", {"IMAGETYP": "Master Flat"})
    _write(tmp_path / "bias" / "b.fits", {"IMAGETYP": "Master Bias"})
    rows = scan(ScanRequest(tmp_path / "lights", {"flat": tmp_path / "flats", "bias": tmp_path / "bias"}))
    assert [(row["folder"], row["role"], row["status"]) for row in rows] == [
        ("light", "light", OK),
        ("bias", "bias", OK),
        ("flat", "flat", OK),
    ]


def test_scan_identical_masters_are_not_duplicates(tmp_path):
    _write(tmp_path / "lights" / "l.fits")
    _write(tmp_path / "bias" / "b1.fits", {"IMAGETYP": "Master Bias"})
    _write(tmp_path / "bias" / "b2.fits", {"IMAGETYP": "Master Bias"}, seed=5)
    rows = scan(ScanRequest(tmp_path / "lights", {"bias": tmp_path / "bias"}))
    assert [row["status"] for row in rows] == [OK, OK, OK]


def test_scan_gzip_file_read_from_primary_hdu(tmp_path):
    path = tmp_path / "lights" / "z.fits.gz"
    path.parent.mkdir()
    data = _data(7, (9, 14))
    fits.PrimaryHDU(data, header=_header()).writeto(path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
    rows = scan(ScanRequest(path.parent))
    assert len(rows) == 1
    assert (rows[0]["hdu"], rows[0]["ny"], rows[0]["nx"], rows[0]["status"]) == (0, 9, 14, OK)
    assert rows[0]["exptime"] == 60.0


def test_scan_fpack_file_read_from_compressed_hdu(tmp_path):
    path = tmp_path / "lights" / "p.fz"
    path.parent.mkdir()
    data = _data(8, (9, 14))
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=_header())]).writeto(path)
    rows = scan(ScanRequest(path.parent))
    assert len(rows) == 1
    row = rows[0]
    assert (row["hdu"], row["ny"], row["nx"], row["status"]) == (1, 9, 14, OK)
    assert row["filter"] == "V"
    assert row["role"] == "light"
    assert row["date_obs"] == "2025-05-01T21:00:00.000"


def _table_row(**changes: object) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(
        path="/data/lights/a b.fits",
        folder="light",
        role="light",
        status="ok",
        reason="",
        error="",
        size=2880 * 3,
        mtime_ns=1_746_133_200_123_456_789,
        hdu=1,
        ny=64,
        nx=48,
        imagetyp_raw="Light Frame",
        is_master=False,
        object='O\'Brien "star"',
        filter="V",
        exptime=0.1 + 0.2,
        date_obs="2025-05-01T21:00:00.000",
        instrume="ZWO",
        gain=120.0,
        offset=None,
        readoutm="1",
        set_temp=-10.25,
        xbinning=2,
        ybinning=2,
        pierside=None,
        header_sha1="ab" * 20,
        table_sha1="0123456789ab",
    )
    row.update(changes)
    return row


def test_write_read_tsv_round_trip_keeps_types(tmp_path):
    rows = [_table_row(), _table_row(path="/x.fits", is_master=True, exptime=None, gain=0.0, set_temp=1e-7)]
    path = tmp_path / "manifest.tsv"
    write_tsv(path, rows)
    back = read_tsv(path)
    assert len(back) == 2
    for original, read in zip(rows, back, strict=True):
        assert list(read) == list(COLUMNS)
        for column in COLUMNS:
            expected = None if original[column] == "" else original[column]
            assert read[column] == expected, column
            assert type(read[column]) is type(expected), column
    assert back[0]["exptime"] == 0.1 + 0.2  # exact float repr
    assert back[0]["readoutm"] == "1"  # a string column stays a string
    assert back[1]["is_master"] is True
    assert back[0]["is_master"] is False
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_tsv_tabs_and_newlines_do_not_break_rows(tmp_path):
    path = tmp_path / "m.tsv"
    write_tsv(path, [_table_row(reason="a\tb\nc")])
    back = read_tsv(path)
    assert len(back) == 1
    assert back[0]["reason"] == "a\tb\nc"  # kept exactly (a file name may hold them), quoted


def test_write_read_tsv_round_trip_of_a_real_scan(tmp_path):
    _write(tmp_path / "lights" / "l1.fits")
    _write(tmp_path / "lights" / "l2.fits", {"DATE-OBS": "2025-05-01T21:01:00", "OBJECT": None}, seed=1)
    (tmp_path / "lights" / "l3.fits").write_bytes(b"")
    rows = scan(ScanRequest(tmp_path / "lights"))
    write_tsv(tmp_path / "m.tsv", rows)
    back = read_tsv(tmp_path / "m.tsv")
    for original, read in zip(rows, back, strict=True):
        for column in COLUMNS:
            value = original.get(column)
            assert read[column] == (None if value == "" else value), column


def _night(tmp_path: Path) -> ScanRequest:
    _write(tmp_path / "lights" / "l1.fits")
    _write(tmp_path / "lights" / "l2.fits", {"DATE-OBS": "2025-05-01T21:01:00"}, seed=1)
    _write(tmp_path / "bias" / "b.fits", {"IMAGETYP": "Master Bias"})
    return ScanRequest(tmp_path / "lights", {"bias": tmp_path / "bias"})


def _counting_read_header(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = imgproc.scan.read_header

    def counting(path, *args):
        calls.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(imgproc.scan, "read_header", counting)
    return calls


def test_scan_reuses_cached_rows_for_unchanged_files(tmp_path, monkeypatch):
    request = _night(tmp_path)
    first = scan(request)
    write_tsv(tmp_path / "m.tsv", first)
    previous = read_tsv(tmp_path / "m.tsv")
    calls = _counting_read_header(monkeypatch)
    second = scan(request, previous)
    assert calls == []
    assert [(row["path"], row["status"], row["exptime"]) for row in second] == [
        (row["path"], row["status"], row["exptime"]) for row in first
    ]


def test_scan_rereads_only_new_and_changed_files(tmp_path, monkeypatch):
    request = _night(tmp_path)
    previous = scan(request)
    new = _write(tmp_path / "lights" / "l3.fits", {"DATE-OBS": "2025-05-01T21:02:00"}, seed=2)
    changed = tmp_path / "lights" / "l1.fits"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls = _counting_read_header(monkeypatch)
    rows = scan(request, previous)
    assert sorted(p.name for p in calls) == ["l1.fits", "l3.fits"]
    assert [Path(row["path"]).name for row in rows] == ["l1.fits", "l2.fits", "l3.fits", "b.fits"]
    assert rows[2]["path"] == str(new)


def test_scan_rereads_everything_when_keyword_table_changes(tmp_path, monkeypatch):
    request = _night(tmp_path)
    previous = scan(request)
    calls = _counting_read_header(monkeypatch)
    table = {**DEFAULT_KEYWORDS, "filter": ["FILTNAME"]}
    rows = scan(ScanRequest(request.light_dir, request.master_dirs, keywords=table), previous)
    assert len(calls) == 3
    assert rows[0]["filter"] is None


def test_scan_cached_statuses_are_recomputed(tmp_path, monkeypatch):
    request = _night(tmp_path)
    previous = scan(request)
    calls = _counting_read_header(monkeypatch)
    rows = scan(ScanRequest(request.light_dir, request.master_dirs, filter="R"), previous)
    assert calls == []
    assert [row["status"] for row in rows] == [LISTED, LISTED, OK]


def test_scan_with_worker_processes_equals_serial_scan(tmp_path, monkeypatch):
    lights = tmp_path / "lights"
    for index in range(6):
        _write(lights / f"l{index}.fits", {"DATE-OBS": f"2025-05-01T21:0{index}:00"}, seed=index)
    (lights / "broken.fits").write_text("not FITS\n" * 400)
    serial = scan(ScanRequest(lights), workers=1)
    monkeypatch.setattr(imgproc.scan, "POOL_MIN_FILES", 2)
    pooled = scan(ScanRequest(lights), workers=2)
    assert pooled == serial
    assert [row["status"] for row in pooled] == [SKIPPED] + [OK] * 6  # broken.fits sorts first


def test_read_header_direct_path_matches_astropy(tmp_path):
    """A plain 2-D primary image is read without astropy's HDU machinery; the header, HDU and
    shape are what astropy gives, and an image in an extension still goes through astropy."""
    from imgproc.fitsio import _primary_image_header, read_header

    plain = _write(tmp_path / "plain.fits", seed=1, shape=(9, 14))
    header, hdu, shape = read_header(plain)
    assert _primary_image_header(plain) is not None
    with fits.open(plain) as hdul:
        assert header.tostring() == hdul[0].header.tostring()
    assert (hdu, shape) == (0, (9, 14))

    extension = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(_data(2, (7, 5)), header=_header())]).writeto(extension)
    assert _primary_image_header(extension) is None
    header, hdu, shape = read_header(extension)
    assert (hdu, shape, header["FILTER"]) == (1, (7, 5), "V")

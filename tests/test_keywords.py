"""Tests for header normalisation (imgproc.keywords) with the default keyword table."""

from __future__ import annotations

from datetime import datetime

import pytest

from imgproc.keywords import HeaderError, normalise, parse_date_obs

BASE = {"IMAGETYP": "LIGHT", "DATE-OBS": "2025-05-01T21:00:00.000", "EXPTIME": 60.0}


def _norm(cards: dict) -> dict:
    """normalise() of BASE updated by ``cards`` (a None value removes the card)."""
    header = dict(BASE)
    for key, value in cards.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    return normalise(header)


@pytest.mark.parametrize(
    ("cards", "name", "expected"),
    [
        ({"EXPTIME": 30.0}, "exptime", 30.0),
        ({"EXPTIME": None, "EXPOSURE": 45.0}, "exptime", 45.0),
        ({"EXPTIME": 30.0, "EXPOSURE": 45.0}, "exptime", 30.0),
        ({"EXPTIME": "40"}, "exptime", 40.0),
        ({"EXPTIME": " 12.5 "}, "exptime", 12.5),
        ({"FILTER": "V"}, "filter", "V"),
        ({"FILTER1": "R"}, "filter", "R"),
        ({"FILTER": "B", "FILTER1": "R"}, "filter", "B"),
        ({"OFFSET": 30}, "offset", 30.0),
        ({"BLKLEVEL": 12}, "offset", 12.0),
        ({"BLKLEVEL": "12"}, "offset", 12.0),
        ({"GAIN": "120"}, "gain", 120.0),
        ({"SET-TEMP": "-10"}, "set_temp", -10.0),
        ({"SET-TEMP": -15.5}, "set_temp", -15.5),
        ({"INSTRUME": "ZWO ASI294MM Pro"}, "instrume", "ZWO ASI294MM Pro"),
        ({"READOUTM": "Normal"}, "readoutm", "Normal"),
        ({"OBJECT": "V1234 Cyg"}, "object", "V1234 Cyg"),
        ({"OBJECT": "None"}, "object", None),
        ({"OBJECT": "None", "OBJNAME": "M 31"}, "object", "M 31"),
        ({"OBJECT": ""}, "object", None),
        ({}, "object", None),
        ({}, "gain", None),
        ({"GAIN": "high"}, "gain", None),
    ],
)
def test_normalise_keyword_variants(cards, name, expected):
    values = _norm(cards)
    assert values[name] == expected
    if isinstance(expected, float):
        assert isinstance(values[name], float)


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ({}, (1, 1)),
        ({"XBINNING": 2, "YBINNING": 2}, (2, 2)),
        ({"XBINNING": "3", "YBINNING": "3"}, (3, 3)),
        ({"XBINNING": 2}, (2, 1)),
    ],
)
def test_normalise_binning_default_one(cards, expected):
    values = _norm(cards)
    assert (values["xbinning"], values["ybinning"]) == expected
    assert all(type(values[axis]) is int for axis in ("xbinning", "ybinning"))


@pytest.mark.parametrize(
    ("imagetyp", "expected"),
    [
        ("Light Frame", "light"),
        ("LIGHT", "light"),
        ("Object", "light"),
        ("science", "light"),
        ("Bias Frame", "bias"),
        ("zero", "bias"),
        ("Master Bias", "bias"),
        ("Dark Frame", "dark"),
        ("Master Dark", "dark"),
        ("FLAT", "flat"),
        ("Flat Field", "flat"),
        (None, None),
        ("None", None),
    ],
)
def test_normalise_imagetyp_variants(imagetyp, expected):
    values = _norm({"IMAGETYP": imagetyp})
    assert values["imagetyp"] == expected
    assert values["imagetyp_raw"] == (None if expected is None else imagetyp)


def test_normalise_imagetyp_from_frametyp():
    values = _norm({"IMAGETYP": None, "FRAMETYP": "Dark"})
    assert values["imagetyp"] == "dark"


@pytest.mark.parametrize(
    ("date_obs", "expected"),
    [
        ("2017-12-19T18:33:43.317-0700", datetime(2017, 12, 20, 1, 33, 43, 317000)),
        ("2017-12-19T18:33:43.317-07:00", datetime(2017, 12, 20, 1, 33, 43, 317000)),
        ("2025-05-01T21:00:00Z", datetime(2025, 5, 1, 21, 0, 0)),
        ("2025-05-01T21:00:00.250Z", datetime(2025, 5, 1, 21, 0, 0, 250000)),
        ("2025-05-01T03:00:00+05:30", datetime(2025, 4, 30, 21, 30, 0)),
        ("2025-05-01T03:00:00+0530", datetime(2025, 4, 30, 21, 30, 0)),
        ("2025-05-01T22:00:00-03:30", datetime(2025, 5, 2, 1, 30, 0)),
        ("2025-05-01T21:00:00", datetime(2025, 5, 1, 21, 0, 0)),
        ("2025-05-01T21:00:00.123456", datetime(2025, 5, 1, 21, 0, 0, 123456)),
        ("2025-05-01 21:00:00", datetime(2025, 5, 1, 21, 0, 0)),
    ],
)
def test_parse_date_obs_to_naive_utc(date_obs, expected):
    parsed = parse_date_obs(date_obs)
    assert parsed == expected
    assert parsed.tzinfo is None


@pytest.mark.parametrize(
    ("date_obs", "time_obs", "expected"),
    [
        ("2017-12-19", "18:33:43.317", datetime(2017, 12, 19, 18, 33, 43, 317000)),
        ("2025-05-01", "00:00:05", datetime(2025, 5, 1, 0, 0, 5)),
    ],
)
def test_parse_date_obs_date_only_with_time_obs(date_obs, time_obs, expected):
    assert parse_date_obs(date_obs, time_obs) == expected


def test_normalise_date_only_uses_time_obs_card():
    values = _norm({"DATE-OBS": "2017-12-19", "TIME-OBS": "18:33:43.317"})
    assert values["date_obs"] == "2017-12-19T18:33:43.317"
    assert values["date_error"] is None


@pytest.mark.parametrize("value", ["yesterday", "2025-13-01T00:00:00", "2025-05-01T25:00:00", "12/19/2017"])
def test_parse_date_obs_unparsable_raises_header_error(value):
    with pytest.raises(HeaderError, match="DATE-OBS"):
        parse_date_obs(value)


@pytest.mark.parametrize("value", [None, "", "None"])
def test_parse_date_obs_missing_raises_header_error(value):
    with pytest.raises(HeaderError, match="missing"):
        parse_date_obs(value)


def test_normalise_date_obs_with_offset_becomes_utc_iso():
    values = _norm({"DATE-OBS": "2017-12-19T18:33:43.317-0700"})
    assert values["date_obs"] == "2017-12-20T01:33:43.317"
    assert values["date_error"] is None


def test_normalise_date_obs_falls_back_to_ut_obs():
    values = _norm({"DATE-OBS": None, "UT-OBS": "2025-05-01T21:00:00Z"})
    assert values["date_obs"] == "2025-05-01T21:00:00.000"


@pytest.mark.parametrize(("date_obs", "error_word"), [(None, "missing"), ("not a date", "not an ISO date")])
def test_normalise_bad_date_sets_date_error(date_obs, error_word):
    header = dict(BASE)
    if date_obs is None:
        del header["DATE-OBS"]
    else:
        header["DATE-OBS"] = date_obs
    values = normalise(header)
    assert values["date_obs"] is None
    assert error_word in values["date_error"]


def test_normalise_returns_every_canonical_name_with_default_table():
    values = normalise({})
    for name in (
        "imagetyp",
        "object",
        "filter",
        "exptime",
        "date_obs",
        "instrume",
        "gain",
        "offset",
        "readoutm",
        "set_temp",
        "xbinning",
        "ybinning",
        "pierside",
    ):
        assert name in values
    assert values["exptime"] is None
    assert values["imagetyp"] is None
    assert values["date_error"] is not None


def test_normalise_custom_table():
    values = normalise(
        {"EXPOSURE": "5", "EXPTIME": 99.0, "DATE-OBS": "2025-05-01T00:00:00"},
        {"exptime": ["EXPOSURE"], "date_obs": ["DATE-OBS"]},
    )
    assert values["exptime"] == 5.0


@pytest.mark.parametrize(
    ("cards", "name", "kind", "source"),
    [
        ({"EXPTIME": "0", "FILTER1": "BLOCK"}, "bias_001.fits", "bias", "file name"),
        ({"EXPTIME": "0", "FILTER1": "BLOCK"}, "frame_017.fits", "bias", "EXPTIME of 0"),  # TIRCAM2
        ({"EXPTIME": 0.0, "IMAGETYP": "Light Frame"}, "frame.fits", "light", "IMAGETYP"),
        ({"EXPTIME": 0.001}, "frame.fits", None, None),
        ({}, "frame.fits", None, None),
    ],
)
def test_a_frame_of_no_type_and_zero_exposure_is_a_bias(cards, name, kind, source):
    values = normalise(cards, file_name=name)
    assert (values["imagetyp"], values["type_source"]) == (kind, source)

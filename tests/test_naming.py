"""Tests for output names, Julian dates and mid-exposure times (imgproc.naming)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from astropy.time import Time

from imgproc.naming import (
    MAX_PART,
    default_output_dirname,
    format_jd,
    julian_date,
    mean_time,
    mid_exposure,
    output_name,
    safe_part,
)

SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NGC 1234", "NGC_1234"),
        ("  V1234 Cyg ", "V1234_Cyg"),
        ("a/b", "a_b"),
        ("../etc/passwd", "_etc_passwd"),
        ("..", "UNKNOWN"),
        ("...hidden", "hidden"),
        (".profile", "profile"),
        ('O\'Brien "star"', "O_Brien__star_"),
        ("Ñandú", "_and_"),
        ("M31+M32", "M31+M32"),
        ("SN-2025.ab", "SN-2025.ab"),
        ("a\\b:c*d?e", "a_b_c_d_e"),
        ("", "UNKNOWN"),
        ("   ", "UNKNOWN"),
        (None, "UNKNOWN"),
        ("None", "UNKNOWN"),
        ("///", "UNKNOWN"),
        (42, "42"),
    ],
)
def test_safe_part_replaces_unsafe_characters(value, expected):
    assert safe_part(value) == expected


def test_safe_part_custom_fallback():
    assert safe_part(None, "frame") == "frame"
    assert safe_part("", "X") == "X"


@pytest.mark.parametrize("length", [MAX_PART + 1, 300])
def test_safe_part_long_value_cut_to_max_part(length):
    out = safe_part("A" * length)
    assert out == "A" * MAX_PART
    assert len(out) == MAX_PART


@pytest.mark.parametrize("value", ["x" * 300, "é" * 100, "a b/c..d" * 40, "..//..", "\t\n"])
def test_safe_part_result_is_always_safe(value):
    out = safe_part(value)
    assert SAFE.match(out)
    assert not out.startswith(".")
    assert len(out) <= MAX_PART


@pytest.mark.parametrize(
    "when",
    [
        datetime(2025, 5, 1, 3, 0, 0),
        datetime(2000, 1, 1, 12, 0, 0),
        datetime(1970, 1, 1, 0, 0, 0),
        datetime(1969, 7, 20, 20, 17, 40),
        datetime(2017, 12, 20, 1, 33, 43, 317000),
        datetime(2024, 2, 29, 23, 59, 59, 999999),
        datetime(2026, 6, 15, 6, 30, 0, 500),
    ],
)
def test_julian_date_agrees_with_astropy(when):
    expected = Time(when, scale="utc").jd
    assert julian_date(when) == pytest.approx(expected, abs=1e-8)


def test_julian_date_known_values():
    assert julian_date(datetime(2000, 1, 1, 12)) == 2451545.0
    assert julian_date(datetime(1970, 1, 1)) == 2440587.5


@pytest.mark.parametrize(
    ("jd", "text"), [(2460796.625, "2460796.62500000"), (2451545.123456789, "2451545.12345679")]
)
def test_format_jd_eight_decimals(jd, text):
    assert format_jd(jd) == text


@pytest.mark.parametrize(
    ("start", "exptime", "expected"),
    [
        (datetime(2025, 5, 1, 21, 0, 0), 60.0, datetime(2025, 5, 1, 21, 0, 30)),
        (datetime(2025, 5, 1, 21, 0, 0), 0.0, datetime(2025, 5, 1, 21, 0, 0)),
        (datetime(2025, 5, 1, 21, 0, 0), 0.001, datetime(2025, 5, 1, 21, 0, 0, 500)),
        (datetime(2025, 5, 1, 23, 59, 0), 300.0, datetime(2025, 5, 2, 0, 1, 30)),
    ],
)
def test_mid_exposure_adds_half_exptime(start, exptime, expected):
    assert mid_exposure(start, exptime) == expected


def test_output_name_known_case():
    mid = datetime(2025, 5, 1, 3, 0, 0)
    assert Time(mid, scale="utc").jd == pytest.approx(2460796.625, abs=1e-9)
    assert output_name("NGC 1234", "DGAH", "V", mid) == "NGC_1234_DGAH_V_20250501_2460796.62500000.fits"


def test_output_name_matches_astropy_jd():
    mid = datetime(2017, 12, 20, 1, 34, 13, 317000)
    jd = Time(mid, scale="utc").jd
    name = output_name("V1234 Cyg", "DGAH", "R", mid)
    prefix, jd_text = name.removesuffix(".fits").rsplit("_", 1)
    assert prefix == "V1234_Cyg_DGAH_R_20171220"
    assert re.fullmatch(r"\d{7}\.\d{8}", jd_text)
    assert float(jd_text) == pytest.approx(jd, abs=1e-8)


@pytest.mark.parametrize(
    ("obj", "filt", "expected_prefix"),
    [
        (None, "V", "UNKNOWN_DGAH_V_"),
        ("M 31", None, "M_31_DGAH_UNKNOWN_"),
        ("None", "", "UNKNOWN_DGAH_UNKNOWN_"),
        ("a/../b", "H-alpha", "a_.._b_DGAH_H-alpha_"),
    ],
)
def test_output_name_missing_parts_are_unknown(obj, filt, expected_prefix):
    name = output_name(obj, "DGAH", filt, datetime(2025, 5, 1, 3))
    assert name == f"{expected_prefix}20250501_2460796.62500000.fits"
    assert "/" not in name


def test_output_name_date_is_that_of_mid_exposure_across_midnight():
    date_obs = datetime(2025, 5, 1, 23, 58, 0)
    mid = mid_exposure(date_obs, 300.0)  # 00:00:30 on 2 May
    name = output_name("X", "DGAH", "V", mid)
    jd = Time(datetime(2025, 5, 2, 0, 0, 30), scale="utc").jd
    assert name == f"X_DGAH_V_20250502_{jd:.8f}.fits"
    assert "20250501" not in name


def test_mean_time_exact_microseconds():
    base = datetime(2025, 5, 1, 21, 0, 0)
    times = [base, base + timedelta(seconds=75), base + timedelta(seconds=150, microseconds=3)]
    assert mean_time(times) == base + timedelta(seconds=75, microseconds=1)


@pytest.mark.parametrize(
    "times",
    [
        [datetime(2025, 5, 1, 23, 59, 0), datetime(2025, 5, 2, 0, 1, 0)],
        [datetime(2025, 5, 1, 21, 0, 0)],
        [datetime(2025, 5, 2), datetime(2025, 5, 1)],
    ],
)
def test_mean_time_against_astropy(times):
    expected = Time(times, scale="utc").jd.mean()
    assert julian_date(mean_time(times)) == pytest.approx(expected, abs=1e-8)


def test_mean_time_crosses_midnight():
    assert mean_time([datetime(2025, 5, 1, 23, 59), datetime(2025, 5, 2, 0, 1)]) == datetime(2025, 5, 2)


@pytest.mark.parametrize(
    ("obj", "observer", "expected"),
    [
        ("NGC 1234", "DGAH", "NGC_1234_2025-05-01_DGAH_CAL"),
        (None, "DGAH", "UNKNOWN_2025-05-01_DGAH_CAL"),
        ("M31", "A B", "M31_2025-05-01_A_B_CAL"),
    ],
)
def test_default_output_dirname(obj, observer, expected):
    assert default_output_dirname(obj, datetime(2025, 5, 1, 23, 59, 59), observer) == expected

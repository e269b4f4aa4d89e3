"""Tests for choosing master frames (imgproc.matching) on hand-made manifest-like rows."""

from __future__ import annotations

import pytest

from imgproc.matching import DEFAULT_CRITERIA, Match, differences, label, match_light, match_master

LIGHT = {
    "path": "/night/lights/light_0001.fits",
    "date_obs": "2025-05-01T21:00:00.000",
    "instrume": "ZWO ASI294MM Pro",
    "gain": 120.0,
    "offset": 30.0,
    "readoutm": "Normal",
    "set_temp": -10.0,
    "exptime": 60.0,
    "filter": "V",
    "xbinning": 1,
    "ybinning": 1,
    "ny": 64,
    "nx": 64,
}


def _light(**changes: object) -> dict:
    return {**LIGHT, **changes}


def _master(name: str, date_obs: str = "2025-05-01T18:00:00.000", **changes: object) -> dict:
    return {**LIGHT, "path": f"/night/masters/{name}", "date_obs": date_obs, **changes}


@pytest.mark.parametrize("role", ["bias", "dark", "flat"])
def test_match_master_exact_match(role):
    master = _master(f"{role}.fits")
    match = match_master(LIGHT, [master], role)
    assert match == Match(role, master["path"], "")


@pytest.mark.parametrize(
    ("master_temp", "matches"),
    [
        (-10.0, True),
        (-10.5, True),
        (-9.5, True),
        (-10.3, True),
        (-10.6, False),
        (-9.4, False),
        (-20.0, False),
    ],
)
@pytest.mark.parametrize("role", ["bias", "dark"])
def test_match_master_set_temp_tolerance(role, master_temp, matches):
    master = _master("m.fits", set_temp=master_temp)
    match = match_master(LIGHT, [master], role)
    assert (match.path == master["path"]) is matches
    if not matches:
        assert f"SET-TEMP (-10.0 vs {master_temp})" in match.reason


def test_match_master_flat_ignores_set_temp_and_exptime():
    master = _master("flat.fits", set_temp=-25.0, exptime=2.0)
    assert match_master(LIGHT, [master], "flat").path == master["path"]


def test_match_master_bias_ignores_exptime_and_filter():
    master = _master("bias.fits", exptime=0.0, filter="R")
    assert match_master(LIGHT, [master], "bias").path == master["path"]


@pytest.mark.parametrize(
    ("light_exp", "master_exp", "matches"),
    [
        (60.0, 60.0, True),
        (60.0, 60.005, True),
        (60.0, 59.995, True),
        (60.0, 60.02, False),
        (60.0, 59.98, False),
        (60.0, 120.0, False),
        (300.0, 300.01, True),
        (60.0, 60.01, True),
    ],
)
def test_match_master_dark_exptime_tolerance(light_exp, master_exp, matches):
    master = _master("dark.fits", exptime=master_exp)
    match = match_master(_light(exptime=light_exp), [master], "dark")
    assert (match.path == master["path"]) is matches


@pytest.mark.parametrize(("light_exp", "master_exp"), [(120.0, 120.01), (30.0, 30.01)])
def test_match_master_dark_exptime_tolerance_boundary_is_inclusive(light_exp, master_exp):
    master = _master("dark.fits", exptime=master_exp)
    assert match_master(_light(exptime=light_exp), [master], "dark").path == master["path"]


@pytest.mark.parametrize("key", ["instrume", "gain", "offset", "readoutm", "set_temp"])
def test_match_master_keyword_absent_from_both_matches(key):
    master = _master("bias.fits", **{key: None})
    assert match_master(_light(**{key: None}), [master], "bias").path == master["path"]


@pytest.mark.parametrize("key", ["instrume", "gain", "offset", "readoutm", "set_temp"])
@pytest.mark.parametrize("absent_from", ["light", "master"])
def test_match_master_keyword_absent_from_one_does_not_match(key, absent_from):
    light = _light(**{key: None}) if absent_from == "light" else LIGHT
    master = _master("bias.fits", **({key: None} if absent_from == "master" else {}))
    match = match_master(light, [master], "bias")
    assert match.path is None
    assert f"{label(key)} (" in match.reason
    assert "None" in match.reason


def test_match_master_keyword_missing_key_counts_as_absent():
    master = _master("bias.fits")
    del master["readoutm"]
    assert match_master(_light(readoutm=None), [master], "bias").path == master["path"]


@pytest.mark.parametrize(
    ("changes", "labels"),
    [
        ({"xbinning": 2, "ybinning": 2}, ["XBINNING (1 vs 2)", "YBINNING (1 vs 2)"]),
        ({"ny": 32, "nx": 32}, ["NAXIS2 (64 vs 32)", "NAXIS1 (64 vs 32)"]),
        ({"nx": 65}, ["NAXIS1 (64 vs 65)"]),
    ],
)
@pytest.mark.parametrize("role", ["bias", "dark", "flat"])
def test_match_master_binning_and_shape_always_compared(role, changes, labels):
    master = _master("m.fits", **changes)
    match = match_master(LIGHT, [master], role)
    assert match.path is None
    for text in labels:
        assert text in match.reason


@pytest.mark.parametrize(
    ("role", "key", "value"),
    [("flat", "filter", "R"), ("dark", "exptime", 120.0), ("flat", "gain", 0.0), ("dark", "offset", 10.0)],
)
def test_match_master_role_specific_keyword_differs(role, key, value):
    match = match_master(LIGHT, [_master("m.fits", **{key: value})], role)
    assert match.path is None
    assert f"{label(key)} ({LIGHT[key]} vs {value})" in match.reason


def test_match_master_nearest_in_time_wins():
    candidates = [
        _master("a_far.fits", "2025-04-20T21:00:00.000"),
        _master("b_near_after.fits", "2025-05-01T21:30:00.000"),
        _master("c_near_before.fits", "2025-05-01T20:00:00.000"),
        _master("d_mismatch_nearest.fits", "2025-05-01T21:00:01.000", gain=0.0),
    ]
    match = match_master(LIGHT, candidates, "bias")
    assert match.path == "/night/masters/b_near_after.fits"


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_match_master_equal_time_ties_by_file_name(order):
    names = ["b.fits", "a.fits", "c.fits"]
    candidates = [_master(names[i], "2025-05-01T20:00:00.000") for i in order]
    # a later-in-time candidate with the first name never wins the tie
    candidates.append(_master("0_first_name_but_later.fits", "2025-05-01T23:00:00.000"))
    assert match_master(LIGHT, candidates, "dark").path == "/night/masters/a.fits"


def test_match_master_equal_time_ties_by_file_name_not_folder():
    candidates = [
        {**_master("b.fits", "2025-05-01T20:00:00.000"), "path": "/a_folder/b.fits"},
        {**_master("a.fits", "2025-05-01T22:00:00.000"), "path": "/z_folder/a.fits"},
    ]
    assert match_master(LIGHT, candidates, "bias").path == "/z_folder/a.fits"


def test_match_master_no_match_reason_names_nearest_and_differences():
    candidates = [_master("bias_g0.fits", gain=0.0)]
    match = match_master(LIGHT, candidates, "bias")
    assert match.path is None
    assert match.role == "bias"
    assert match.reason == "no matching bias master; nearest bias_g0.fits differs in GAIN (120.0 vs 0.0)"


def test_match_master_no_match_reason_lists_all_differing_keywords():
    candidates = [_master("dark_120s.fits", exptime=120.0, set_temp=-20.0)]
    match = match_master(LIGHT, candidates, "dark")
    assert match.path is None
    assert "dark_120s.fits" in match.reason
    assert "SET-TEMP (-10.0 vs -20.0)" in match.reason
    assert "EXPTIME (60.0 vs 120.0)" in match.reason
    assert "GAIN" not in match.reason
    assert "/night/masters" not in match.reason


def test_match_master_no_match_reason_prefers_fewest_differences_then_time():
    candidates = [
        _master("many_diffs_nearest.fits", "2025-05-01T20:59:00.000", gain=0.0, offset=10.0, nx=32),
        _master("one_diff_far.fits", "2025-04-01T21:00:00.000", set_temp=-20.0),
        _master("one_diff_near.fits", "2025-05-01T20:00:00.000", gain=0.0),
    ]
    match = match_master(LIGHT, candidates, "bias")
    assert match.path is None
    assert "nearest one_diff_near.fits differs in GAIN (120.0 vs 0.0)" in match.reason


@pytest.mark.parametrize("role", ["bias", "dark", "flat"])
def test_match_master_empty_candidates_reason(role):
    match = match_master(LIGHT, [], role)
    assert match.path is None
    assert match.reason == f"no {role} master in the {role} folder"


@pytest.mark.parametrize(
    ("key", "light_value", "master_value"),
    [
        ("instrume", "ZWO ASI294MM Pro", "zwo asi294mm pro"),
        ("readoutm", "Normal", "NORMAL"),
        ("filter", "Ha", "HA"),
        ("filter", "V", " v "),
    ],
)
def test_match_master_string_compare_case_insensitive(key, light_value, master_value):
    master = _master("flat.fits", **{key: master_value})
    assert match_master(_light(**{key: light_value}), [master], "flat").path == master["path"]


def test_match_master_different_strings_do_not_match():
    master = _master("flat.fits", readoutm="High Gain")
    assert match_master(LIGHT, [master], "flat").path is None


def test_match_master_custom_criteria_and_tolerance():
    master = _master("dark.fits", exptime=61.0)
    assert match_master(LIGHT, [master], "dark").path is None
    assert match_master(LIGHT, [master], "dark", tolerance={"exptime": 2.0, "set_temp": 0.5}).path
    assert match_master(LIGHT, [master], "dark", criteria={"dark": ["gain"]}).path == master["path"]


def test_differences_lists_labels_in_order():
    master = _master("m.fits", gain=0.0, offset=10.0, ny=32)
    assert differences(LIGHT, master, DEFAULT_CRITERIA["bias"], {}) == [
        "GAIN (120.0 vs 0.0)",
        "OFFSET (30.0 vs 10.0)",
        "NAXIS2 (64 vs 32)",
    ]


def test_match_light_one_match_per_given_role():
    masters = {
        "bias": [_master("bias.fits")],
        "flat": [_master("flat_R.fits", filter="R"), _master("flat_V.fits", filter="V")],
    }
    result = match_light(LIGHT, masters)
    assert set(result) == {"bias", "flat"}
    assert result["bias"].path == "/night/masters/bias.fits"
    assert result["flat"].path == "/night/masters/flat_V.fits"
